"""The two-step resize in ``preprocess_frame`` stays close to the single INTER_AREA resize that
models (one is training now) were trained with."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from assets import vtest_path

from streamdet.preprocess import DEFAULT_CONTRACT, preprocess_frame


def _single_area_resize(frame: np.ndarray) -> np.ndarray:
    """The previous preprocessing: one INTER_AREA resize of the crop region, then normalise."""
    y0, y1, x0, x1 = DEFAULT_CONTRACT.crop_box(*frame.shape[:2])
    crop = cv2.resize(frame[y0:y1, x0:x1], (112, 112), interpolation=cv2.INTER_AREA)
    rgb = crop[:, :, ::-1].astype(np.float32)
    mean = np.asarray(DEFAULT_CONTRACT.mean, np.float32)
    std = np.asarray(DEFAULT_CONTRACT.std, np.float32)
    return ((rgb - mean) / std).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(vtest_path()))
    out = []
    for i in range(300):
        ok, frame = cap.read()
        assert ok
        if i % 30 == 0:
            out.append(frame)
    cap.release()
    return out


@pytest.mark.parametrize("size", [None, (1280, 720), (1920, 1080), (320, 240)])
def test_fast_resize_stays_within_0_05_of_single_area_resize_on_real_frames(
    frames: list[np.ndarray], size: tuple[int, int] | None
) -> None:
    """Regression: a faster resize must not shift the input distribution the model learned."""
    if size is not None:
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_CUBIC) for f in frames]
    diff = np.mean([np.abs(preprocess_frame(f) - _single_area_resize(f)).mean() for f in frames])
    assert diff < 0.05
