"""Frame preprocessing shared by training and live capture.

One definition of how a decoded frame becomes model input, so a checkpoint is always run with
the preprocessing it was trained with. The contract travels inside every checkpoint.

C3D resizes every frame to 128x171 and centre-crops 112x112. We compute the same crop without
resizing the whole frame: each output pixel averages a 2x2 grid of samples centred in its
footprint of the source region that maps onto the crop (more samples for 8K frames; one area
resize for regions under twice the crop, see ``_resize_region``). One compiled pass
(:mod:`streamdet.kernels`) reads the samples and writes the normalised planes into the output or a
caller's buffer. That is faster than the same sampling through OpenCV (the fallback without
Numba) and as fast as one bilinear resize, which has several times the error (it aliases); see
``benchmarks/bench_pipeline.py`` and benchmarks/RESULTS.md, 'Latest figures (2026-11-26,
19:58-21:10)'.

Example:
    >>> import numpy as np
    >>> frame = np.zeros((480, 640, 3), np.uint8)
    >>> preprocess_frame(frame).shape
    (3, 112, 112)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from streamdet import kernels

# Kinetics statistics in 0..255, RGB order (as torchvision's video models).
_KINETICS_MEAN = (110.2008, 100.6398, 95.9948)
_KINETICS_STD = (58.1489, 56.4701, 55.3324)
# Frame sizes whose crop box and sample grid a contract remembers.
_BOX_CACHE_SIZE = 64


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.number))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )


@dataclass(frozen=True)
class PreprocessContract:
    """How frames were prepared for a model. Stored in checkpoint metadata.

    Attributes:
        resize: (height, width) the whole frame is (conceptually) resized to before cropping.
        crop: side of the centre crop fed to the model.
        channel_order: order of the model's input channels.
        mean: per-channel mean in 0..255, in ``channel_order``.
        std: per-channel standard deviation in 0..255, in ``channel_order``.
        fps: frame rate of the footage the model learned from, in frames per second.
        frame_step: the model sees every ``frame_step``-th frame of footage at ``fps``.
    """

    resize: tuple[int, int] = (128, 171)
    crop: int = 112
    channel_order: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = _KINETICS_MEAN
    std: tuple[float, float, float] = _KINETICS_STD
    fps: float = 10.0
    frame_step: int = 1
    _plane_scale: np.ndarray = field(init=False, repr=False, compare=False)
    _plane_offset: np.ndarray = field(init=False, repr=False, compare=False)
    # (height, width) -> (crop box, sample grid): a stream has one frame size
    _geometry: dict[tuple[int, int], tuple[tuple[int, int, int, int], np.ndarray | None]] = field(
        init=False, repr=False, compare=False
    )
    _kernel_norm: np.ndarray = field(init=False, repr=False, compare=False)
    _kernel_order: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (
            not isinstance(self.resize, (tuple, list))
            or len(self.resize) != 2
            or not all(_is_int(v) and v >= 1 for v in self.resize)
        ):
            raise ValueError(
                f"resize must be (height, width) with 2 positive integers, but got {self.resize}"
            )
        if not _is_int(self.crop) or self.crop < 1:
            raise ValueError(f"crop must be a positive integer, but got {self.crop!r}")
        if self.crop > min(self.resize):
            raise ValueError(f"crop {self.crop} must fit inside resize {self.resize}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(
                f"channel_order must be 'RGB' or 'BGR', but got {self.channel_order!r}"
            )
        if (
            not isinstance(self.mean, (tuple, list))
            or not isinstance(self.std, (tuple, list))
            or len(self.mean) != 3
            or len(self.std) != 3
            or not all(_is_finite_number(v) for v in (*self.mean, *self.std))
            or min(self.std) <= 0
        ):
            raise ValueError(
                f"mean and std need 3 finite values with std > 0, but got {self.mean}, {self.std}"
            )
        if (
            not (_is_finite_number(self.fps) and self.fps > 0)
            or not _is_int(self.frame_step)
            or self.frame_step < 1
        ):
            raise ValueError(
                f"fps must be finite and > 0 and frame_step an integer >= 1, but got {self.fps!r}, {self.frame_step!r}"
            )
        # x_norm = (x - mean) / std  ==  x * scale + offset, shaped (3, 1, 1) to scale the planes
        # of a (3, H, W) array, in the model's channel order.
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        object.__setattr__(self, "_plane_scale", (1.0 / std).astype(np.float32).reshape(3, 1, 1))
        object.__setattr__(self, "_plane_offset", (-mean / std).astype(np.float32).reshape(3, 1, 1))
        object.__setattr__(self, "_geometry", {})
        # For kernels.supersample2, which sums 4 samples: plane k = BGR channel order[k], scaled
        # by norm[0, k] (a quarter of 1 / std) and offset by norm[1, k].
        quarter = self._plane_scale.reshape(3) / 4
        object.__setattr__(
            self,
            "_kernel_norm",
            np.stack([quarter, self._plane_offset.reshape(3)]).astype(np.float32),
        )
        order = [2, 1, 0] if self.channel_order == "RGB" else [0, 1, 2]
        object.__setattr__(self, "_kernel_order", np.asarray(order, np.int32))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["resize"] = list(self.resize)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessContract:
        if not isinstance(d, dict):
            raise ValueError(
                f"a preprocessing contract must be a mapping, but got {type(d).__name__}"
            )
        known = {"resize", "crop", "channel_order", "mean", "std", "fps", "frame_step"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        kwargs = dict(d)
        for key in ("resize", "mean", "std"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def step_for(self, source_fps: float) -> int:
        """Frame step for a source at ``source_fps`` so the model sees its training frame rate."""
        if not source_fps or source_fps <= 0 or not np.isfinite(source_fps):
            return self.frame_step
        return max(1, int(round(source_fps * self.frame_step / self.fps)))

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Source region (y0, y1, x0, x1) that becomes the centre crop after the C3D resize."""
        return self._geometry_for(height, width)[0]

    def sample_grid(self, height: int, width: int) -> np.ndarray | None:
        """Where the 2x2 supersampling of a (height, width) frame reads: a (4, crop) int32 array
        of the two sample rows of each output row (0, 1) and the two sample columns of each
        output column (2, 3), in frame coordinates; None where the crop region is under twice
        the crop or needs more than 2 samples per axis (see ``_resize_region``)."""
        return self._geometry_for(height, width)[1]

    def _geometry_for(
        self, height: int, width: int
    ) -> tuple[tuple[int, int, int, int], np.ndarray | None]:
        geometry = self._geometry.get((height, width))
        if geometry is None:
            rh, rw = self.resize
            sy, sx = height / rh, width / rw
            cy0 = (rh - self.crop) / 2.0
            cx0 = (rw - self.crop) / 2.0
            y0 = int(round(cy0 * sy))
            x0 = int(round(cx0 * sx))
            y1 = min(max(y0 + 1, int(round((cy0 + self.crop) * sy))), height)
            x1 = min(max(x0 + 1, int(round((cx0 + self.crop) * sx))), width)
            h, w, size = y1 - y0, x1 - x0, self.crop
            grid = None
            if h >= 2 * size and w >= 2 * size and _taps_per_axis(h, w, size) == 2:
                # the pixel centres nearest each sample point of a 2 x 2 grid centred in each
                # output pixel's footprint: what cv2.INTER_NEAREST_EXACT picks resizing to 2 x crop
                k = np.arange(2 * size) + 0.5
                rows = y0 + np.minimum(np.floor(k * h / (2 * size)), h - 1).astype(np.int32)
                cols = x0 + np.minimum(np.floor(k * w / (2 * size)), w - 1).astype(np.int32)
                grid = np.stack([rows[0::2], rows[1::2], cols[0::2], cols[1::2]]).astype(np.int32)
            geometry = ((y0, y1, x0, x1), grid)
            if (
                len(self._geometry) >= _BOX_CACHE_SIZE
            ):  # a stream has one frame size; bound odd callers
                self._geometry.clear()
            self._geometry[(height, width)] = geometry
        return geometry


