"""Tests of the sources package's decisions: each source's pacing and where it goes, the
watchdog's rules, and the docstring examples of its modules.

How capture behaves under each pacing (a paced file read at its fps, a replay stamped on the
file's timeline and waiting for a slow reader) is tested in test_capture.py; here, that the one
pacing decided per source is what the ring, the capture, the scheduler and the overlay get.
"""

from __future__ import annotations

import contextlib
import doctest
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

import streamdet.sources.backoff
import streamdet.sources.opening
import streamdet.sources.pacing
import streamdet.sources.watchdog
from streamdet.buffer import RingBuffer
from streamdet.config import SourceConfig, load_config
from streamdet.models.weights import Checkpoint
from streamdet.pipeline import Pipeline
from streamdet.preprocess import PreprocessContract
from streamdet.sources import CaptureThread, Pacing, SourceKind, pacing_of
from streamdet.sources.watchdog import Phase, Progress, StallWatch


@pytest.mark.parametrize(
    ("url", "realtime", "expected"),
    [
        ("0", None, Pacing.LIVE),
        ("rtsp://10.0.0.5/stream1", None, Pacing.LIVE),
        ("rtsp://10.0.0.5/stream1", False, Pacing.LIVE),  # realtime is for files only
        ("https://example.com/live.m3u8", True, Pacing.LIVE),
        ("clip.mp4", None, Pacing.REPLAY),  # a file's default: as fast as possible
        ("clip.mp4", False, Pacing.REPLAY),
        ("clip.mp4", True, Pacing.PACED),
        ("file:///videos/clip.mp4", True, Pacing.PACED),
    ],
)
def test_pacing_of_a_source_follows_its_kind_and_realtime(
    url: str, realtime: bool | None, expected: Pacing
) -> None:
    assert pacing_of(SourceConfig(name="s", url=url, realtime=realtime)) is expected


