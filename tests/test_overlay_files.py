"""Annotated videos of whole runs on real files: high frame rates, a full disk, the header's
frame rate, and ``sinks.overlay.top_k``.

Every clip is written here with cv2.VideoWriter (MJPG: fast to write and to read back).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from assets import frame_count
from test_overlay import score_bars
from threads import run_in_thread

from streamdet.config import RunConfig, load_config
from streamdet.models.weights import Checkpoint, save_checkpoint
from streamdet.pipeline import Pipeline
from streamdet.sinks import overlay as overlay_module
from streamdet.sinks.overlay import SourceView

STRIDE = 8  # the config's default window stride, in frames the model sees


def write_clip(path: Path, n_frames: int, fps: float, size: tuple[int, int] = (128, 96)) -> Path:
    """A real clip of a bar sweeping across, with ``fps`` in its header."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n_frames):
        frame = np.full((height, width, 3), 40, np.uint8)
        x = (i * 3) % width
        frame[:, x : x + 8] = (60 + i % 190, 200, 255)
        writer.write(frame)
    writer.release()
    return path


def window_ends(n_frames: int, step: int) -> list[int]:
    """Last frames of a replay's windows: every ``step``-th frame is used, 16 to a window."""
    used = list(range(0, n_frames, step))
    return [used[k] for k in range(15, len(used), STRIDE)]


def config(source: Path, tmp_path: Path, *, realtime: bool = False, **overlay: Any) -> RunConfig:
    """One file source; thresholds 0, so every window holds an open event."""
    return load_config(
        None,
        {
            "sources": [{"name": "clip", "url": str(source), "realtime": realtime}],
            "model": {"device": "cpu", "precision": "fp32", "max_batch": 4},
            "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
            "sinks": {
                "events": {"path": str(tmp_path / "events.jsonl")},
                "overlay": {"video": str(tmp_path / "annotated.avi"), **overlay},
            },
            "progress_interval_s": 0.5,
        },
    )


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def held_overlay(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[SourceView]]:
    """The overlay draws nothing until the event is set; then it records each view it draws."""
    release = threading.Event()
    views: list[SourceView] = []
    real_draw = overlay_module.draw_overlay

    def held_draw(frame, class_names, view, **kwargs):
        release.wait(90)
        views.append(view)
        return real_draw(frame, class_names, view, **kwargs)

    monkeypatch.setattr(overlay_module, "draw_overlay", held_draw)
    return release, views


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("fps", "n_frames"), [(240, 960), (1000, 2600)], ids=["240fps", "1000fps"])
def test_a_high_frame_rate_replay_is_detected_while_its_annotated_video_is_held_back(
    tmp_path: Path, checkpoint: Checkpoint, engine, held_overlay, fps: int, n_frames: int
) -> None:
    """Regression: detection waited for the overlay.

    The overlay held a replayed frame until the window covering it was scored, in a queue of 96
    frames; at 240 fps a window spans 384 frames, so capture, and with it detection, advanced
    one frame per 0.2 s wait (a 10 s clip took 56 s; at 1000 fps nothing was scored for minutes).
    Here the overlay draws nothing at all until every window has been scored.
    """
    release, views = held_overlay
    clip = write_clip(tmp_path / f"clip{fps}.avi", n_frames, fps)
    step = checkpoint.contract.step_for(fps)  # 24 and 100: the model sees 10 frames a second
    ends = window_ends(n_frames, step)
    pipeline = Pipeline(config(clip, tmp_path), checkpoint, engine, print_fn=lambda line: None)
    thread, outcome = run_in_thread(pipeline)
    try:
        assert wait_for(lambda: pipeline.inference.all_done, 90), "detection waited for the overlay"
        assert [c.on_frame for c in pipeline.captures] == [None], "frames handed to the overlay"
        assert pipeline.inference.windows_done == len(ends) >= 2
        events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert any(o["type"] == "new" for o in events), "events are written as windows are scored"
        assert thread.is_alive(), "the run waits for its annotated video"
    finally:
        release.set()
    thread.join(90)

    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary.windows == len(ends) and summary.events >= 1
    assert summary.videos == [str(tmp_path / "annotated.avi")] and summary.videos_failed == []
    assert frame_count(tmp_path / "annotated.avi") == n_frames
    # Each frame shows the newest window ending at or before it.
    assert [v.window_last_frame for v in views] == [
        max([e for e in ends if e <= i], default=-1) for i in range(n_frames)
    ]


