"""Frame preprocessing in torch, on the device a frame was decoded to: the GPU path's
counterpart of :func:`streamdet.preprocess.preprocess_frame`.

A frame decoded on the GPU (NVDEC) is resized, cropped and normalised there, into its slot of a
:class:`~streamdet.device_buffer.DeviceRingBuffer`, with the geometry of the model's
:class:`~streamdet.preprocess.PreprocessContract`: the same crop box and the same sample
positions, so a model sees the same input whichever path decoded its frames.

- A crop region at least twice the crop (any frame from about 240x320 up) is supersampled as
  the CPU path does: output pixel (i, j) is the mean of a taps x taps grid of pixels centred in
  its footprint (``contract.sample_grid`` for 2 taps; 4, 8... for 8K and beyond), read with two
  ``index_select`` calls. With 2 taps this is the computation of the CPU's compiled kernel
  (``streamdet.kernels.supersample2``): the same pixels, summed and scaled alike, so the two
  agree to float32 rounding (1e-5 normalised units; tests/test_gpu_preprocess.py). With more
  taps the CPU's OpenCV route rounds each 2x2 average to uint8 and this one does not: within
  0.02.
- A smaller region is resized in one step, an area average when shrinking and bilinear when
  enlarging, as OpenCV's INTER_AREA and INTER_LINEAR on the CPU path; torch's area filter puts
  its bin edges on whole pixels where OpenCV weighs fractions of a pixel, so these agree to
  about 0.1 on average and 0.5 at worst on sharp edges (small frames only: under 240x320).

Frames come as (H, W, 3) uint8 tensors in RGB order (what NVDEC gives; the CPU adapter in
:mod:`streamdet.sources.decoding` converts PyAV's BGR).

Example:
    >>> import torch
    >>> frame = torch.zeros((480, 640, 3), dtype=torch.uint8)
    >>> preprocess_tensor(frame).shape
    torch.Size([3, 112, 112])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract, _taps_per_axis

__all__ = ["preprocess_tensor"]

_GEOMETRY_CACHE_SIZE = 64  # (contract, frame size, device) triples: a run has a few


@dataclass(frozen=True)
class _Geometry:
    """How a (height, width) frame becomes the crop on one device."""

    box: tuple[int, int, int, int]  # (y0, y1, x0, x1) of the crop region
    taps: int  # samples per output pixel and axis; 0: one resize of the region instead
    rows: torch.Tensor | None  # (taps crop,) int64 sample rows, in frame coordinates
    cols: torch.Tensor | None  # (taps crop,) int64 sample columns
    scale: torch.Tensor  # (3, 1, 1) float32: 1 / (taps^2 std), per model channel
    offset: torch.Tensor  # (3, 1, 1) float32: -mean / std
    channels: torch.Tensor  # (3,) int64: the frame's RGB channel of each model channel


@functools.lru_cache(maxsize=_GEOMETRY_CACHE_SIZE)
def _geometry(
    contract: PreprocessContract, height: int, width: int, device: torch.device
) -> _Geometry:
    y0, y1, x0, x1 = contract.crop_box(height, width)
    h, w, size = y1 - y0, x1 - x0, contract.crop
    taps = _taps_per_axis(h, w, size) if h >= 2 * size and w >= 2 * size else 0
    rows = cols = None
    if taps:
        # The pixel centres nearest each sample point of a taps x taps grid centred in each
        # output pixel's footprint: what contract.sample_grid holds for 2 taps, and what
        # cv2.INTER_NEAREST_EXACT picks resizing the region to taps x crop.
        k = np.arange(taps * size) + 0.5
        r = y0 + np.minimum(np.floor(k * h / (taps * size)), h - 1).astype(np.int64)
        c = x0 + np.minimum(np.floor(k * w / (taps * size)), w - 1).astype(np.int64)
        rows, cols = torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)
    mean = torch.tensor(contract.mean, dtype=torch.float32)
    std = torch.tensor(contract.std, dtype=torch.float32)
    scale = 1.0 / std / (taps * taps if taps else 1)
    order = [0, 1, 2] if contract.channel_order == "RGB" else [2, 1, 0]
    return _Geometry(
        box=(y0, y1, x0, x1),
        taps=taps,
        rows=rows,
        cols=cols,
        scale=scale.reshape(3, 1, 1).to(device),
        offset=(-mean / std).reshape(3, 1, 1).to(device),
        channels=torch.tensor(order, dtype=torch.int64, device=device),
    )


def preprocess_tensor(
    frame: torch.Tensor,
    contract: PreprocessContract = DEFAULT_CONTRACT,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn one decoded frame into model input, on the frame's device.

    Args:
        frame: (H, W, 3) uint8 tensor, RGB, on any device.
        contract: the model's preprocessing contract.
        out: optional float32 tensor (3, crop, crop) on the frame's device to write into, such
            as a slot of a :class:`~streamdet.device_buffer.DeviceRingBuffer` (any strides).

    Returns:
        float32 tensor (3, crop, crop), channels in ``contract.channel_order``, normalised
        (``out`` itself when given).

    Raises:
        ValueError: ``frame`` or ``out`` has the wrong type, shape, dtype or device.
    """
    if not isinstance(frame, torch.Tensor):
        raise ValueError(f"frame must be a torch.Tensor, but got {type(frame).__name__}")
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"frame must be uint8 with shape (H, W, 3), but got {frame.dtype} {tuple(frame.shape)}"
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame must not be empty, but got shape {tuple(frame.shape)}")
    size = contract.crop
    if out is None:
        out = torch.empty((3, size, size), dtype=torch.float32, device=frame.device)
    elif out.shape != (3, size, size) or out.dtype != torch.float32 or out.device != frame.device:
        raise ValueError(
            f"out must be float32 with shape {(3, size, size)} on {frame.device}, but got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    geo = _geometry(contract, int(frame.shape[0]), int(frame.shape[1]), frame.device)
    # (H, W, 3) uint8 -> (3, size, size) float32 of the region's pixel values (taps: sums)
    planes = _sampled_sums(frame, geo, size) if geo.taps else _resized(frame, geo, size)
    # ... -> the model's channel order, normalised: x * scale + offset, per plane, into ``out``
    torch.addcmul(geo.offset, planes.index_select(0, geo.channels), geo.scale, out=out)
    return out


def _sampled_sums(frame: torch.Tensor, geo: _Geometry, size: int) -> torch.Tensor:
    """(3, size, size) float32: each output pixel's sum of its taps x taps samples."""
    assert geo.rows is not None and geo.cols is not None
    taps = geo.taps
    # (H, W, 3) -> (taps size, taps size, 3): the sample grid, gathered
    samples = frame.index_select(0, geo.rows).index_select(1, geo.cols)
    # -> (size, taps, size, taps, 3) -> summed over each pixel's taps -> (3, size, size)
    sums = samples.to(torch.float32).reshape(size, taps, size, taps, 3).sum(dim=(1, 3))
    return sums.permute(2, 0, 1)


def _resized(frame: torch.Tensor, geo: _Geometry, size: int) -> torch.Tensor:
    """(3, size, size) float32: a region under twice the crop, resized in one step."""
    y0, y1, x0, x1 = geo.box
    # (h, w, 3) uint8 -> (1, 3, h, w) float32
    region = frame[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    if y1 - y0 > size:  # shrinking: an area average, as OpenCV's INTER_AREA
        resized = F.interpolate(region, size=(size, size), mode="area")
    else:  # enlarging: bilinear, as OpenCV's INTER_LINEAR
        resized = F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)
    # OpenCV hands back uint8: round as it does, so both paths see the same levels
    return resized.squeeze(0).round_().clamp_(0, 255)
