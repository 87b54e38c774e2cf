"""Static int8 quantization of C3D_BN with PyTorch's FX graph mode (oneDNN backend, AMX/VNNI).

BatchNorm is folded first, conv1's width taps are folded into its channels (in float, before the
input is quantized: ``fastpath.WidthFold``), conv+ReLU and linear+ReLU are fused, activations are
calibrated on real windows (per-tensor, histogram observer) and weights quantized per channel. Calibration
statistics are cached by the weights' and calibration clips' sha256, so a restart skips the
calibration forward passes.

Example:
    >>> import torch
    >>> from streamdet.models.c3d import C3D_BN
    >>> engine = build_int8_engine(C3D_BN(num_classes=3, width=0.0625), torch.device("cpu"),
    ...                            calibration_clips=torch.randn(2, 3, 16, 112, 112))
    >>> engine(torch.zeros(1, 3, 16, 112, 112)).shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from streamdet.inference.fastpath import InferenceNet, WidthFold, default_cache_dir, weights_key
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE, fuse_bn
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract

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


def _clips_key(clips: torch.Tensor) -> str:
    return hashlib.sha256(clips.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


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
        key = hashlib.sha256(f"{weights_key(net)}:{_clips_key(calibration_clips)}:{QUANT_ENGINE}".encode())
        cache_file = Path(cache_dir) / f"int8-calib-{key.hexdigest()[:32]}.pt"
    with _quantized_engine(QUANT_ENGINE), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization's deprecation notices, once per process
        prepared = _with_observers(net, example)
        if cache_file is not None and _load_statistics(prepared, cache_file):
            log.info("int8: loaded calibration statistics from %s", cache_file)
        else:
            if cache_file is not None and cache_file.is_file():
                # The failed load may have written part of the entry into the observers and into
                # the layers prepared shares with net: start again from the model.
                prepared = _with_observers(InferenceNet(fuse_bn(model), fold_conv1=True).eval(), example)
            log.info("int8: calibrating activations on %d real windows (cold start, cached afterwards)",
                     calibration_clips.shape[0])
            with torch.inference_mode():
                for i in range(0, calibration_clips.shape[0], batch):
                    prepared(calibration_clips[i:i + batch].float())
            if cache_file is not None:
                _save_atomic(prepared.state_dict(), cache_file)
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


def _load_statistics(prepared: torch.nn.Module, path: Path) -> bool:
    """Load cached calibration statistics into ``prepared``; False when there is no usable entry.

    A corrupt entry (truncated by a crash or a full disk, or not a state dict of this model) is
    logged and costs a recalibration, which rewrites it, nothing more: like the fp32 logits cache.
    """
    if not path.is_file():
        return False
    try:
        prepared.load_state_dict(torch.load(path, weights_only=True))
    except Exception as exc:  # torch.load and load_state_dict raise several types for bad files
        reason = " ".join(str(exc).split())[:200]
        log.warning("int8: ignoring unreadable calibration cache %s (%s: %s); recalibrating",
                    path, type(exc).__name__, reason)
        return False
    return True


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    except OSError as exc:  # a read-only cache costs a recalibration, nothing more
        log.warning("int8: could not cache calibration statistics in %s: %s", path, exc)


def calibration_windows(video: str | Path, n: int = 8, *, stride: int = 8,
                        contract: PreprocessContract = DEFAULT_CONTRACT) -> torch.Tensor:
    """``n`` preprocessed windows (n, 3, 16, 112, 112) from the start of a video file.

    For ``build_engine(..., check_clips=...)``: int8 scales calibrated on the footage the model
    will see, and the fp32 check run on it. Frames are sampled with the contract's frame step.
    """
    import numpy as np

    from streamdet.errors import SourceError
    from streamdet.preprocess import preprocess_frame
    from streamdet.sources import OpenCVSource

    try:  # as the capture opens it: FFmpeg kept quiet, a clear reason when it cannot
        source = OpenCVSource(str(video))
    except SourceError as exc:
        raise ValueError(str(exc)) from None
    step = contract.step_for(source.fps or 0.0)
    need = INPUT_SHAPE[1] + (n - 1) * stride
    frames: list[np.ndarray] = []
    index = 0
    try:
        while len(frames) < need:
            frame = source.read()
            if frame is None:
                break
            if index % step == 0:
                frames.append(preprocess_frame(frame, contract))
            index += 1
    finally:
        source.release()
    if len(frames) < INPUT_SHAPE[1]:
        raise ValueError(f"{video} has {len(frames)} usable frames; a window needs {INPUT_SHAPE[1]}")
    stack = np.stack(frames, axis=1)  # (3, T, 112, 112)
    count = (len(frames) - INPUT_SHAPE[1]) // stride + 1
    return torch.from_numpy(np.stack([stack[:, i * stride:i * stride + INPUT_SHAPE[1]] for i in range(count)]))


def build_int8_engine(
    model: C3D_BN,
    device: torch.device,
    *,
    calibration_clips: torch.Tensor | None = None,
    cache_dir: Path | None = None,
):  # -> streamdet.inference.Engine (imported lazily: inference imports this module lazily too)
    """The int8 path as an :class:`~streamdet.inference.Engine` (CPU only).

    Args:
        model: a C3D_BN.
        device: must be the CPU (PyTorch's int8 kernels are CPU kernels).
        calibration_clips: real windows to calibrate on; random clips when None (with a warning:
            the scales will not fit real footage).
        cache_dir: calibration cache; :func:`~streamdet.inference.fastpath.default_cache_dir` when None.
    """
    from streamdet.inference.engine import Engine

    if device.type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, but device is {device}")
    if calibration_clips is None:
        log.warning("int8: no real windows given to calibrate on; using random clips")
        calibration_clips = torch.randn((4, *INPUT_SHAPE), generator=torch.Generator().manual_seed(0))
    quantized = quantize_int8(model, calibration_clips, cache_dir=cache_dir or default_cache_dir())
    # the float WidthFold in front changes the layout itself (fastpath.WidthFold)
    return Engine(quantized, device, "int8", model.num_classes, input_dtype=torch.float32, channels_last_input=False)
