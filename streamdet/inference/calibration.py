"""Real windows from a video file, for the start-up check against fp32 and int8 calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from streamdet.errors import SourceError
from streamdet.models.c3d import INPUT_SHAPE
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract, preprocess_frame
from streamdet.sources import OpenCVSource


def calibration_windows(video: str | Path, n: int = 8, *, stride: int = 8,
                        contract: PreprocessContract = DEFAULT_CONTRACT) -> torch.Tensor:
    """``n`` preprocessed windows (n, 3, 16, 112, 112) from the start of a video file.

    For ``build_engine(..., check_clips=...)``: int8 scales calibrated on the footage the model
    will see, and the fp32 check run on it. Frames are sampled with the contract's frame step.
    """
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
