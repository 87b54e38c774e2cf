"""Inference: C3D_BN on the fastest checked numeric path, and the scheduler feeding it windows.

``from streamdet.inference import X`` is the public way in. Behind it, one module per part:

- ``engine``: :func:`build_engine` (the start-up check against fp32), :func:`build_path`,
  :class:`Engine`;
- ``scheduler``: :class:`InferenceThread`, the workers that batch windows of all sources, and
  :class:`WindowResult`;
- ``fastpath``: the packed, compiled and CUDA-graph building blocks;
- ``int8``: FX static int8 quantization;
- ``cache``: the on-disk cache (fp32 reference logits, int8 calibration statistics);
- ``calibration``: real windows from a video file for the check and int8 calibration.

Modules here import each other in that order, never back (``tests/test_imports.py``).
"""

from streamdet.device import select_device
from streamdet.inference.cache import default_cache_dir, weights_key
from streamdet.inference.calibration import calibration_windows
from streamdet.inference.engine import (
    PATHS,
    PRECISIONS,
    Engine,
    build_engine,
    build_int8_engine,
    build_path,
    check_engine,
    graph_batch_sizes,
    warm_other_batch_size,
)
from streamdet.inference.int8 import quantize_int8
from streamdet.inference.scheduler import InferenceThread, WindowResult

__all__ = [
    "PATHS",
    "PRECISIONS",
    "Engine",
    "InferenceThread",
    "WindowResult",
    "build_engine",
    "build_int8_engine",
    "build_path",
    "calibration_windows",
    "check_engine",
    "default_cache_dir",
    "graph_batch_sizes",
    "quantize_int8",
    "select_device",
    "warm_other_batch_size",
    "weights_key",
]
