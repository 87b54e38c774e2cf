"""Inference: the engine that runs C3D_BN fast, and the scheduler that batches windows of all sources.

``from streamdet.inference import X`` is the public way in; the modules behind it are
``engine`` (building a checked numeric path), ``fastpath`` (its building blocks) and ``int8``
(FX static quantization).
"""

from streamdet.inference.engine import (
    PATHS,
    PRECISIONS,
    Engine,
    InferenceThread,
    WindowResult,
    build_engine,
    build_path,
    check_engine,
    graph_batch_sizes,
    select_device,
    warm_other_batch_size,
)
from streamdet.inference.fastpath import default_cache_dir, weights_key
from streamdet.inference.int8 import build_int8_engine, calibration_windows, quantize_int8

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
