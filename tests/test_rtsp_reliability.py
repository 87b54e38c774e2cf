"""Stream loss and recovery against a real RTSP server, and the capture watchdog.

The pipeline runs in this process with a tiny random C3D_BN (width 0.0625) and thresholds of 0,
so every window of a source opens or continues events: events resume exactly when windows do.
Sources use small timeouts and backoff (0.2 s doubling to 1 s) so that many outages fit in a
test. The watchdog tests after them use fake sources whose reads block forever; the last tests
put the same hard cases to the real server: a size change, a stop during a blocked read, hung
reads up to the abandoned-thread limit, and inference lagging behind a live source.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from assets import vtest_path
from threads import wait_until

import streamdet.sources.capture as capture_module
from streamdet import kernels
from streamdet.buffer import FrameMeta, RingBuffer, Window
from streamdet.config import RunConfig, load_config
from streamdet.errors import SourceError
from streamdet.models.weights import Checkpoint
from streamdet.pipeline import Pipeline
from streamdet.preprocess import PreprocessContract
from streamdet.sources import (
    AbandonedThreads,
    Backoff,
    CaptureThread,
    Pacing,
    SourceKind,
    Status,
    StatusChange,
    StuckThreadsError,
    make_opener,
)

FAST_OPTIONS = {
    "open_timeout_s": 2.0,
    "read_timeout_s": 1.0,
    "stall_timeout_s": 2.0,
    "backoff_initial_s": 0.2,
    "backoff_max_s": 1.0,
}


def stream_config(urls: dict[str, str], events_path: Path, **options: Any) -> RunConfig:
    """Live sources with small timeouts and backoff; every window makes or continues events."""
    return load_config(
        None,
        {
            "sources": [
                {"name": name, "url": url, "options": {**FAST_OPTIONS, **options}}
                for name, url in urls.items()
            ],
            "model": {"device": "cpu", "precision": "fp32", "max_batch": 2},
            "events": {
                "threshold": 0.0,
                "exit_threshold": 0.0,
                "smoothing": 1,
                "open_windows": 1,
                "update_min_interval_s": 60.0,
            },
            "sinks": {"events": {"path": str(events_path)}},
            "progress_interval_s": 60.0,
        },
    )


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

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float, what: str
    ) -> Any:
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
        return self.wait_for(
            lambda ls: (s := last_status(ls, source)) and s["status"] == status and s,
            timeout=timeout,
            what=what,
        )


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
    pipeline = Pipeline(
        stream_config({"cam": server.url}, events), checkpoint, engine, print_fn=lambda s: None
    )

    with RunningPipeline(pipeline, events) as run:
        for cycle in range(10):
            online = run.wait_status(
                "cam",
                "online",
                timeout=15 if cycle == 0 else 5,
                what=f"online status (cycle {cycle})",
            )
            run.wait_for(
                lambda ls, seq=online["seq"]: events_after(ls, seq, "cam"),
                timeout=10,
                what=f"event after reconnect (cycle {cycle})",
            )
            server.kill()
            run.wait_status(
                "cam", "offline", timeout=3, what=f"offline status after the kill (cycle {cycle})"
            )
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


def seconds_in(reason: str) -> float:
    """The duration a stall reason states: ``"stalled: no frame for 2.1 s"`` -> 2.1."""
    match = re.search(r"([0-9.]+) s$", reason)
    assert match, f"no duration in {reason!r}"
    return float(match.group(1))


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("options", "reason", "abandoned"),
    [
        # The read gives up first: the session ends by itself and nothing is abandoned.
        ({"read_timeout_s": 1.0, "stall_timeout_s": 5.0}, "stalled: a read blocked", 0),
        # The read would block a minute: the watchdog retires the session and abandons its thread.
        ({"read_timeout_s": 60.0, "stall_timeout_s": 2.0}, "stalled: no frame for", 1),
    ],
    ids=["read-timeout", "watchdog"],
)
def test_a_hung_server_goes_offline_within_the_stall_time_and_recovers_after_it_resumes(
    tmp_path: Path,
    rtsp_server,
    checkpoint: Checkpoint,
    engine,
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, float],
    reason: str,
    abandoned: int,
) -> None:
    """Each way a hang is noticed, told apart by the offline reason and the abandoned count
    (both used to start with "stalled", so a check on that prefix could not tell which ran)."""
    server = rtsp_server(pattern=True)
    events = tmp_path / "events.jsonl"
    opens = record_opens(monkeypatch)
    pipeline = Pipeline(
        stream_config({"cam": server.url}, events, **options),
        checkpoint,
        engine,
        print_fn=lambda s: None,
    )
    capture = pipeline.captures[0]

    with RunningPipeline(pipeline, events) as run:
        online = run.wait_status("cam", "online", timeout=15, what="online status")
        run.wait_for(
            lambda ls: events_after(ls, online["seq"], "cam"), timeout=10, what="first event"
        )
        server.pause()
        offline = run.wait_status("cam", "offline", timeout=30, what="offline")
        wait_until(lambda: len(opens) >= 3, timeout=30, what="two reopens against the hung server")
        server.resume()
        back = run.wait_status("cam", "online", timeout=30, what="online after resume")
        run.wait_for(
            lambda ls: events_after(ls, back["seq"], "cam"), timeout=10, what="event after resume"
        )

    assert offline["reason"].startswith(reason), offline["reason"]
    assert capture.stats.abandoned == abandoned
    # The capture measures from the last frame (watchdog) or the read's start (read timeout):
    # the hang was noticed at its limit, not later.
    limit = min(options["read_timeout_s"] * 0.9, options["stall_timeout_s"])
    assert limit <= seconds_in(offline["reason"]) <= limit + 1.5, offline["reason"]
    ends = check_every_event_ends_once(run.lines())
    assert "stream_lost" in ends.values()
    assert run.outcome["summary"].sources[0].stalls >= 1


def windows_made(ring: RingBuffer) -> int:
    """Windows a ring has made so far: taken, skipped or still pending."""
    return ring.windows_taken + ring.windows_skipped + ring.pending()


def record_opens(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Monotonic start times of every open the pipeline's captures attempt (real opens)."""
    starts: list[float] = []
    for backend in ("PyAVSource", "OpenCVSource"):  # whichever the source's backend is
        real_source = getattr(capture_module, backend)

        def recording_source(*args: Any, real_source: Any = real_source, **kwargs: Any) -> Any:
            starts.append(time.monotonic())
            return real_source(*args, **kwargs)

        monkeypatch.setattr(capture_module, backend, recording_source)
    return starts


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
    pipeline = Pipeline(
        stream_config({"cam": server.url}, events), checkpoint, engine, print_fn=lambda s: None
    )
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
        f"gaps between refused opens {[round(g, 3) for g in gaps]} s, expected at least {floors}"
    )
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
            run.wait_for(
                lambda ls, n=name: events_after(ls, 0, n), timeout=15, what=f"event of {name}"
            )
        dying.kill()
        run.wait_status("dying", "offline", timeout=10, what="offline")
        frames, made, taken = ring.frames_written, windows_made(ring), ring.windows_taken
        started = time.monotonic()
        wait_until(
            lambda: ring.frames_written >= frames + 40,
            timeout=30,
            what="40 frames of the live source",
        )
        seconds = time.monotonic() - started
        made, taken = windows_made(ring) - made, ring.windows_taken - taken
        assert last_status(run.lines(), "dying")["status"] == "offline"

    # 40 frames are 4 s of the 10 fps stream: half its rate is the bound, so a busy machine
    # passes and an outage that blocks this source (a read timeout or a backoff) does not.
    assert seconds <= 8.0, f"40 frames of the live source took {seconds:.1f} s, the other down"
    assert made >= 4 and taken >= 2 and ring.gaps == 0
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
        self.released = threading.Event()

    def read(self) -> np.ndarray | None:
        if self.left > 0:
            self.left -= 1
            time.sleep(0.01)
            return np.zeros((24, 32, 3), np.uint8)
        self.release_reads.wait()
        return np.zeros((24, 32, 3), np.uint8)

    def release(self) -> None:
        self.released.set()