DEFAULT_CONTRACT = PreprocessContract()


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.ndim == 3 and frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    raise ValueError(
        f"frame must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), but got shape {frame.shape}"
    )


def _taps_per_axis(height: int, width: int, size: int) -> int:
    """Samples per output pixel and axis when a (height, width) region is shrunk to ``size``.

    2 (a 2x2 grid) until neighbouring samples would be more than 12 source pixels apart, which
    covers frames up to 4K for C3D (a 720p region is 630x838: 2.8 and 3.7 px apart), then 4, 8...
    """
    taps = 2
    while min(height, width) > 12 * taps * size:
        taps *= 2
    return taps


def _resize_region(region: np.ndarray, size: int) -> np.ndarray:
    """(h', w', 3) uint8 region -> (size, size, 3) uint8, antialiased when shrinking.

    Regions at least twice the output size are supersampled: nearest-neighbour samples on an
    n x n grid centred in each output pixel's footprint (n = 2, see ``_taps_per_axis``), then
    2x2 box averages (INTER_AREA by exactly 2, as many times as needed) down to ``size``. Both
    steps are OpenCV fast paths, faster than the previous bilinear-to-224 then 2x area, and far
    faster than one INTER_AREA resize (OpenCV's area filter has no fast path for non-integer
    factors); see benchmarks/RESULTS.md, 'Figures of 2026-11-26, 18:00-18:35' and 'Pipeline'
    ('Preprocessing per frame'). On real footage the
    result is within 0.03 (normalised units, mean absolute) of an exact area resize, versus 0.02
    for bilinear-then-area and 0.08 for one bilinear resize, which aliases; of white noise it
    keeps half the standard deviation (exact area a sixth, bilinear-then-area a third, one
    bilinear resize two thirds, nearest neighbour all of it).
    Smaller regions keep one resize: INTER_AREA when shrinking, INTER_LINEAR when enlarging.
    """
    h, w = region.shape[:2]
    if h >= 2 * size and w >= 2 * size:
        taps = _taps_per_axis(h, w, size)
        # (h', w', 3) -> (taps size, taps size, 3): output pixel (i, j)'s samples fill the block
        # [taps i, taps (i + 1)) x [taps j, taps (j + 1)). NEAREST_EXACT samples pixel centres, so
        # the grid sits symmetrically in each footprint (plain NEAREST would shift it left/up).
        out = cv2.resize(region, (taps * size, taps * size), interpolation=cv2.INTER_NEAREST_EXACT)
        while taps > 1:  # (2k, 2k, 3) -> (k, k, 3), averaging 2x2 blocks
            taps //= 2
            out = cv2.resize(out, (taps * size, taps * size), interpolation=cv2.INTER_AREA)
        return out
    interp = cv2.INTER_AREA if h > size else cv2.INTER_LINEAR
    return cv2.resize(region, (size, size), interpolation=interp)


