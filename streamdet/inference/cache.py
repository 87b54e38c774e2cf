"""The on-disk inference cache: fp32 reference logits and int8 calibration statistics.

Entries are keyed by sha256 of the weights (and of the clips they were computed on), written
atomically, and only ever a speed-up: a missing, unreadable or unwritable entry is logged and
costs a recomputation, never a failed start. torch.compile keeps its kernels in the same folder
(``inductor/``, see :func:`streamdet.inference.fastpath.compile_net`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where compiled and int8 artifacts are kept: ``$STREAMDET_CACHE_DIR`` or ~/.cache/streamdet."""
    env = os.environ.get("STREAMDET_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "streamdet"


def weights_key(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, bytes): a cache key."""
    digest = hashlib.sha256(torch.__version__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _clip_bytes(clips: torch.Tensor) -> bytes:
    return clips.detach().float().cpu().contiguous().numpy().tobytes()


# -- fp32 reference logits of the start-up check -------------------------------------------------


def reference_logits_path(cache_dir: Path, model: nn.Module, clips: torch.Tensor) -> Path:
    """The entry for ``model``'s fp32 logits on ``clips``."""
    key = hashlib.sha256(weights_key(model).encode())
    key.update(_clip_bytes(clips))
    return cache_dir / f"fp32-logits-{key.hexdigest()[:32]}.pt"


def load_reference_logits(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The logits cached at ``path`` when there is a readable entry of ``shape``, else None."""
    if not path.is_file():
        return None
    try:
        logits = torch.load(path, weights_only=True)
    except Exception as exc:  # a corrupt cache entry costs a recomputation, nothing more
        log.warning("inference: ignoring unreadable cache entry %s: %s", path, exc)
        return None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != shape:
        return None
    log.info("inference: fp32 reference logits loaded from %s", path)
    return logits


def save_reference_logits(path: Path, logits: torch.Tensor) -> None:
    """Cache ``logits`` at ``path`` (a warning, nothing more, when the folder is not writable)."""
    try:
        _save_atomic(logits, path)
    except OSError as exc:
        log.warning("inference: could not cache fp32 reference logits in %s: %s", path.parent, exc)


# -- int8 calibration statistics -----------------------------------------------------------------


def calibration_path(cache_dir: Path, net: nn.Module, clips: torch.Tensor, engine: str) -> Path:
    """The entry for ``net``'s observer statistics calibrated on ``clips`` for the quantized
    ``engine`` (PyTorch's, e.g. ``onednn``)."""
    clips_key = hashlib.sha256(_clip_bytes(clips)).hexdigest()
    key = hashlib.sha256(f"{weights_key(net)}:{clips_key}:{engine}".encode())
    return cache_dir / f"int8-calib-{key.hexdigest()[:32]}.pt"


def load_calibration(prepared: nn.Module, path: Path) -> bool:
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
        log.warning(
            "int8: ignoring unreadable calibration cache %s (%s: %s); recalibrating",
            path,
            type(exc).__name__,
            reason,
        )
        return False
    return True


def save_calibration(state: dict[str, torch.Tensor], path: Path) -> None:
    """Cache calibration statistics at ``path`` (a warning when the folder is not writable)."""
    try:
        _save_atomic(state, path)
    except OSError as exc:  # a read-only cache costs a recalibration, nothing more
        log.warning("int8: could not cache calibration statistics in %s: %s", path, exc)


def _save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