def stream_capture(
    opener, statuses_seen: list[StatusChange], stop: threading.Event, **kwargs
) -> CaptureThread:
    # As Pipeline.run does: loading the preprocessing kernel in the first frame took longer
    # than these short stall timeouts, so a test run alone stalled on its first frame.
    kernels.get()
    ring = RingBuffer("src", length=16, stride=8, frame_shape=(3, 8, 8))
    return CaptureThread(
        "src",
        opener,
        ring,
        CONTRACT,
        stop,
        kind=SourceKind.STREAM,
        pacing=Pacing.LIVE,
        on_status=statuses_seen.append,
        backoff=Backoff(0.01, 0.02),
        **kwargs,
    )


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
        wait_until(
            lambda: capture.stats.stalls >= 2 and len(sources) >= 3,
            timeout=10,
            what="two stalls, each followed by a reopen",
        )
        sources[0].release_reads.set()  # the first, abandoned read returns a frame now
        # Its session finds itself retired, drops the frame and releases its source.
        assert sources[0].released.wait(10), "the abandoned session never ended"
    finally:
        stop.set()
        capture.join(5)
        for source in sources:
            source.release_reads.set()

    assert not capture.is_alive() and capture.error is None
    assert capture.stats.stalls >= 2 and capture.stats.abandoned >= 2 and len(sources) >= 3
    assert [s.status for s in seen][:4] == [
        Status.ONLINE,
        Status.OFFLINE,
        Status.ONLINE,
        Status.OFFLINE,
    ]
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
    capture = stream_capture(
        lambda: BlockingSource(0, never), seen, stop, stall_timeout_s=0.2, abandoned=graveyard
    )
    capture.start()
    capture.join(10)
    never.set()  # let the leaked threads finish

    assert not capture.is_alive()
    assert isinstance(capture.error, StuckThreadsError)
    assert "4 capture threads are stuck" in str(capture.error)
    assert stop.is_set() and capture.ring.closed


