"""Windows of a video file as model input: the frames a model would see, preprocessed once each.

One function for every place that needs real windows without running the pipeline: the start-up
check of reduced precision and int8 calibration, ``streamdet export``'s check, the benchmarks.
The file is read through :class:`~streamdet.sources.OpenCVSource`, as capture reads it (FFmpeg
kept quiet, the same reasons when it cannot be opened), sampled with the checkpoint's frame
step for the video's frame rate, as capture samples it.

Example:
    >>> clips = video_windows("tests/.assets/vtest.avi", 2, stride=8)  # doctest: +SKIP
    >>> tuple(clips.shape)  # doctest: +SKIP
    (2, 3, 16, 112, 112)
"""

from __future__ import annotations

import os

import numpy as np
import torch

from streamdet.errors import SourceError
from streamdet.models.c3d import CLIP_LENGTH
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract, preprocess_frame
from streamdet.sources import OpenCVSource


def video_windows(
    video: str | os.PathLike[str],
    n: int,
    *,
    stride: int = 8,
    skip: int = 0,
    contract: PreprocessContract = DEFAULT_CONTRACT,
    loop: bool = False,
) -> torch.Tensor:
    """``n`` windows (n, 3, 16, crop, crop) of ``video``, a new one every ``stride`` frames.

    Args:
        video: a video file.
        n: windows wanted.
        stride: sampled frames from one window's start to the next one's.
        skip: sampled frames left out at the start.
        contract: the checkpoint's preprocessing contract (frame step, resize, crop, mean/std).
        loop: at the end of the video, start again from its first frame until there are ``n``
            windows; without it, a shorter video gives the windows it has (at least one).

    Frames are counted after sampling: with a frame step of 2, ``stride=8`` is 16 frames of
    the file. Each sampled frame is preprocessed once, however many windows hold it.

    Raises:
        SourceError: the file is missing or not a video, or it has too few frames for one
            window (without ``loop``) or none at all.
    """
    if n < 1 or stride < 1 or skip < 0:
        raise ValueError(
            f"need n >= 1, stride >= 1 and skip >= 0, but got n={n}, stride={stride}, skip={skip}"
        )
    need = skip + CLIP_LENGTH + (n - 1) * stride
    frames = _sampled_frames(video, need, contract)
    if loop and frames:
        frames = [frames[i % len(frames)] for i in range(need)]
    frames = frames[skip:]
    if len(frames) < CLIP_LENGTH:
        raise SourceError(f"{video} has {len(frames)} usable frames; a window needs {CLIP_LENGTH}")
    count = min(n, (len(frames) - CLIP_LENGTH) // stride + 1)
    stack = np.stack(frames, axis=1)  # T x (3, crop, crop) -> (3, T, crop, crop)
    windows = [stack[:, i * stride : i * stride + CLIP_LENGTH] for i in range(count)]
    return torch.from_numpy(np.stack(windows))  # (count, 3, 16, crop, crop)


def _sampled_frames(
    video: str | os.PathLike[str], limit: int, contract: PreprocessContract
) -> list[np.ndarray]:
    """Up to ``limit`` preprocessed (3, crop, crop) frames from the start of ``video``, one every
    frame step; frames between them are skipped without being converted."""
    source = OpenCVSource(str(video))
    step = contract.step_for(source.fps or 0.0)
    frames: list[np.ndarray] = []
    index = 0
    try:
        while len(frames) < limit:
            if index % step == 0:
                frame = source.read()
                if frame is None:
                    break
                frames.append(preprocess_frame(frame, contract))
            elif not source.skip():
                break
            index += 1
    finally:
        source.release()
    return frames
