"""Frame preprocessing shared by training and live capture.

One definition of how a decoded frame becomes model input, so a checkpoint is always run with
the preprocessing it was trained with. The contract travels inside every checkpoint.

C3D resizes every frame to 128x171 and centre-crops 112x112. We compute the same crop without
resizing the whole frame: the source region that maps onto the centre crop is cut out first and
resized once, straight to 112x112 (about 65 us for a 720p frame instead of ~1 ms).

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

# Kinetics statistics in 0..255, RGB order (as torchvision's video models).
_KINETICS_MEAN = (110.2008, 100.6398, 95.9948)
_KINETICS_STD = (58.1489, 56.4701, 55.3324)


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
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.crop > min(self.resize):
            raise ValueError(f"crop {self.crop} must fit inside resize {self.resize}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', but got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, but got {self.mean}, {self.std}")
        if self.fps <= 0 or self.frame_step < 1:
            raise ValueError(f"fps must be > 0 and frame_step >= 1, but got {self.fps}, {self.frame_step}")
        # x_norm = (x - mean) / std  ==  x * scale + offset, with channels in BGR (OpenCV) order.
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if self.channel_order == "RGB":
            mean, std = mean[::-1], std[::-1]
        object.__setattr__(self, "_scale", (1.0 / std).astype(np.float32))
        object.__setattr__(self, "_offset", (-mean / std).astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_scale", None)
        d.pop("_offset", None)
        d["resize"] = list(self.resize)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessContract:
        known = {"resize", "crop", "channel_order", "mean", "std", "fps", "frame_step"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        kwargs = dict(d)
        for key in ("resize", "mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def step_for(self, source_fps: float) -> int:
        """Frame step for a source at ``source_fps`` so the model sees its training frame rate."""
        if not source_fps or source_fps <= 0 or not np.isfinite(source_fps):
            return self.frame_step
        return max(1, int(round(source_fps * self.frame_step / self.fps)))

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Source region (y0, y1, x0, x1) that becomes the centre crop after the C3D resize."""
        rh, rw = self.resize
        sy, sx = height / rh, width / rw
        cy0 = (rh - self.crop) / 2.0
        cx0 = (rw - self.crop) / 2.0
        y0 = int(round(cy0 * sy))
        x0 = int(round(cx0 * sx))
        y1 = max(y0 + 1, int(round((cy0 + self.crop) * sy)))
        x1 = max(x0 + 1, int(round((cx0 + self.crop) * sx)))
        return y0, min(y1, height), x0, min(x1, width)


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
    raise ValueError(f"frame must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), but got shape {frame.shape}")


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
        out: optional preallocated float32 array of shape (3, crop, crop) to write into.

    Returns:
        float32 array (3, crop, crop), channels in ``contract.channel_order``, normalised.
    """
    if frame_bgr.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, but got {frame_bgr.dtype}")
    frame = _as_bgr(frame_bgr)
    h, w = frame.shape[:2]
    y0, y1, x0, x1 = contract.crop_box(h, w)
    size = contract.crop
    # (h', w', 3) region -> (112, 112, 3); INTER_AREA when shrinking, as a full resize would.
    interp = cv2.INTER_AREA if (y1 - y0) > size else cv2.INTER_LINEAR
    crop = cv2.resize(frame[y0:y1, x0:x1], (size, size), interpolation=interp)
    if out is None:
        out = np.empty((3, size, size), np.float32)
    elif out.shape != (3, size, size) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 with shape {(3, size, size)}, but got {out.dtype} {out.shape}")
    # (H, W, 3) BGR uint8 -> (3, H, W) float32 in the contract's channel order, normalised.
    channels = cv2.split(crop)
    order = (2, 1, 0) if contract.channel_order == "RGB" else (0, 1, 2)
    for plane, bgr_index in zip(out, order):
        plane[...] = channels[bgr_index]
        plane *= contract._scale[bgr_index]
        plane += contract._offset[bgr_index]
    return out
