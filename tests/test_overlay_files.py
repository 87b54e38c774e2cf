"""Annotated videos of whole runs on real files: ``sinks.overlay.top_k``.

Every clip is written here with cv2.VideoWriter (MJPG: fast to write and to read back)."""

from __future__ import annotations

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
