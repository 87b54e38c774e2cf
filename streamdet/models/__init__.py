"""Models: C3D_BN and its checkpoints."""

from streamdet.models.c3d import C3D_BN, count_flops, fuse_bn

__all__ = ["C3D_BN", "count_flops", "fuse_bn"]