@pytest.mark.timeout(120)
def test_a_run_stopped_while_its_annotated_video_lags_stops_at_once_with_a_playable_video(
    tmp_path: Path, checkpoint: Checkpoint, engine, held_overlay
) -> None:
    release, views = held_overlay
    clip = write_clip(tmp_path / "clip.avi", 960, 240)
    pipeline = Pipeline(config(clip, tmp_path), checkpoint, engine, print_fn=lambda line: None)
    thread, outcome = run_in_thread(pipeline)
    try:
        assert wait_for(lambda: pipeline.inference.all_done, 90), "detection waited for the overlay"
        pipeline.stop("test")  # e.g. Ctrl-C while the video is being finished
    finally:
        release.set()
    thread.join(10)

    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    video = tmp_path / "annotated.avi"
    assert outcome["summary"].videos == [str(video)]
    assert 0 < frame_count(video) == len(views) < 960


@pytest.mark.timeout(90)
def test_the_header_of_a_run_shows_the_measured_capture_rate(
    tmp_path: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the header said 0.0 fps while the progress line said 20.1 fps: the capture's
    measured rate never reached the overlay."""
    drawn: list[tuple[np.ndarray, SourceView]] = []
    real_draw = overlay_module.draw_overlay

    def recording_draw(frame, class_names, view, **kwargs):
        drawn.append((frame.copy(), view))
        return real_draw(frame, class_names, view, **kwargs)

    monkeypatch.setattr(overlay_module, "draw_overlay", recording_draw)
    # 3 s paced at 20 fps, as a camera would deliver them
    clip = write_clip(tmp_path / "clip.avi", 60, 20, size=(320, 240))
    summary = Pipeline(
        config(clip, tmp_path, realtime=True), checkpoint, engine, print_fn=lambda line: None
    ).run()

    assert summary.videos == [str(tmp_path / "annotated.avi")]
    source_frame, view = drawn[-1]
    assert 10 < view.fps_in < 40, f"the header shows {view.fps_in:.1f} fps for a 20 fps source"
    # Read back: the video's last frame is the one drawn with that rate, not with 0.0 fps.
    cap = cv2.VideoCapture(str(tmp_path / "annotated.avi"))
    cap.set(cv2.CAP_PROP_POS_FRAMES, len(drawn) - 1)
    ok, written = cap.read()
    cap.release()
    assert ok
    expected = real_draw(source_frame.copy(), checkpoint.class_names, view, top_k=3, source="clip")
    zero_view = dataclasses.replace(view, fps_in=0.0)
    zero = real_draw(source_frame.copy(), checkpoint.class_names, zero_view, top_k=3, source="clip")

    def header_distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a[:12, :144].astype(np.int16) - b[:12, :144]).mean())

    assert header_distance(written, expected) < header_distance(written, zero) / 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("top_k", [1, 2])
def test_sinks_overlay_top_k_sets_how_many_classes_get_score_bars(
    tmp_path: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch, top_k: int
) -> None:
    drawn: list[np.ndarray] = []
    real_draw = overlay_module.draw_overlay

    def recording_draw(frame, class_names, view, **kwargs):
        out = real_draw(frame, class_names, view, **kwargs)
        drawn.append(out.copy())
        return out

    monkeypatch.setattr(overlay_module, "draw_overlay", recording_draw)
    clip = write_clip(tmp_path / "clip.avi", 40, 10, size=(320, 240))

    cfg = config(clip, tmp_path, top_k=top_k)

    Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None).run()

    assert score_bars(drawn[0]) == 0, "no scores before the first window"
    assert score_bars(drawn[-1]) == top_k  # the model has 3 classes


FULL_DISK_RUN = """
import resource, signal, sys
from streamdet import kernels
from streamdet.cli import main
kernels.get()  # compiled (and cached on disk) before the disk fills
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # the disk is full at 20 kB
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_an_annotated_video_cut_short_by_a_full_disk_is_removed_and_reported(
    tmp_path: Path, checkpoint: Checkpoint
) -> None:
    """Regression: OpenCV's VideoWriter reports no write error: the run ended normally and the
    summary named an MP4 without its index (no moov atom) that nothing could play."""
    weights = tmp_path / "tiny.safetensors"
    save_checkpoint(weights, checkpoint.model, class_names=checkpoint.class_names)
    clip = write_clip(tmp_path / "clip.avi", 100, 10, size=(320, 240))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "clip", "url": str(clip), "realtime": False}],
                "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
            }
        )
    )
    events, video = tmp_path / "events.jsonl", tmp_path / "annotated.mp4"
    # A real failing write: the child process may not grow any file past 20 kB (the event log
    # fits; the video, about 200 kB, does not).
    args = ["run", str(cfg), "--events", str(events), "--output-video", str(video)]
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RUN, *args], capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr[-2000:]
    why = (
        f"{video}: the file written does not open as a video; is the disk full? "
        f"The partial file was removed."
    )
    assert f"annotated video not written: {why}" in done.stderr
    assert f"[summary] annotated video not written: {why}\n" in done.stdout
    assert f"[summary] annotated video: {video}" not in done.stdout
    assert not video.exists()
    assert "[summary] clip: 100 frames read" in done.stdout  # detection itself was whole