def preprocess_frame(
    frame_bgr: np.ndarray,
    contract: PreprocessContract = DEFAULT_CONTRACT,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Turn one decoded frame into model input.

    Args:
        frame_bgr: uint8 frame as OpenCV decodes it: (H, W, 3) BGR; grayscale (H, W) and BGRA
            (H, W, 4) are converted.
        contract: the model's preprocessing contract.
        out: optional preallocated float32 array of shape (3, crop, crop) to write into, such as
            one frame's slot of a (3, T, crop, crop) clip buffer (any strides); saves allocating
            the result.

    Returns:
        float32 array (3, crop, crop), channels in ``contract.channel_order``, normalised
        (``out`` itself when given).
    """
    if not isinstance(frame_bgr, np.ndarray):
        raise ValueError(f"frame must be a numpy array, but got {type(frame_bgr).__name__}")
    if frame_bgr.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, but got {frame_bgr.dtype}")
    if frame_bgr.size == 0:
        raise ValueError(f"frame must not be empty, but got shape {frame_bgr.shape}")
    frame = _as_bgr(frame_bgr)
    size = contract.crop
    if out is None:
        out = np.empty((3, size, size), np.float32)
    elif out.shape != (3, size, size) or out.dtype != np.float32:
        raise ValueError(
            f"out must be float32 with shape {(3, size, size)}, but got {out.dtype} {out.shape}"
        )
    compiled = kernels.get()
    grid = contract.sample_grid(*frame.shape[:2]) if compiled is not None else None
    if (
        compiled is not None and grid is not None
    ):  # one compiled pass: samples -> normalised planes (kernels.supersample2)
        compiled.supersample2(frame, grid, contract._kernel_norm, contract._kernel_order, out)
        return out
    return _opencv_preprocess(frame, contract, out)


def _opencv_preprocess(
    frame: np.ndarray, contract: PreprocessContract, out: np.ndarray
) -> np.ndarray:
    """``preprocess_frame`` through OpenCV, for a (H, W, 3) BGR uint8 frame: the route without
    Numba, and for regions the compiled pass does not take."""
    y0, y1, x0, x1 = contract.crop_box(*frame.shape[:2])
    crop = _resize_region(
        frame[y0:y1, x0:x1], contract.crop
    )  # a view of the frame: nothing is copied
    return _normalise_into(crop, contract, out)


def _normalise_into(crop: np.ndarray, contract: PreprocessContract, out: np.ndarray) -> np.ndarray:
    """(size, size, 3) BGR uint8 crop -> ``out``, (3, size, size) float32 in the contract's
    channel order, normalised."""
    size = crop.shape[0]
    # (H, W, 3) BGR uint8 -> (3, H, W) BGR planes, uint8 (a transpose of the (H W, 3) matrix) ...
    planes = cv2.transpose(crop.reshape(size * size, 3)).reshape(3, size, size)
    if contract.channel_order == "RGB":
        planes = planes[::-1]
    # ... -> float32, normalised: x * (1 / std) + (-mean / std), per plane, written into ``out``.
    np.multiply(planes, contract._plane_scale, out=out)
    np.add(out, contract._plane_offset, out=out)
    return out