@pytest.mark.timeout(30)
def test_a_camera_whose_first_open_never_returns_is_an_error_not_a_retry_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once, ``streamdet run --source 7`` hung: a camera open that blocks must end the run."""
    monkeypatch.setattr("streamdet.sources.watchdog.OPEN_GRACE_S", 0.2)
    never = threading.Event()
    seen: list[StatusChange] = []
    ring = RingBuffer("camera7", length=16, stride=8, frame_shape=(3, 8, 8))

    def opener() -> BlockingSource:
        never.wait()
        raise AssertionError("unreachable")

    capture = CaptureThread(
        "camera7",
        opener,
        ring,
        CONTRACT,
        threading.Event(),
        kind=SourceKind.CAMERA,
        pacing=Pacing.LIVE,
        on_status=seen.append,
        stall_timeout_s=1.0,
        open_timeout_s=0.3,
    )
    started = time.monotonic()
    capture.start()
    capture.join(10)
    never.set()

    assert not capture.is_alive() and time.monotonic() - started < 3
    assert "open never returned" in str(capture.error) and ring.closed
    assert [s.status for s in seen] == [Status.ENDED]


# -- capture threads and the pipeline against the real server, in the hard cases ---------------

SWITCH_AT = 30  # frames before the server switches the stream's size mid-session


class WindowTaker(threading.Thread):
    """Takes every window of a live ring as soon as it is ready, until ``stop`` is set."""

    def __init__(self, ring: RingBuffer, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.ring, self.stop = ring, stop
        self.windows: list[Window] = []

    def run(self) -> None:
        while not self.stop.is_set():
            window = self.ring.take_window()
            if window is None:
                self.stop.wait(0.005)
            else:
                self.windows.append(window)


def real_capture(
    opener: Callable[[], Any],
    stop: threading.Event,
    seen: list[StatusChange],
    *,
    read_timeout_s: float,
    stall_timeout_s: float | None = None,
    **kwargs: Any,
) -> CaptureThread:
    """A capture of a real stream (tiny preprocessing: 8x8 crops), reconnecting quickly."""
    kernels.get()  # as Pipeline.run does, so that the first frame is no slower than the others
    ring = RingBuffer("cam", length=16, stride=8, frame_shape=(3, 8, 8))
    return CaptureThread(
        "cam",
        opener,
        ring,
        CONTRACT,
        stop,
        kind=SourceKind.STREAM,
        pacing=Pacing.LIVE,
        on_status=seen.append,
        backoff=Backoff(0.05, 0.2),
        read_timeout_s=read_timeout_s,
        stall_timeout_s=stall_timeout_s,
        **kwargs,
    )


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference, ``a`` resized to ``b``'s size first."""
    a = cv2.resize(a, (b.shape[1], b.shape[0]), interpolation=cv2.INTER_AREA)
    return float(cv2.absdiff(a, b).mean())


