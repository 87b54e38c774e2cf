"""Windows of a video file (streamdet.windows): the frames a run samples, preprocessed once each."""

from __future__ import annotations

import contextlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from assets import cut_clip, vtest_path

from streamdet.errors import SourceError
from streamdet.export import check_windows
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract, preprocess_frame
from streamdet.windows import video_windows

HALF_RATE = PreprocessContract(fps=5.0, frame_step=1)  # every 2nd frame of a 10 fps file


def decoded_frames(video: Path) -> list[np.ndarray]:
    """Every frame of ``video``, decoded by OpenCV in order."""
    cap = cv2.VideoCapture(str(video))
    frames = []
    while (frame := cap.read()[1]) is not None:
        frames.append(frame)
    cap.release()
    return frames


def expected_window(
    frames: list[np.ndarray], first: int, step: int, contract: PreprocessContract
) -> np.ndarray:
    """The (3, 16, 112, 112) window of 16 frames, ``step`` apart, from file frame ``first``."""
    picked = [frames[(first + i * step) % len(frames)] for i in range(16)]
    return np.stack([preprocess_frame(f, contract) for f in picked], axis=1)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 frames of vtest.avi at 160x120, 10 fps."""
    return cut_clip(
        vtest_path(),
        tmp_path_factory.mktemp("w") / "short.avi",
        start_frame=300,
        n_frames=40,
        size=(160, 120),
    )


@pytest.mark.parametrize(
    ("contract", "step"),
    [(DEFAULT_CONTRACT, 1), (HALF_RATE, 2)],
    ids=["every-frame", "frame-step-2"],
)
def test_windows_hold_the_frames_a_run_samples_at_the_stride(
    walk_clip: Path, contract: PreprocessContract, step: int
) -> None:
    frames = decoded_frames(walk_clip)
    clips = video_windows(walk_clip, 3, stride=4, skip=2, contract=contract)
    assert clips.shape == (3, 3, 16, 112, 112) and clips.dtype == torch.float32
    for i in range(3):  # skip and stride count sampled frames
        first = (2 + 4 * i) * step
        np.testing.assert_array_equal(
            clips[i].numpy(), expected_window(frames, first, step, contract)
        )


def test_a_short_video_gives_the_windows_it_has_or_loops(short_clip: Path) -> None:
    frames = decoded_frames(short_clip)
    assert len(video_windows(short_clip, 8, stride=8)) == 4  # 40 frames: windows at 0, 8, 16, 24
    looped = video_windows(short_clip, 8, stride=8, loop=True)
    assert looped.shape[0] == 8
    np.testing.assert_array_equal(
        looped[4].numpy(), expected_window(frames, 32, 1, DEFAULT_CONTRACT)
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _ten_frames(folder: Path) -> Path:
    return cut_clip(vtest_path(), folder / "tiny.avi", start_frame=0, n_frames=10, size=(160, 120))


@pytest.mark.parametrize(
    ("make", "loop", "expectation"),
    [
        (
            lambda d: d / "missing.avi",
            False,
            pytest.raises(SourceError, match=r"missing\.avi: video file not found"),
        ),
        (
            lambda d: _write(d / "junk.avi", b"\x00not a video\xff" * 200),
            False,
            pytest.raises(SourceError, match=r"junk\.avi: cannot decode video"),
        ),
        (
            _ten_frames,
            False,
            pytest.raises(SourceError, match="has 10 usable frames; a window needs 16"),
        ),
        (_ten_frames, True, contextlib.nullcontext()),
    ],
    ids=["missing", "not-a-video", "too-short", "too-short-looped"],
)
def test_a_file_without_a_window_says_why(tmp_path: Path, make, loop: bool, expectation) -> None:
    video = make(tmp_path)
    with expectation:
        assert video_windows(video, 2, loop=loop).shape == (2, 3, 16, 112, 112)


def test_export_checks_on_the_videos_first_windows_with_the_checkpoints_contract(
    walk_clip: Path,
) -> None:
    """export read its windows through its own decoder; it now reads them as a run does."""
    clips = check_windows(HALF_RATE, walk_clip, 3)
    torch.testing.assert_close(
        clips, video_windows(walk_clip, 3, stride=16, contract=HALF_RATE), rtol=0, atol=0
    )