@pytest.mark.parametrize(
    ("pacing", "lossless", "decode_threads"),
    [
        (Pacing.LIVE, False, None),
        (Pacing.PACED, False, None),
        (Pacing.REPLAY, True, 1),
    ],
)
def test_only_a_replay_is_lossless_and_decodes_on_one_thread(
    pacing: Pacing, lossless: bool, decode_threads: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert (pacing.lossless, pacing.decode_threads(sources=3)) == (lossless, decode_threads)


@pytest.mark.parametrize("pacing", list(Pacing))
def test_every_source_decodes_on_one_thread_once_a_run_has_as_many_sources_as_cores(
    pacing: Pacing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their decoders already share every core: frame threading would only add switches."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert pacing.decode_threads(sources=4) == pacing.decode_threads(sources=27) == 1


def pipeline_of(
    sources: list[dict[str, Any]], checkpoint: Checkpoint, engine, tmp_path: Path
) -> Pipeline:
    """A pipeline built (not run) with an annotated video, so the overlay is wired too."""
    cfg = load_config(
        None,
        {
            "sources": sources,
            "model": {"device": "cpu", "precision": "fp32"},
            "sinks": {
                "events": {"path": None},
                "overlay": {"video": str(tmp_path / "annotated.mp4")},
            },
        },
    )
    return Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None)


def test_each_sources_pacing_reaches_its_ring_capture_the_scheduler_and_the_overlay(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    paced = tmp_path / "paced.avi"
    shutil.copyfile(walk_clip, paced)
    pipeline = pipeline_of(
        [
            {"name": "cam", "url": "rtsp://127.0.0.1:9/cam"},
            {"name": "paced", "url": str(paced), "realtime": True},
            {"name": "replay", "url": str(walk_clip), "realtime": False},
        ],
        checkpoint,
        engine,
        tmp_path,
    )

    assert pipeline.pacing == {"cam": Pacing.LIVE, "paced": Pacing.PACED, "replay": Pacing.REPLAY}
    assert {c.source_name: c.pacing for c in pipeline.captures} == pipeline.pacing
    # Only the replay's ring makes its capture wait; only the replay is taken window by window.
    assert {r.name: r.lossless for r in pipeline.rings} == {
        "cam": False,
        "paced": False,
        "replay": True,
    }
    assert pipeline.inference.newest_only == {"cam", "paced"}
    assert not pipeline.inference.fixed_batch  # live sources: batches as they come
    # The overlay reads the replay itself; the others' frames come from their capture.
    assert pipeline.overlay is not None
    assert sorted(pipeline.overlay.frame_sources()) == ["cam", "paced"]
    assert {c.source_name: c.on_frame is not None for c in pipeline.captures} == {
        "cam": True,
        "paced": True,
        "replay": False,
    }


def test_a_run_of_replays_alone_takes_every_window_at_one_batch_size(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    pipeline = pipeline_of(
        [{"name": "replay", "url": str(walk_clip)}], checkpoint, engine, tmp_path
    )

    assert pipeline.pacing == {"replay": Pacing.REPLAY}
    assert pipeline.inference.newest_only == frozenset()
    assert pipeline.inference.fixed_batch


@pytest.mark.parametrize(
    ("kind", "pacing", "expectation"),
    [
        (SourceKind.CAMERA, Pacing.LIVE, contextlib.nullcontext()),
        (SourceKind.STREAM, Pacing.LIVE, contextlib.nullcontext()),
        (SourceKind.FILE, Pacing.PACED, contextlib.nullcontext()),
        (SourceKind.FILE, Pacing.REPLAY, contextlib.nullcontext()),
        (
            SourceKind.STREAM,
            Pacing.REPLAY,
            pytest.raises(ValueError, match="stream source cannot be"),
        ),
        (
            SourceKind.CAMERA,
            Pacing.PACED,
            pytest.raises(ValueError, match="camera source cannot be"),
        ),
        (SourceKind.FILE, Pacing.LIVE, pytest.raises(ValueError, match="file source cannot be")),
    ],
)
def test_a_capture_refuses_a_pacing_its_kind_cannot_have(
    kind: SourceKind, pacing: Pacing, expectation
) -> None:
    ring = RingBuffer("src", length=16, stride=8, frame_shape=(3, 8, 8), lossless=pacing.lossless)
    with expectation:
        CaptureThread(
            "src",
            lambda: None,
            ring,
            PreprocessContract(),
            threading.Event(),
            kind=kind,
            pacing=pacing,
        )


def test_the_watchdog_finds_a_session_stuck_only_past_its_phases_limit() -> None:
    watch = StallWatch(stall_timeout_s=5.0, open_timeout_s=2.0, read_timeout_s=1.0)
    progress = Progress()  # opening: stuck past the open timeout and OPEN_GRACE_S (5 s)
    assert watch.stuck(progress, progress.phase_started + 6.9) is None
    opening = watch.stuck(progress, progress.phase_started + 7.1)
    assert opening is not None and opening.reason == "stalled: open blocked for 7.1 s"
    progress.enter(Phase.READING)
    progress.beat(progress.heartbeat + 10.0)  # a frame came: the stall clock restarts
    assert watch.stuck(progress, progress.heartbeat + 4.9) is None
    reading = watch.stuck(progress, progress.heartbeat + 5.1)
    assert reading is not None and reading.reason == "stalled: no frame for 5.1 s"
    progress.enter(Phase.RELEASING)  # stuck past RELEASE_GRACE_S (5 s)
    releasing = watch.stuck(progress, progress.phase_started + 5.1)
    assert releasing is not None and releasing.reason == "stalled: release blocked for 5.1 s"
    # A read that ran into 90% of its 1 s timeout is a stall.
    assert watch.slow_read(started=0.0, now=0.85) is None
    slow = watch.slow_read(started=0.0, now=0.92)
    assert slow is not None and slow.reason == "stalled: a read blocked 0.9 s"


def test_a_source_that_does_not_reconnect_is_never_found_stuck() -> None:
    watch = StallWatch(stall_timeout_s=None, open_timeout_s=2.0, read_timeout_s=None)
    progress = Progress()
    assert watch.stuck(progress, progress.phase_started + 1e6) is None
    assert watch.slow_read(started=0.0, now=1e6) is None


@pytest.mark.parametrize(
    "module",
    [
        streamdet.sources.opening,
        streamdet.sources.pacing,
        streamdet.sources.backoff,
        streamdet.sources.watchdog,
    ],
    ids=lambda module: module.__name__,
)
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
