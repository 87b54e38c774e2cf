"""Tests of the overlay: what draw_overlay changes, and the sink thread that writes every frame."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamdet.errors import StreamdetError
from streamdet.sinks import overlay as overlay_module
from streamdet.sinks.overlay import OverlaySink, SourceView, draw_overlay

NAMES = ("none", "walk", "run")


def view(**kwargs) -> SourceView:
    defaults = {"probs": np.array([0.1, 0.7, 0.2]), "fps_in": 10.0, "inference_ms": 42.0, "latency_ms": 180.0}
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


@pytest.mark.parametrize("shape", [(120, 160), (120, 160, 1), (120, 160, 4)], ids=["gray", "gray1", "bgra"])
def test_a_grayscale_or_bgra_frame_comes_back_in_colour_at_the_same_size(shape: tuple[int, ...]) -> None:
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


def feed(sink: OverlaySink, n_frames: int, *, size: tuple[int, int] = (160, 120),
         results_first: bool = False) -> None:
    """Frames 0..n-1 of source "cam", with a window result every 8 frames from frame 15."""
    results = [(last, np.array([0.2, 0.5, 0.3])) for last in range(15, n_frames, 8)]
    if results_first:
        for last, probs in results:
            sink.add_result("cam", last, probs, 10.0, 100.0)
    for i in range(n_frames):
        sink.put_frame("cam", i, np.full((size[1], size[0], 3), i % 256, np.uint8), 10.0)
        if not results_first and results and results[0][0] <= i:
            last, probs = results.pop(0)
            sink.add_result("cam", last, probs, 10.0, 100.0)
    sink.source_ended("cam")
    sink.finish()


@pytest.mark.timeout(30)
def test_a_replay_writes_every_frame_to_the_annotated_video(tmp_path: Path) -> None:
    out = tmp_path / "annotated.avi"
    sink = OverlaySink(NAMES, video_path=str(out), display=False, sources=["cam"], lossless=frozenset({"cam"}))
    sink.start()

    feed(sink, 50)
    sink.join(20)

    assert not sink.is_alive() and sink.error is None
    assert sink.frames_written == 50 and sink.frames_dropped == 0
    written = frames_of(out)
    assert len(written) == 50
    assert {f.shape for f in written} == {(120, 160, 3)}


@pytest.mark.timeout(30)
def test_each_replayed_frame_shows_the_newest_window_ending_at_or_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: only the last 8 window results were kept per source.

    When inference ran more than 8 windows ahead of the overlay (it may: the frame queue holds
    96 frames), early frames found no result at or before them and were drawn with whatever the
    previous frame showed, so the annotated replay differed from run to run.
    """
    shown: dict[int, int] = {}
    real_draw = overlay_module.draw_overlay

    def recording_draw(frame, class_names, view, **kwargs):
        shown[int(frame[0, -1, 0])] = view.window_last_frame
        return real_draw(frame, class_names, view, **kwargs)

    monkeypatch.setattr(overlay_module, "draw_overlay", recording_draw)
    sink = OverlaySink(NAMES, video_path=None, display=False, sources=["cam"], lossless=frozenset({"cam"}),
                       max_frames=256)

    feed(sink, 200, results_first=True)  # 24 results before the first frame is drawn
    sink.start()
    sink.join(20)

    expected = {i: max([last for last in range(15, 200, 8) if last <= i], default=-1) for i in range(200)}
    assert shown == expected


def test_a_live_source_drops_frames_when_the_sink_lags_and_counts_them() -> None:
    sink = OverlaySink(NAMES, video_path=None, display=False, sources=["cam"], max_frames=3)  # not started

    for i in range(10):
        sink.put_frame("cam", i, np.zeros((120, 160, 3), np.uint8), 10.0)

    assert sink.frames_dropped == 7


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["unknown-container", "under-a-file"])
def test_a_video_that_cannot_be_written_is_a_clear_error_that_stops_the_run(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / "out.unknown-container" if where == "unknown-container" else tmp_path / "a-file" / "out.mp4"
    stop_event = threading.Event()
    sink = OverlaySink(NAMES, video_path=str(path), display=False, sources=["cam"], stop_event=stop_event)
    sink.start()

    sink.put_frame("cam", 0, np.zeros((120, 160, 3), np.uint8), 10.0)
    sink.finish()
    sink.join(10)

    assert isinstance(sink.error, StreamdetError) and "cannot write video" in str(sink.error)
    assert stop_event.is_set()
