"""Tests of the overlay: what draw_overlay changes, and the sink thread that writes every frame."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamdet.errors import StreamdetError
from streamdet.sinks import overlay as overlay_module
from streamdet.sinks.overlay import OverlaySink, SourceView, check_video_path, draw_overlay
from streamdet.sources import make_opener

NAMES = ("none", "walk", "run")


def view(**kwargs) -> SourceView:
    defaults = {
        "probs": np.array([0.1, 0.7, 0.2]),
        "fps_in": 10.0,
        "inference_ms": 42.0,
        "latency_ms": 180.0,
    }
    return SourceView(**{**defaults, **kwargs})


@pytest.mark.parametrize("size", [(768, 576), (160, 120), (1920, 1080)])
def test_overlay_draws_a_panel_at_the_source_resolution(size: tuple[int, int]) -> None:
    width, height = size
    frame = np.full((height, width, 3), 200, np.uint8)

    out = draw_overlay(frame.copy(), NAMES, view(), source="cam")

    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    panel = out[: height // 8, : width // 8]
    assert (panel != 200).any(), "nothing drawn in the panel"
    assert (out[-5:, -5:] == 200).all(), "drawn outside the panel without an open event"


def test_an_open_event_frames_the_whole_picture_in_red() -> None:
    frame = np.full((240, 320, 3), 200, np.uint8)

    out = draw_overlay(frame, NAMES, view(open_events=[("walk", 0.81)]))

    assert tuple(out[-1, -1]) == (40, 40, 230)


@pytest.mark.parametrize(
    "shape", [(120, 160), (120, 160, 1), (120, 160, 4)], ids=["gray", "gray1", "bgra"]
)
def test_a_grayscale_or_bgra_frame_comes_back_in_colour_at_the_same_size(
    shape: tuple[int, ...],
) -> None:
    """Regression: a 4-channel frame was drawn on as if it had 3 channels."""
    out = draw_overlay(np.zeros(shape, np.uint8), NAMES, view())
    assert out.shape == (120, 160, 3)


def test_a_view_without_scores_yet_still_draws_the_header() -> None:
    frame = np.full((120, 160, 3), 200, np.uint8)
    out = draw_overlay(frame, NAMES, SourceView())
    assert (out[:20, :60] != 200).any()


def score_bars(frame: np.ndarray) -> int:
    """Score bars drawn on a 320x240 frame: white runs down the bars' right edge, below the header.

    At 320x240 draw_overlay's scale is 0.4: bars start at x=2, are 64 px wide, and each row is
    10 px high, the header's being the first.
    """
    edge = np.all(frame[12:, 2 + 64] == 255, axis=-1)
    return int(np.count_nonzero(edge[1:] & ~edge[:-1]) + edge[0])


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_sets_how_many_classes_get_score_bars(top_k: int) -> None:
    names = [f"class{i}" for i in range(8)]
    probs = np.linspace(0.05, 0.4, 8)

    out = draw_overlay(np.zeros((240, 320, 3), np.uint8), names, view(probs=probs), top_k=top_k)

    assert score_bars(out) == top_k


def header(frame: np.ndarray) -> np.ndarray:
    return frame[:12, :144].astype(np.int16)  # the header row of the panel at 320x240


def test_the_header_shows_the_frame_rate_it_is_given() -> None:
    """The rate drawn differs from a 0.0 fps header (test_overlay_files.py checks a run's)."""
    frame = np.full((240, 320, 3), 200, np.uint8)

    drawn = draw_overlay(frame.copy(), NAMES, view(fps_in=20.1), source="cam")
    again = draw_overlay(frame.copy(), NAMES, view(fps_in=20.1), source="cam")
    zero = draw_overlay(frame.copy(), NAMES, view(fps_in=0.0), source="cam")

    assert np.array_equal(header(drawn), header(again))
    assert not np.array_equal(header(drawn), header(zero))


def frames_of(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (result := cap.read())[0]:
        frames.append(result[1])
    cap.release()
    return frames


def write_clip(path: Path, n_frames: int, size: tuple[int, int] = (160, 120)) -> Path:
    """A real MJPG clip whose frame i is grey level i % 256."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    for i in range(n_frames):
        writer.write(np.full((size[1], size[0], 3), i % 256, np.uint8))
    writer.release()
    return path


def replay_sink(clip: Path, **kwargs) -> OverlaySink:
    """A sink replaying ``clip`` as source "cam", read through the capture's own opener."""
    return OverlaySink(
        NAMES,
        display=False,
        sources=["cam"],
        replays={"cam": make_opener(str(clip))},
        **{"video_path": None, **kwargs},
    )


def window_ends(n_frames: int) -> list[int]:
    """Last frames of the windows of an n-frame replay: one every 8 frames from frame 15."""
    return list(range(15, n_frames, 8))


def add_results(sink: OverlaySink, ends: list[int]) -> None:
    for last in ends:
        sink.add_result("cam", last, np.array([0.2, 0.5, 0.3]), 10.0, 100.0, [("walk", 0.5)])


def expected_windows(n_frames: int) -> dict[int, int]:
    """Frame -> the window it shows: the newest ending at or before it (-1: none yet)."""
    return {
        i: max([last for last in window_ends(n_frames) if last <= i], default=-1)
        for i in range(n_frames)
    }


def wait_until_drawn(sink: OverlaySink, frames: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sink.frames_written < frames and sink.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.frames_written == frames


@pytest.fixture
def recorded_views(monkeypatch: pytest.MonkeyPatch) -> list[SourceView]:
    """Every view the sink draws, in drawing order."""
    views: list[SourceView] = []
    real_draw = overlay_module.draw_overlay

    def recording_draw(frame, class_names, view, **kwargs):
        views.append(view)
        return real_draw(frame, class_names, view, **kwargs)

    monkeypatch.setattr(overlay_module, "draw_overlay", recording_draw)
    return views


@pytest.mark.timeout(30)
def test_a_replay_writes_every_frame_of_the_file_to_the_annotated_video(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi", 50)
    out = tmp_path / "annotated.avi"
    sink = replay_sink(clip, video_path=str(out))
    sink.start()

    add_results(sink, window_ends(50))
    sink.source_ended("cam")
    sink.finish()
    sink.join(20)

    assert not sink.is_alive() and sink.error is None
    assert sink.frames_written == 50 and sink.frames_dropped == 0
    assert sink.video_files == [str(out)] and sink.failed_videos == []
    written = frames_of(out)
    assert len(written) == 50
    assert {f.shape for f in written} == {(120, 160, 3)}


@pytest.mark.timeout(30)
def test_each_replayed_frame_shows_the_newest_window_ending_at_or_before_it(
    tmp_path: Path, recorded_views: list[SourceView]
) -> None:
    """Regression: only the last 8 window results were kept per source.

    When inference ran more than 8 windows ahead of the overlay, early frames found no result at
    or before them and were drawn with whatever the previous frame showed, so the annotated
    replay differed from run to run.
    """
    sink = replay_sink(write_clip(tmp_path / "clip.avi", 200))

    add_results(sink, window_ends(200))  # 24 results before the first frame is drawn
    sink.source_ended("cam")
    sink.finish()
    sink.start()
    sink.join(20)

    assert dict(enumerate(v.window_last_frame for v in recorded_views)) == expected_windows(200)


@pytest.mark.timeout(30)
def test_a_replayed_frame_waits_for_its_window_however_late_the_scores_come(
    tmp_path: Path, recorded_views: list[SourceView]
) -> None:
    """A frame is drawn once a window ending at or after it is scored, never before: drawn at
    once, frame 23 would show window 15 instead of window 23 (the scores of 23 come later)."""
    sink = replay_sink(write_clip(tmp_path / "clip.avi", 60))
    sink.start()

    for last in window_ends(60):  # while the sink reads and draws
        add_results(sink, [last])
        wait_until_drawn(sink, last + 1)  # up to the newest window's last frame, no further
    sink.source_ended("cam")
    sink.finish()
    sink.join(20)

    assert sink.frames_written == 60
    assert dict(enumerate(v.window_last_frame for v in recorded_views)) == expected_windows(60)
    assert all(v.open_events == [("walk", 0.5)] for v in recorded_views[15:])  # sent with scores


@pytest.mark.timeout(30)
def test_a_stopping_run_draws_no_more_replay_frames_and_leaves_a_playable_video(
    tmp_path: Path,
) -> None:
    out = tmp_path / "annotated.avi"
    stop_event = threading.Event()
    clip = write_clip(tmp_path / "clip.avi", 100)
    sink = replay_sink(clip, video_path=str(out), stop_event=stop_event)
    sink.start()
    add_results(sink, [15])
    wait_until_drawn(sink, 16)

    stop_event.set()  # e.g. Ctrl-C: scores may still come, the sink draws no more of the replay
    add_results(sink, window_ends(100)[1:])
    sink.source_ended("cam")
    sink.finish()
    sink.join(10)

    assert not sink.is_alive() and sink.error is None
    assert sink.frames_written == 16 and sink.video_files == [str(out)]
    assert len(frames_of(out)) == 16


@pytest.mark.timeout(30)
def test_a_live_frame_shared_with_other_outputs_is_drawn_on_a_copy(tmp_path: Path) -> None:
    frame = np.full((120, 160, 3), 77, np.uint8)
    frame.flags.writeable = False  # as the router hands it to every output
    sink = OverlaySink(NAMES, video_path=str(tmp_path / "out.mp4"), display=False, sources=["cam"])
    sink.start()
    for i in range(3):
        sink.put_frame("cam", i, frame, 10.0)
    sink.close()

    assert sink.error is None
    assert sink.frames_written == 3
    assert (frame == 77).all()  # the shared picture is untouched


def test_a_live_source_drops_frames_when_the_sink_lags_and_counts_them() -> None:
    sink = OverlaySink(
        NAMES, video_path=None, display=False, sources=["cam"], max_frames=3
    )  # not started

    for i in range(10):
        sink.put_frame("cam", i, np.zeros((120, 160, 3), np.uint8), 10.0)

    assert sink.frames_dropped == 7


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["unknown-container", "under-a-file"])
def test_a_video_that_cannot_be_written_is_a_clear_error_that_stops_only_the_overlay(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    path = (
        tmp_path / "out.unknown-container"
        if where == "unknown-container"
        else tmp_path / "a-file" / "out.mp4"
    )
    stop_event = threading.Event()
    sink = OverlaySink(
        NAMES, video_path=str(path), display=False, sources=["cam"], stop_event=stop_event
    )
    sink.start()

    sink.put_frame("cam", 0, np.zeros((120, 160, 3), np.uint8), 10.0)
    sink.finish()
    sink.join(10)

    assert isinstance(sink.error, StreamdetError) and "cannot write video" in str(sink.error)
    assert not stop_event.is_set()  # an output never stops detection: it is reported and isolated
    assert any("cannot write video" in line for line in sink.summary_lines())
    with pytest.raises(
        StreamdetError, match="cannot write video"
    ):  # what `streamdet run` refuses first
        check_video_path(path)


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_a_video_cut_short_like_on_a_full_disk_does_not_play_back_whole(
    tmp_path: Path, suffix: str
) -> None:
    whole = tmp_path / f"whole{suffix}"
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if suffix == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(whole), fourcc, 10.0, (160, 120))
    rng = np.random.default_rng(0)
    for _ in range(40):
        writer.write(rng.integers(0, 256, (120, 160, 3), np.uint8))
    writer.release()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # what a full disk leaves

    assert overlay_module.playback_problem(whole, 40) is None
    too_few = overlay_module.playback_problem(whole, 41)
    assert too_few == "the file written holds 40 of the 41 frames drawn"
    assert overlay_module.playback_problem(cut, 40) is not None
