"""Stream loss and recovery against a real RTSP server, and the capture watchdog.

The pipeline runs in this process with a tiny random C3D_BN (width 0.0625) and thresholds of 0,
so every window of a source opens or continues events: events resume exactly when windows do.
Sources use small timeouts and backoff (0.2 s doubling to 1 s) so that many outages fit in a
test. The watchdog tests at the end use fake sources whose reads block forever.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamdet.capture as capture_module
from streamdet.buffer import RingBuffer
from streamdet.capture import (
    AbandonedThreads,
    Backoff,
    CaptureThread,
    Status,
    StatusChange,
    StuckThreadsError,
)
from streamdet.config import RunConfig, load_config
from streamdet.models.weights import Checkpoint
from streamdet.pipeline import Pipeline
from streamdet.preprocess import PreprocessContract
from streamdet.sources import SourceKind

FAST_OPTIONS = {"open_timeout_s": 2.0, "read_timeout_s": 1.0, "stall_timeout_s": 2.0,
                "backoff_initial_s": 0.2, "backoff_max_s": 1.0}


def stream_config(urls: dict[str, str], events_path: Path, **options: Any) -> RunConfig:
    """Live sources with small timeouts and backoff; every window makes or continues events."""
    return load_config(None, {
        "sources": [{"name": name, "url": url, "options": {**FAST_OPTIONS, **options}}
                    for name, url in urls.items()],
        "model": {"device": "cpu", "precision": "fp32", "max_batch": 2},
        "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1,
                   "update_min_interval_s": 60.0},
        "sinks": {"events": {"path": str(events_path)}},
        "progress_interval_s": 60.0,
    })


class RunningPipeline:
    """A pipeline run in a background thread, with helpers to wait on its event log."""

    def __init__(self, pipeline: Pipeline, events_path: Path) -> None:
        self.pipeline = pipeline
        self.events_path = events_path
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="test-pipeline", daemon=True)

    def _run(self) -> None:
        try:
            self.outcome["summary"] = self.pipeline.run()
        except BaseException as exc:
            self.outcome["error"] = exc

    def __enter__(self) -> RunningPipeline:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipeline.stop("test over")
        self.thread.join(10)
        assert not self.thread.is_alive(), "the pipeline did not stop within 10 s"

    def lines(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self.lines())
            if result:
                return result
            assert "error" not in self.outcome, f"the run failed: {self.outcome['error']!r}"
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; log tail: {self.lines()[-5:]}")
            time.sleep(0.05)

    def wait_status(self, source: str, status: str, timeout: float, what: str) -> dict[str, Any]:
        """Waits until ``source``'s latest status line says ``status``; returns that line."""
        return self.wait_for(lambda ls: (s := last_status(ls, source)) and s["status"] == status and s,
                             timeout=timeout, what=what)