def file_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = {}
    try:
        for index in range(max(indices) + 1):
            ok, frame = cap.read()
            assert ok, f"{path} ended at frame {index}"
            if index in indices:
                frames[index] = frame
    finally:
        cap.release()
    return frames


def assert_no_window_mixes_sizes(windows: list[Window], shapes: dict[int, tuple[int, ...]]) -> None:
    for w in windows:
        sizes = {shapes[i] for i in range(w.first_frame, w.last_frame + 1)}
        assert len(sizes) == 1, f"window {w.first_frame}..{w.last_frame} mixes frame sizes {sizes}"


@pytest.mark.timeout(60)
def test_a_resolution_change_mid_stream_keeps_the_session_and_no_window_mixes_sizes(
    rtsp_server, rtsp_video: Path
) -> None:
    """The server switches 320x240 -> 480x360 after 30 frames, in the same RTSP session.

    OpenCV 5 hands out every frame of a session at the size it had at open (it rescales), so
    capture sees no size change here; an OpenCV that passed the new size on would meet the
    ring's gap instead. Either way: one session, no error, and no window of two sizes.
    """
    server = rtsp_server(switch=(SWITCH_AT, (480, 360)))
    shapes: dict[int, tuple[int, ...]] = {}
    around_switch: dict[int, np.ndarray] = {}

    def on_frame(name: str, meta: FrameMeta, frame: np.ndarray, used: bool) -> None:
        shapes[meta.index] = frame.shape
        if SWITCH_AT - 5 <= meta.index <= SWITCH_AT + 5:
            around_switch[meta.index] = frame.copy()

    seen: list[StatusChange] = []
    stop = threading.Event()
    opener = make_opener(server.url, open_timeout_s=5.0, read_timeout_s=3.0)
    capture = real_capture(
        opener, stop, seen, read_timeout_s=3.0, stall_timeout_s=10.0, on_frame=on_frame
    )
    taker = WindowTaker(capture.ring, stop)
    taker.start()
    capture.start()
    try:
        wait_until(
            lambda: capture.stats.frames_read >= SWITCH_AT + 40,
            timeout=40,
            what=f"{SWITCH_AT + 40} frames",
        )
    finally:
        stop.set()
        capture.join(5)
        taker.join(5)

    assert not capture.is_alive() and capture.error is None
    assert [s.status for s in seen] == [Status.ONLINE]
    assert capture.stats.reconnects == 0 and capture.stats.stalls == 0
    # The switch happened inside this session: the server's file starts over at the new size,
    # so a frame just after it is the file's first frame again, unlike the frames before it.
    first = file_frames(rtsp_video, [0])[0]
    before = mean_difference(around_switch[SWITCH_AT - 5], first)
    after = min(mean_difference(around_switch[i], first) for i in range(SWITCH_AT, SWITCH_AT + 5))
    assert after < before / 2, f"no switch seen: {after:.1f} vs {before:.1f} before it"
    assert_no_window_mixes_sizes(taker.windows, shapes)
    assert sum(w.first_frame > SWITCH_AT for w in taker.windows) >= 2


