"""Static int8 quantization of C3D_BN with PyTorch's FX graph mode (oneDNN backend, AMX/VNNI).

BatchNorm is folded first, conv1's width taps are folded into its channels (in float, before the
input is quantized: ``fastpath.WidthFold``), conv+ReLU and linear+ReLU are fused, activations
are calibrated on real windows (per-tensor, histogram observer) and weights quantized per
channel. Calibration statistics are cached by the weights' and calibration clips' sha256
(:mod:`streamdet.inference.cache`), so a restart skips the calibration forward passes.
``streamdet.inference.engine.build_path(..., "int8")`` wraps the result in an ``Engine``.

Example:
    >>> import torch
    >>> from streamdet.models.c3d import C3D_BN
    >>> net = quantize_int8(C3D_BN(num_classes=3, width=0.0625), torch.randn(2, 3, 16, 112, 112))
    >>> net(torch.zeros(1, 3, 16, 112, 112)).shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from streamdet.inference.cache import calibration_path, load_calibration, save_calibration
from streamdet.inference.fastpath import InferenceNet, WidthFold
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE, fuse_bn

log = logging.getLogger(__name__)

QUANT_ENGINE = "onednn"  # AMX/VNNI int8 convolutions; "x86" would pick fbgemm for some layers


@contextlib.contextmanager
def _quantized_engine(name: str) -> Iterator[None]:
    """Use ``name`` as PyTorch's quantized engine while weights are prepacked, then restore."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def quantize_int8(
    model: C3D_BN,
    calibration_clips: torch.Tensor,
    *,
    cache_dir: Path | None = None,
    batch: int = 2,
) -> torch.nn.Module:
    """Return an int8 (oneDNN) copy of ``model``, calibrated on ``calibration_clips``.

    Args:
        model: a C3D_BN (left untouched).
        calibration_clips: (N, 3, 16, 112, 112) windows of real footage, preprocessed.
        cache_dir: where calibration statistics are cached; None disables the cache.
        batch: clips per calibration forward pass.

    Returns:
        A module mapping a float32 (B, 3, 16, 112, 112) tensor to float32 logits.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    if calibration_clips.dim() != 5 or tuple(calibration_clips.shape[1:]) != INPUT_SHAPE:
        raise ValueError(
            f"calibration_clips must be (N, {', '.join(map(str, INPUT_SHAPE))}), but got {tuple(calibration_clips.shape)}"
        )
    t0 = time.perf_counter()
    net = InferenceNet(fuse_bn(model), fold_conv1=True).eval()
    example = calibration_clips[:1].float()
    cache_file = None
    if cache_dir is not None:
        cache_file = calibration_path(Path(cache_dir), net, calibration_clips, QUANT_ENGINE)
    with _quantized_engine(QUANT_ENGINE), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization's deprecation notices, once per process
        prepared = _with_observers(net, example)
        if cache_file is not None and load_calibration(prepared, cache_file):
            log.info("int8: loaded calibration statistics from %s", cache_file)
        else:
            if cache_file is not None and cache_file.is_file():
                # The failed load may have written part of the entry into the observers and into
                # the layers prepared shares with net: start again from the model.
                prepared = _with_observers(
                    InferenceNet(fuse_bn(model), fold_conv1=True).eval(), example
                )
            log.info(
                "int8: calibrating activations on %d real windows (cold start, cached afterwards)",
                calibration_clips.shape[0],
            )
            with torch.inference_mode():
                for i in range(0, calibration_clips.shape[0], batch):
                    prepared(calibration_clips[i : i + batch].float())
            if cache_file is not None:
                save_calibration(prepared.state_dict(), cache_file)
        quantized = convert_fx(prepared)
    log.info("int8: model ready in %.1f s", time.perf_counter() - t0)
    return quantized


def _with_observers(net: InferenceNet, example: torch.Tensor) -> torch.fx.GraphModule:
    """``net`` traced by FX with observers in place, to calibrate or to load statistics into."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx

    # The fold stays one float module: traced, FX would quantize before the padding and
    # requantize after it, which costs what folding saves.
    qconfig = get_default_qconfig_mapping(QUANT_ENGINE).set_object_type(WidthFold, None)
    untraced = PrepareCustomConfig().set_non_traceable_module_classes([WidthFold])
    return prepare_fx(net, qconfig, example_inputs=(example,), prepare_custom_config=untraced)
