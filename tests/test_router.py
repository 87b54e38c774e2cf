"""The event stage: the event router and the sink protocol, on real runs of the walk clip with
the tiny fitted model, with outputs that record, hang or raise."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from tiny_model import make_tiny_weights

from streamdet.config import RunConfig, load_config
from streamdet.models.weights import Checkpoint, load_checkpoint
from streamdet.pipeline import Pipeline
from streamdet.report import format_summary
from streamdet.sinks.base import BaseSink, EventMessage, FrameMessage, SinkWorker, StatusMessage


@pytest.fixture(scope="module")
def checkpoint(assets_dir: Path, walk_clip: Path) -> Checkpoint:
    return load_checkpoint(make_tiny_weights(assets_dir, walk_clip))


def config(walk_clip: Path, events: Path, *, realtime: bool = False) -> RunConfig:
    return load_config(
        None,
        {
            "sources": [{"name": "walk", "url": str(walk_clip), "realtime": realtime}],
            "model": {"device": "cpu", "precision": "fp32"},
            "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
            "sinks": {"events": {"path": str(events)}},
            "progress_interval_s": 0.2,
        },
    )


def log_types(path: Path) -> list[str]:
    return [json.loads(line)["type"] for line in path.read_text().splitlines()]


class Recorder(BaseSink):
    """Records what it gets; on each event, what the log already held (lines, fsynced or not)."""

    name = "recorder"

    def __init__(self, events: Path, fsynced: list[int]) -> None:
        self.events_path, self.fsynced = events, fsynced
        self.events: list[tuple[str, str, int, int]] = []  # type, id, log lines then, fsyncs then
        self.statuses: list[str] = []
        self.closed = False

    def on_event(self, msg: EventMessage) -> None:
        lines = self.events_path.read_text().splitlines()
        assert msg.line is not None and json.loads(lines[-1])["seq"] >= msg.line["seq"]
        self.events.append((msg.change.type, msg.change.id, len(lines), len(self.fsynced)))

    def on_status(self, msg: StatusMessage) -> None:
        self.statuses.append(msg.status)

    def close(self) -> None:
        self.closed = True


def test_every_output_sees_each_event_after_its_log_line_is_written_and_fsynced(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
    events = tmp_path / "events.jsonl"
    recorder = Recorder(events, fsynced)

    Pipeline(
        config(walk_clip, events), checkpoint, engine, print_fn=lambda s: None, sinks=(recorder,)
    ).run()

    logged = [json.loads(line) for line in events.read_text().splitlines()]
    logged_events = [(o["type"], o["id"]) for o in logged if o["type"] != "status"]
    assert [(t, i) for t, i, _, _ in recorder.events] == logged_events  # all of them, in log order
    assert {"new", "end"} <= {t for t, _, _, _ in recorder.events}
    seen_fsyncs = [n for t, _, _, n in recorder.events if t in ("new", "end")]
    assert all(n > 0 for n in seen_fsyncs) and seen_fsyncs == sorted(seen_fsyncs)
    assert recorder.statuses == ["online", "ended"] and recorder.closed


class Hung(BaseSink):
    name = "hung"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def on_event(self, msg: EventMessage) -> None:
        self.calls += 1
        self.release.wait()  # a webhook that never answers

    def on_scores(self, msg: Any) -> None:
        self.release.wait()


class Raising(BaseSink):
    name = "raising"

    def __init__(self) -> None:
        self.calls = 0

    def on_event(self, msg: EventMessage) -> None:
        self.calls += 1
        raise ConnectionError("broker gone")


def test_a_hung_and_a_raising_output_cost_counted_drops_not_detection(
    tmp_path: Path,
    walk_clip: Path,
    checkpoint: Checkpoint,
    engine,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamdet import router as router_module

    monkeypatch.setattr(router_module, "CLOSE_TIMEOUT_S", 1.0)
    baseline_events = tmp_path / "baseline.jsonl"
    Pipeline(config(walk_clip, baseline_events), checkpoint, engine, print_fn=lambda s: None).run()
    events = tmp_path / "events.jsonl"
    hung, raising = Hung(), Raising()
    progress: list[str] = []
    try:
        started = time.monotonic()
        summary = Pipeline(
            config(walk_clip, events),
            checkpoint,
            engine,
            print_fn=progress.append,
            sinks=(hung, raising),
        ).run()
        took = time.monotonic() - started
    finally:
        hung.release.set()

    # Detection and the log are untouched: the same lines as a run without those outputs.
    assert log_types(events) == log_types(baseline_events)
    assert took < 60  # not stuck behind the hung output (its close is given up after 1 s)
    by_name = {o.name: o for o in summary.outputs}
    assert by_name["hung"].dropped > 0 and hung.calls <= 1
    assert by_name["raising"].failed and raising.calls == 1  # reported once, then isolated
    assert by_name["raising"].dropped > 0
    failures = [r for r in caplog.records if "raising failed" in r.getMessage()]
    assert len(failures) == 1 and "broker gone" in failures[0].getMessage()
    text = format_summary(summary)
    assert "output hung:" in text and "output raising:" in text and "failed" in text


def test_progress_lines_count_an_outputs_drops(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamdet import router as router_module
    from streamdet.sinks import base

    monkeypatch.setattr(router_module, "CLOSE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(base, "MAX_MESSAGES", 2)
    hung = Hung()
    progress: list[str] = []
    try:
        Pipeline(
            config(walk_clip, tmp_path / "e.jsonl", realtime=True),
            checkpoint,
            engine,
            print_fn=progress.append,
            sinks=(hung,),
        ).run()
    finally:
        hung.release.set()
    assert any("output drops: hung " in line for line in progress), progress


class FrameCounter(BaseSink):
    name = "frames"

    def __init__(self, sources: list[str]) -> None:
        self.sources, self.frames = sources, 0

    def frame_sources(self) -> list[str]:
        return self.sources

    def on_frame(self, msg: FrameMessage) -> None:
        self.frames += 1


@pytest.mark.parametrize("subscribed", [True, False])
def test_frames_are_decoded_and_sent_only_for_sources_an_output_subscribes_to(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine, subscribed: bool
) -> None:
    counter = FrameCounter(["walk"] if subscribed else [])
    pipeline = Pipeline(
        config(walk_clip, tmp_path / "e.jsonl", realtime=True),
        checkpoint,
        engine,
        print_fn=lambda s: None,
        sinks=(counter,),
    )
    assert (
        pipeline.captures[0].on_frame is not None
    ) is subscribed  # otherwise frames skip decoding
    pipeline.run()
    assert (counter.frames > 0) is subscribed


class Choosy(FrameCounter):
    """Wants the model's frames only (as snapshots do), or every frame (as the overlay does)."""

    def __init__(self, sources: list[str], *, model_frames_only: bool) -> None:
        super().__init__(sources)
        self.model_frames_only = model_frames_only
        self.indexes: list[int] = []

    def wants_frame(self, source: str, used: bool) -> bool:
        return used or not self.model_frames_only

    def on_frame(self, msg: FrameMessage) -> None:
        super().on_frame(msg)
        self.indexes.append(msg.index)


