"""The bundled demo: a 60 s synthetic monitoring stream, its ground truth, a small trained C3D_BN
and the config that ties them together (``streamdet run`` with no arguments runs it).

The files ship inside the package, so the demo works from a wheel as well as from a checkout.

Example:
    >>> from streamdet.demo import config_path
    >>> config_path().name
    'demo.yaml'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIG = "demo.yaml"
WEIGHTS = "c3d_bn_demo.safetensors"
VIDEO = "demo.mp4"
TRUTH = "demo_truth.json"


def asset_path(name: str) -> Path:
    """The path of one bundled demo file (``demo.yaml``, ``demo.mp4``, ...).

    The package is installed as plain files (a wheel or a checkout), never zipped, so the
    resource is a real file that OpenCV and safetensors can open by path.
    """
    return Path(str(resources.files(__name__).joinpath(name)))


def config_path() -> Path:
    """The demo config; its relative paths are relative to its own folder."""
    return asset_path(CONFIG)
