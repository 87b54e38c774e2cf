"""Annotated videos of whole runs on real files: the header's frame rate and
``sinks.overlay.top_k``.

Every clip is written here with cv2.VideoWriter (MJPG: fast to write and to read back)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_overlay import score_bars

from streamdet.config import RunConfig, load_config
from streamdet.models.weights import Checkpoint
from streamdet.pipeline import Pipeline
from streamdet.sinks import overlay as overlay_module
from streamdet.sinks.overlay import SourceView


def write_clip(path: Path, n_frames: int, fps: float, size: tuple[int, int] = (128, 96)) -> Path:
    """A real clip of a bar sweeping across, with ``fps`` in its header."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n_frames):
        frame = np.full((height, width, 3), 40, np.uint8)
        x = (i * 3) % width
        frame[:, x:x + 8] = (60 + i % 190, 200, 255)
        writer.write(frame)
    writer.release()
    return path


def config(source: Path, tmp_path: Path, *, realtime: bool = False, **overlay: Any) -> RunConfig:
    """One file source; thresholds 0, so every window holds an open event."""
    return load_config(None, {
        "sources": [{"name": "clip", "url": str(source), "realtime": realtime}],
        "model": {"device": "cpu", "precision": "fp32", "max_batch": 4},
        "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
        "sinks": {"events": {"path": str(tmp_path / "events.jsonl")},
                  "overlay": {"video": str(tmp_path / "annotated.avi"), **overlay}},
        "progress_interval_s": 0.5,
    })


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
    summary = Pipeline(config(clip, tmp_path, realtime=True), checkpoint, engine,
                       print_fn=lambda line: None).run()

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
