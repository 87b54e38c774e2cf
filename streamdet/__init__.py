"""streamdet: real-time streaming video event detection with C3D_BN."""

__version__ = "0.1.0"
