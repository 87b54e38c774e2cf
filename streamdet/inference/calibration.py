"""Real windows from a video file, for the start-up check against fp32 and int8 calibration."""

from __future__ import annotations

from pathlib import Path

import torch

from streamdet.errors import SourceError
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract
from streamdet.windows import video_windows


def calibration_windows(
    video: str | Path,
    n: int = 8,
    *,
    stride: int = 8,
    contract: PreprocessContract = DEFAULT_CONTRACT,
) -> torch.Tensor:
    """Up to ``n`` preprocessed windows (n, 3, 16, 112, 112) from the start of a video file.

    For ``build_engine(..., check_clips=...)``: int8 scales calibrated on the footage the model
    will see, and the fp32 check run on it. Frames are sampled with the contract's frame step,
    as capture samples them (:func:`streamdet.windows.video_windows`).

    Raises:
        ValueError: the file is missing, not a video, or shorter than one window (the caller
            falls back to random clips).
    """
    try:
        return video_windows(video, n, stride=stride, contract=contract)
    except SourceError as exc:
        raise ValueError(str(exc)) from None
