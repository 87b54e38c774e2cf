"""Where frames are decoded and kept: the host (numpy) path or a torch device path.

``decode: cpu`` (the default) is the path every other module describes: FFmpeg decodes on the
CPU, frames are preprocessed with numpy/Numba into host ring buffers, and a batch is copied to
the model's device. ``decode: gpu`` decodes with NVDEC (:mod:`streamdet.sources.nvdec`) and
keeps every frame on the GPU: preprocessed there (:mod:`streamdet.preprocess_torch`) into
:class:`~streamdet.device_buffer.DeviceRingBuffer` rings, from which the inference scheduler
gathers each batch on the device.

:func:`resolve_decode` turns the configured choice into a :class:`DevicePath`, or None for the
host path: where ``gpu`` cannot run (no CUDA device, or PyNvVideoCodec not installed), one
warning says why and the run decodes on the CPU.

A :class:`DevicePath` with ``nvdec=False`` runs the same device path with frames decoded by
PyAV on the CPU and handed over as tensors (:class:`TensorFrames`): on ``cpu`` it is how the
tests run the whole GPU path without a GPU.

Example:
    >>> resolve_decode("cpu") is None
    True
    >>> DevicePath(torch.device("cpu"), nvdec=False).describe()
    'PyAV decoding, torch preprocessing and rings on cpu'
"""

from __future__ import annotations

import enum
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamdet.preprocess import _as_bgr
from streamdet.redaction import redact_text, redact_url
from streamdet.sources.opening import SourceKind, VideoSource, source_kind
from streamdet.sources.pyav import UnsupportedSourceError

__all__ = [
    "Decode",
    "DeviceOpener",
    "DevicePath",
    "TensorFrames",
    "device_opener",
    "resolve_decode",
]

log = logging.getLogger(__name__)

NVDEC_MODULE = "PyNvVideoCodec"  # pip install 'streamdet[gpu]'


class Decode(enum.Enum):
    """Where a run decodes its sources (``decode`` in the config, ``--decode``)."""

    CPU = "cpu"  # FFmpeg on the CPU, host ring buffers (the default)
    GPU = "gpu"  # NVDEC, frames kept on the GPU


@dataclass(frozen=True)
class DevicePath:
    """Frames as torch tensors on ``device``: decoded there (``nvdec``) or decoded by PyAV and
    handed over, preprocessed there into device rings, batched there."""

    device: torch.device
    nvdec: bool

    def describe(self) -> str:
        decoder = "NVDEC decoding" if self.nvdec else "PyAV decoding"
        return f"{decoder}, torch preprocessing and rings on {self.device}"


def resolve_decode(decode: str | Decode, *, device: str = "cuda") -> DevicePath | None:
    """The device path ``decode`` asks for, or None for the host path.

    ``gpu`` needs a CUDA device and PyNvVideoCodec; without either it logs one warning naming
    what is missing and returns None (the CPU path).

    Raises:
        ValueError: ``decode`` is neither ``cpu`` nor ``gpu``.
    """
    choice = Decode(decode)
    if choice is Decode.CPU:
        return None
    missing = _gpu_missing(device)
    if missing:
        log.warning("decode gpu: %s; decoding on the CPU instead", missing)
        return None
    return DevicePath(torch.device(device), nvdec=True)


def _gpu_missing(device: str) -> str:
    """Why NVDEC decoding cannot run here ('' when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is false)"
    if importlib.util.find_spec(NVDEC_MODULE) is None:
        return f"{NVDEC_MODULE} is not installed (pip install 'streamdet[gpu]')"
    return ""


class TensorFrames:
    """A source whose frames come as (H, W, 3) uint8 RGB tensors on ``device``: a host source
    (BGR arrays) wrapped, for the device path without NVDEC.

    Everything else a source offers (``skip``, ``fps``, ``drain_packets``, ``stream_info``...)
    is the wrapped source's.
    """

    def __init__(self, source: VideoSource, device: torch.device) -> None:
        self._source = source
        self.device = device

    def read(self) -> torch.Tensor | np.ndarray | None:
        """The next frame as a tensor; a frame of a shape no image has is handed on as it came,
        for the preprocessing to refuse (the frame is skipped, as on the host path)."""
        frame = self._source.read()
        if frame is None:
            return None
        try:
            return to_tensor_frame(frame, self.device)
        except ValueError:
            return frame

    def release(self) -> None:
        self._source.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def to_tensor_frame(frame: np.ndarray, device: torch.device) -> torch.Tensor:
    """A frame as OpenCV and PyAV give it ((H, W, 3) BGR uint8; grayscale and BGRA are
    converted) -> (H, W, 3) RGB uint8 tensor on ``device`` (a copy).

    Raises:
        ValueError: not a uint8 image of 1, 3 or 4 channels.
    """
    if frame.dtype != np.uint8 or frame.size == 0:
        raise ValueError(f"frame must be a non-empty uint8 image, but got {frame.dtype}")
    frame = _as_bgr(frame)
    # BGR -> RGB: a reversed view of the last axis, copied once into contiguous memory
    return torch.from_numpy(np.ascontiguousarray(frame[:, :, ::-1])).to(device)


def to_host_bgr(frame: torch.Tensor) -> np.ndarray:
    """(H, W, 3) RGB uint8 tensor -> (H, W, 3) BGR uint8 array on the host, for outputs that
    draw frames (the overlay)."""
    return np.ascontiguousarray(frame.detach().to("cpu").numpy()[:, :, ::-1])


def device_opener(
    opener: Callable[[], VideoSource], path: DevicePath, *, url: str, **options: Any
) -> Callable[[], Any]:
    """An opener of the device path for ``url`` (see :class:`DeviceOpener`)."""
    return DeviceOpener(opener, path, url=url, **options)


class DeviceOpener:
    """Opens one source for the device path (each call, a new open): with NVDEC where it can
    (:class:`~streamdet.sources.nvdec.NvdecSource`, ``options`` as PyAVSource takes them),
    else ``opener``'s source (PyAV or OpenCV on the CPU) wrapped in :class:`TensorFrames`.

    A camera index is always read by ``opener`` (NVDEC reads files and streams). A file or
    stream NVDEC cannot decode (its codec, or no decoder to be had) is read by ``opener`` from
    then on, with one warning.
    """

    def __init__(
        self, opener: Callable[[], VideoSource], path: DevicePath, *, url: str, **options: Any
    ) -> None:
        self.opener = opener
        self.path = path
        self.url = url
        self.options = options
        self.nvdec = path.nvdec and source_kind(url) is not SourceKind.CAMERA

    def __call__(self) -> Any:
        if self.nvdec:
            from streamdet.sources.nvdec import NvdecSource

            try:
                return NvdecSource(self.url, device=self.path.device, **self.options)
            except UnsupportedSourceError as exc:
                self.nvdec = False
                log.warning("%s; decoding it on the CPU from now on", redact_text(str(exc)))
        return TensorFrames(self.opener(), self.path.device)

    def __repr__(self) -> str:
        return f"DeviceOpener({redact_url(self.url)!r}, nvdec={self.nvdec})"