@pytest.mark.timeout(60)
def test_a_camera_reconfigured_to_another_size_is_reopened_and_windows_restart_at_that_size(
    rtsp_server, caplog: pytest.LogCaptureFixture
) -> None:
    """The usual way a camera changes resolution: it drops its clients and serves the new size."""
    caplog.set_level(logging.INFO, logger="streamdet.sources.capture")
    server = rtsp_server(pattern=True)
    shapes: dict[int, tuple[int, ...]] = {}
    seen: list[StatusChange] = []
    stop = threading.Event()

    def on_frame(name: str, meta: FrameMeta, frame: np.ndarray, used: bool) -> None:
        shapes[meta.index] = frame.shape

    opener = make_opener(server.url, open_timeout_s=5.0, read_timeout_s=3.0)
    capture = real_capture(
        opener, stop, seen, read_timeout_s=3.0, stall_timeout_s=10.0, on_frame=on_frame
    )
    taker = WindowTaker(capture.ring, stop)
    taker.start()
    capture.start()
    try:
        wait_until(lambda: capture.stats.frames_read >= 24, timeout=30, what="24 frames")
        server.restart(size=(480, 360))
        wait_until(
            lambda: list(shapes.values()).count((360, 480, 3)) >= 40,
            timeout=30,
            what="40 frames at the new size",
        )
    finally:
        stop.set()
        capture.join(5)
        taker.join(5)

    assert not capture.is_alive() and capture.error is None
    assert capture.stats.reconnects == 1
    indices = sorted(shapes)
    changes = [i for i, j in zip(indices, indices[1:], strict=False) if shapes[i] != shapes[j]]
    assert len(changes) == 1 and shapes[indices[0]] == (240, 320, 3)
    assert_no_window_mixes_sizes(taker.windows, shapes)
    assert sum(w.first_frame > changes[0] for w in taker.windows) >= 2
    assert "resolution changed (240, 320) -> (360, 480)" in caplog.text


@pytest.mark.timeout(60)
def test_stopping_while_a_read_is_blocked_on_a_hung_server_does_not_wait_for_the_read(
    tmp_path: Path, rtsp_server, checkpoint: Checkpoint, engine
) -> None:
    """The read would block for a minute (read timeout 60 s, no watchdog in that time): stop
    ends the capture thread without it, and the session's thread is left blocked."""
    server = rtsp_server(pattern=True)
    events = tmp_path / "events.jsonl"
    cfg = stream_config({"cam": server.url}, events, read_timeout_s=60.0, stall_timeout_s=120.0)
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda s: None)
    capture = pipeline.captures[0]

    with RunningPipeline(pipeline, events) as run:
        online = run.wait_status("cam", "online", timeout=15, what="online status")
        run.wait_for(
            lambda ls: events_after(ls, online["seq"], "cam"), timeout=10, what="first event"
        )
        server.pause()
        wait_until(
            lambda: time.monotonic() - capture.last_frame_monotonic > 1.0,
            timeout=15,
            what="a read blocked for 1 s",
        )
        frames = capture.stats.frames_read
        pipeline.stop("test over")
        run.thread.join(10)
        capture.join(5)
        sessions = [t for t in threading.enumerate() if t.name.startswith(f"{capture.name}-")]

    assert not run.thread.is_alive() and "error" not in run.outcome
    assert not capture.is_alive(), "stopping waited for the blocked read"
    assert capture.stats.frames_read == frames  # the read never returned
    assert sessions and all(t.is_alive() for t in sessions), "no session thread was still blocked"


@pytest.mark.timeout(120)
def test_real_reads_stuck_on_hung_servers_are_abandoned_until_the_limit_stops_the_capture(
    rtsp_server,
) -> None:
    """Three cameras, each hung while read (read timeout 60 s): the watchdog abandons each
    session; the third abandoned thread alive is past the limit of 2 and stops the capture."""
    servers = [rtsp_server(pattern=True) for _ in range(3)]
    openers = [make_opener(s.url, open_timeout_s=5.0, read_timeout_s=60.0) for s in servers]
    opened: list[int] = []

    def opener() -> Any:  # each open goes to the next server
        if len(opened) == len(openers):
            raise SourceError("no more servers")
        opened.append(len(opened))
        return openers[opened[-1]]()

    seen: list[StatusChange] = []
    stop = threading.Event()
    capture = real_capture(
        opener,
        stop,
        seen,
        read_timeout_s=60.0,
        stall_timeout_s=1.0,
        abandoned=AbandonedThreads(limit=2),
    )
    capture.start()
    try:
        for k, server in enumerate(servers):
            wait_until(
                lambda k=k: [s.status for s in seen].count(Status.ONLINE) == k + 1,
                timeout=30,
                what=f"session {k} online",
            )
            frames = capture.stats.frames_read
            wait_until(
                lambda f=frames: capture.stats.frames_read >= f + 5,
                timeout=15,
                what=f"frames of session {k}",
            )
            server.pause()
        capture.join(30)
    finally:
        stop.set()
        capture.join(5)

    assert not capture.is_alive()
    assert isinstance(capture.error, StuckThreadsError), capture.error
    assert "3 capture threads are stuck" in str(capture.error)
    assert capture.stats.abandoned == 3 and capture.stats.stalls == 3
    offline = [s.reason for s in seen if s.status is Status.OFFLINE]
    assert len(offline) == 3, offline
    assert all(r.startswith("stalled: no frame for") for r in offline), offline
    assert capture.ring.closed