def statuses(lines: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    return [o for o in lines if o["type"] == "status" and o["source"] == source]


def events_after(lines: list[dict[str, Any]], seq: int, source: str) -> list[dict[str, Any]]:
    return [o for o in lines if o["type"] == "new" and o["source"] == source and o["seq"] > seq]


def last_status(lines: list[dict[str, Any]], source: str) -> dict[str, Any] | None:
    found = statuses(lines, source)
    return found[-1] if found else None


def check_every_event_ends_once(lines: list[dict[str, Any]]) -> dict[str, str]:
    news = [o["id"] for o in lines if o["type"] == "new"]
    ends = [o["id"] for o in lines if o["type"] == "end"]
    assert sorted(news) == sorted(set(news)) and sorted(ends) == sorted(set(ends))
    assert set(news) == set(ends)
    return {o["id"]: o["end_reason"] for o in lines if o["type"] == "end"}


# -- against the real RTSP server -------------------------------------------------------------


@pytest.mark.timeout(150)
def test_ten_server_kills_and_restarts_each_come_back_online_within_5_s_with_events(
    tmp_path: Path, rtsp_server, checkpoint: Checkpoint, engine
) -> None:
    server = rtsp_server(pattern=True)
    events = tmp_path / "events.jsonl"
    pipeline = Pipeline(stream_config({"cam": server.url}, events), checkpoint, engine, print_fn=lambda s: None)

    with RunningPipeline(pipeline, events) as run:
        for cycle in range(10):
            online = run.wait_status("cam", "online", timeout=15 if cycle == 0 else 5,
                                     what=f"online status (cycle {cycle})")
            run.wait_for(lambda ls, seq=online["seq"]: events_after(ls, seq, "cam"), timeout=10,
                         what=f"event after reconnect (cycle {cycle})")
            server.kill()
            run.wait_status("cam", "offline", timeout=3, what=f"offline status after the kill (cycle {cycle})")
            server.start()
        run.wait_status("cam", "online", timeout=5, what="final online")

    lines = run.lines()
    assert "error" not in run.outcome
    cam = [s["status"] for s in statuses(lines, "cam")]
    assert cam == ["online", "offline"] * 10 + ["online"]
    ends = check_every_event_ends_once(lines)
    lost = [o for o in lines if o["type"] == "end" and o["end_reason"] == "stream_lost"]
    assert len(lost) >= 10 and set(ends.values()) <= {"stream_lost", "shutdown"}
    summary = run.outcome["summary"].sources[0]
    assert summary.reconnects >= 10 and summary.offline_s > 0


@pytest.mark.timeout(60)
def test_a_hung_server_goes_offline_within_the_stall_time_and_recovers_after_it_resumes(
    tmp_path: Path, rtsp_server, checkpoint: Checkpoint, engine
) -> None:
    server = rtsp_server(pattern=True)
    events = tmp_path / "events.jsonl"
    pipeline = Pipeline(stream_config({"cam": server.url}, events), checkpoint, engine, print_fn=lambda s: None)

    with RunningPipeline(pipeline, events) as run:
        online = run.wait_status("cam", "online", timeout=15, what="online status")
        run.wait_for(lambda ls: events_after(ls, online["seq"], "cam"), timeout=10, what="first event")
        server.pause()
        paused = time.monotonic()
        run.wait_status("cam", "offline", timeout=6, what="offline")
        offline_after = time.monotonic() - paused
        time.sleep(1.0)  # a few reopen attempts against the frozen server
        server.resume()
        resumed = time.monotonic()
        back = run.wait_status("cam", "online", timeout=15, what="online after resume")
        online_after = time.monotonic() - resumed
        run.wait_for(lambda ls: events_after(ls, back["seq"], "cam"), timeout=10, what="event after resume")

    # stall_timeout_s is 2 s: the watchdog (or the 1 s read timeout) must notice within it.
    assert offline_after < 2.0 + 0.5, f"offline only {offline_after:.1f} s after the hang"
    assert online_after < 10, f"back online {online_after:.1f} s after resume"
    lines = run.lines()
    offline = [s for s in statuses(lines, "cam") if s["status"] == "offline"][0]
    assert offline["reason"].startswith("stalled")
    ends = check_every_event_ends_once(lines)
    assert "stream_lost" in ends.values()
    assert run.outcome["summary"].sources[0].stalls >= 1


def record_opens(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Monotonic start times of every open the pipeline's captures attempt (real opens)."""
    starts: list[float] = []
    real_source = capture_module.OpenCVSource

    def recording_source(*args: Any, **kwargs: Any) -> Any:
        starts.append(time.monotonic())
        return real_source(*args, **kwargs)

    monkeypatch.setattr(capture_module, "OpenCVSource", recording_source)
    return starts


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_a_server_absent_at_start_is_retried_with_backoff_until_it_appears(
    tmp_path: Path, rtsp_server, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression guard: a capture that reopened a refused stream with no delay (a busy loop)
    passed the old version of this test, which only checked that the stream came back."""
    server = rtsp_server(pattern=True)
    server.kill()  # the port is known, nothing listens on it: every open is refused at once
    events = tmp_path / "events.jsonl"
    opens = record_opens(monkeypatch)
    pipeline = Pipeline(stream_config({"cam": server.url}, events), checkpoint, engine, print_fn=lambda s: None)
    initial, cap = FAST_OPTIONS["backoff_initial_s"], FAST_OPTIONS["backoff_max_s"]
    attempts = 6

    with RunningPipeline(pipeline, events) as run:
        wait_until(lambda: len(opens) >= attempts, timeout=30, what=f"{attempts} open attempts")
        refused = list(opens[:attempts])
        assert [s["status"] for s in statuses(run.lines(), "cam")] == ["offline"]
        server.start()
        online = run.wait_status("cam", "online", timeout=15, what="online status")
        run.wait_for(lambda ls: events_after(ls, online["seq"], "cam"), timeout=10, what="event")

    # Delay k is uniform in [c_k / 2, c_k], c_k = min(cap, initial * 2**k): each gap between
    # attempts is at least that lower bound, however slow the machine (a slow open only adds).
    gaps = [b - a for a, b in zip(refused, refused[1:], strict=False)]
    floors = [min(cap, initial * 2**k) / 2 for k in range(len(gaps))]
    assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), (
        f"gaps between refused opens {[round(g, 3) for g in gaps]} s, expected at least {floors}")
    assert "error" not in run.outcome
    summary = run.outcome["summary"].sources[0]
    assert summary.reconnects == 1 and summary.offline_s >= sum(floors)


@pytest.mark.timeout(60)
def test_when_one_of_two_sources_dies_the_other_keeps_producing_windows(
    tmp_path: Path, rtsp_server, checkpoint: Checkpoint, engine
) -> None:
    alive, dying = rtsp_server(pattern=True), rtsp_server(pattern=True)
    events = tmp_path / "events.jsonl"
    cfg = stream_config({"alive": alive.url, "dying": dying.url}, events)
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda s: None)
    ring = pipeline.rings[0]

    with RunningPipeline(pipeline, events) as run:
        for name in ("alive", "dying"):
            run.wait_for(lambda ls, n=name: events_after(ls, 0, n), timeout=15, what=f"event of {name}")
        dying.kill()
        run.wait_status("dying", "offline", timeout=3, what="offline")
        frames, windows, t0 = ring.frames_written, ring.windows_taken, time.monotonic()
        time.sleep(4.0)
        seconds = time.monotonic() - t0
        fps = (ring.frames_written - frames) / seconds
        windows = ring.windows_taken - windows
        assert last_status(run.lines(), "dying")["status"] == "offline"

    # 10 fps, a window every 8 frames (5 in 4 s): the other source's outage costs this one nothing.
    assert fps >= 7.0, f"alive source read {fps:.1f} fps while the other was down"
    assert windows >= 3 and pipeline.rings[0].gaps == 0
    lines = run.lines()
    assert [s["status"] for s in statuses(lines, "alive")] == ["online"]
    ends = check_every_event_ends_once(lines)
    alive_ends = {ends[o["id"]] for o in lines if o["type"] == "new" and o["source"] == "alive"}
    assert alive_ends == {"shutdown"}


# -- the watchdog, with fake sources ------------------------------------------------------------

CONTRACT = PreprocessContract(resize=(16, 16), crop=8, fps=10.0)


class BlockingSource:
    """Gives ``frames`` frames at 100 fps, then blocks in read() until ``release_reads`` is set."""

    def __init__(self, frames: int, release_reads: threading.Event) -> None:
        self.fps = 10.0
        self.left = frames
        self.release_reads = release_reads

    def read(self) -> np.ndarray | None:
        if self.left > 0:
            self.left -= 1
            time.sleep(0.01)
            return np.zeros((24, 32, 3), np.uint8)
        self.release_reads.wait()
        return np.zeros((24, 32, 3), np.uint8)

    def release(self) -> None:
        pass


def stream_capture(opener, statuses_seen: list[StatusChange], stop: threading.Event, **kwargs) -> CaptureThread:
    ring = RingBuffer("src", length=16, stride=8, frame_shape=(3, 8, 8))
    return CaptureThread("src", opener, ring, CONTRACT, stop, kind=SourceKind.STREAM, realtime=True,
                         on_status=statuses_seen.append, backoff=Backoff(0.01, 0.02), **kwargs)


@pytest.mark.timeout(30)
def test_a_read_stuck_past_the_stall_timeout_is_abandoned_and_the_source_reopened() -> None:
    seen: list[StatusChange] = []
    stop = threading.Event()
    sources: list[BlockingSource] = []

    def opener() -> BlockingSource:
        # The first open gives 20 frames then hangs; every reopen hangs at once.
        sources.append(BlockingSource(20 if not sources else 0, threading.Event()))
        return sources[-1]

    capture = stream_capture(opener, seen, stop, stall_timeout_s=0.3)
    capture.start()
    try:
        deadline = time.monotonic() + 10
        while capture.stats.stalls < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sources[0].release_reads.set()  # the first, abandoned read returns a frame now
        time.sleep(0.3)
    finally:
        stop.set()
        capture.join(5)
        for source in sources:
            source.release_reads.set()

    assert not capture.is_alive() and capture.error is None
    assert capture.stats.stalls >= 2 and capture.stats.abandoned >= 2 and len(sources) >= 3
    assert [s.status for s in seen][:4] == [Status.ONLINE, Status.OFFLINE, Status.ONLINE, Status.OFFLINE]
    assert seen[1].reason.startswith("stalled: no frame for")
    # The abandoned session's late frame was dropped: only the first 20 frames reached the ring.
    assert capture.ring.frames_written == 20 and capture.stats.frames_used == 20


@pytest.mark.timeout(30)
def test_too_many_stuck_reads_stop_the_run_with_an_error() -> None:
    """Each reopen leaks a thread blocked forever: past the bound the capture gives up."""
    never = threading.Event()
    seen: list[StatusChange] = []
    stop = threading.Event()
    graveyard = AbandonedThreads(limit=3)
    capture = stream_capture(lambda: BlockingSource(0, never), seen, stop, stall_timeout_s=0.2,
                             abandoned=graveyard)
    capture.start()
    capture.join(10)
    never.set()  # let the leaked threads finish

    assert not capture.is_alive()
    assert isinstance(capture.error, StuckThreadsError)
    assert "4 capture threads are stuck" in str(capture.error)
    assert stop.is_set() and capture.ring.closed


@pytest.mark.timeout(30)
def test_a_camera_whose_first_open_never_returns_is_an_error_not_a_retry_loop(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once, ``streamdet run --source 7`` hung: a camera open that blocks must end the run."""
    monkeypatch.setattr("streamdet.capture.OPEN_GRACE_S", 0.2)
    never = threading.Event()
    seen: list[StatusChange] = []
    ring = RingBuffer("camera7", length=16, stride=8, frame_shape=(3, 8, 8))

    def opener() -> BlockingSource:
        never.wait()
        raise AssertionError("unreachable")

    capture = CaptureThread("camera7", opener, ring, CONTRACT, threading.Event(), kind=SourceKind.CAMERA,
                            realtime=True, on_status=seen.append, stall_timeout_s=1.0, open_timeout_s=0.3)
    started = time.monotonic()
    capture.start()
    capture.join(10)
    never.set()

    assert not capture.is_alive() and time.monotonic() - started < 3
    assert "open never returned" in str(capture.error) and ring.closed
    assert [s.status for s in seen] == [Status.ENDED]