def test_an_output_gets_only_the_frames_it_wants_and_unwanted_ones_are_not_converted(
    tmp_path: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 30-fps file: the model uses every third frame. An output that wants only those gets
    only those, and alone it has the other two skipped undecoded; one that wants every frame
    beside it gets every frame."""
    clip = tmp_path / "cam30.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"MJPG"), 30.0, (160, 120))
    for i in range(60):
        writer.write(np.full((120, 160, 3), (i * 4) % 256, np.uint8))
    writer.release()

    def run(*sinks: Choosy) -> Pipeline:
        cfg = config(clip, tmp_path / "e.jsonl", realtime=True)
        pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda s: None, sinks=sinks)
        pipeline.run()
        return pipeline

    alone = Choosy(["walk"], model_frames_only=True)
    converted: list[int] = []
    original = Pipeline._on_frame

    def counting(self: Pipeline, source: str, meta: Any, frame: Any, used: bool) -> None:
        converted.append(meta.index)
        original(self, source, meta, frame, used)

    with monkeypatch.context() as m:
        m.setattr(Pipeline, "_on_frame", counting)
        run(alone)
    assert alone.indexes == list(range(0, 60, 3))
    assert converted == alone.indexes  # the model's frames only reached the outputs' callback

    picky, greedy = (
        Choosy(["walk"], model_frames_only=True),
        Choosy(["walk"], model_frames_only=False),
    )
    run(picky, greedy)
    assert picky.indexes == list(range(0, 60, 3))
    assert greedy.indexes == list(range(60))


class Scribbler(BaseSink):
    """An output that draws on the frames it gets, as a careless one would."""

    name = "scribbler"

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.seen = threading.Event()

    def frame_sources(self) -> list[str]:
        return ["walk"]

    def on_frame(self, msg: FrameMessage) -> None:
        try:
            msg.frame[0, 0] = 255
        except ValueError as exc:
            self.errors.append(str(exc))
        self.seen.set()


@pytest.mark.timeout(60)
def test_frames_shared_by_outputs_are_read_only(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    scribbler = Scribbler()
    cfg = config(walk_clip, tmp_path / "events.jsonl", realtime=True)
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda s: None, sinks=(scribbler,))
    pipeline.run()

    assert scribbler.seen.is_set()
    assert scribbler.errors and all("read-only" in e for e in scribbler.errors)


def test_a_sink_worker_never_blocks_the_caller_and_counts_what_it_drops() -> None:
    hung = Hung()
    worker = SinkWorker(hung, max_messages=3)
    try:
        started = time.monotonic()
        for _ in range(50):
            worker.offer_event(EventMessage(change=None, line=None, latency_ms=None))  # type: ignore[arg-type]
        assert time.monotonic() - started < 1.0  # offers never wait
        assert worker.dropped == 50 - 3  # the queue holds 3
        worker.start()
        deadline = time.monotonic() + 10
        while hung.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hung.calls == 1  # and it hangs there
        assert worker.close(timeout=0.2) is False  # given up, left to end with the process
        assert worker.dropped == 50 - 1  # the 2 it still held were never delivered
    finally:
        hung.release.set()
    assert worker.closed.wait(10)