class GatedEngine:
    """An engine whose every forward pass waits until the test lets it finish: inference as far
    behind a live source as the test wants. Everything else is the wrapped engine's."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __call__(self, batch: Any) -> Any:
        self.calls += 1
        while not self._permits.acquire(timeout=0.05) and not self._open.is_set():
            pass
        return self._engine(batch)

    def allow_one(self) -> None:
        """Let one waiting (or the next) forward pass finish."""
        self._permits.release()

    def open(self) -> None:
        """Let every forward pass run from now on."""
        self._open.set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("source", ["paced-file", "rtsp"])
def test_when_inference_lags_a_live_source_the_newest_window_is_scored_and_the_rest_counted(
    tmp_path: Path, rtsp_server, checkpoint: Checkpoint, engine, source: str
) -> None:
    """Each forward pass is held until 4 or more windows wait behind it; the next window scored
    must be the newest (not the oldest), and the windows jumped over are counted as skipped."""
    stride = 2  # a window every 0.2 s at 10 fps
    if source == "rtsp":
        url, extra = rtsp_server(pattern=True).url, {}
    else:
        url, extra = str(vtest_path()), {"realtime": True}  # vtest.avi paced at its 10 fps
    events = tmp_path / "events.jsonl"
    cfg = load_config(
        None,
        {
            "sources": [{"name": "cam", "url": url, "options": FAST_OPTIONS, **extra}],
            "window": {"stride": stride},
            "model": {"device": "cpu", "precision": "fp32", "max_batch": 1},
            "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
            "sinks": {"events": {"path": str(events)}},
            "progress_interval_s": 60.0,
        },
    )
    gate = GatedEngine(engine)
    pipeline = Pipeline(cfg, checkpoint, gate, print_fn=lambda s: None)
    scored: list[Window] = []
    deliver = pipeline.inference.on_result

    def record(results: list[Any]) -> None:
        scored.extend(r.window for r in results)
        deliver(results)

    pipeline.inference.on_result = record
    ring = pipeline.rings[0]
    newest_at_release: list[int] = []
    with RunningPipeline(pipeline, events) as run:
        try:
            for k in range(3):
                # Pass k + 1 holds its window; 4 more wait behind it.
                wait_until(
                    lambda k=k: gate.calls == k + 1 and ring.pending() >= 4,
                    timeout=30,
                    what=f"4 windows waiting behind pass {k + 1}",
                )
                newest_at_release.append(ring.frames_written - 1)
                gate.allow_one()
            wait_until(lambda: gate.calls == 4, timeout=30, what="the fourth pass")
            skipped = ring.windows_skipped
        finally:
            gate.open()
        wait_until(lambda: len(scored) >= 4, timeout=30, what="4 windows scored")

    for k, newest in enumerate(newest_at_release):
        # The window taken after release k ends at most a stride before the newest frame then.
        window = scored[k + 1]
        assert window.last_frame >= newest - (stride - 1), (
            f"after release {k} the window ending at {window.last_frame} was scored, "
            f"though frame {newest} had been written: not the newest"
        )
    assert skipped >= 3 * 3  # each jump passed over 3 or more waiting windows
    assert "error" not in run.outcome
    assert run.outcome["summary"].sources[0].windows_skipped >= skipped
