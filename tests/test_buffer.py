"""Tests of the ring buffer: window boundaries, contiguous views, gaps, lossless vs live writers.

Frames here are tiny (1, 2, 2) arrays filled with their own frame index, so a window's content
tells exactly which frames it holds.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from streamdet.buffer import FrameMeta, RingBuffer, Window

SHAPE = (1, 2, 2)
T0 = 1_700_000_000.0


def meta(i: int) -> FrameMeta:
    return FrameMeta(i, T0 + i / 10.0, 1000.0 + i / 10.0)


def frame(i: int) -> np.ndarray:
    return np.full(SHAPE, i, np.float32)


def write(ring: RingBuffer, indices: range | list[int]) -> None:
    for i in indices:
        assert ring.write_frame(frame(i), meta(i), timeout=1.0)


def take_all(
    ring: RingBuffer, *, newest: bool = False, max_lag: int = 1
) -> list[tuple[Window, np.ndarray]]:
    taken = []
    while True:
        out = np.empty((SHAPE[0], ring.length, *SHAPE[1:]), np.float32)
        window = ring.take_window(out, newest=newest, max_lag=max_lag)
        if window is None:
            return taken
        taken.append((window, out))
    return taken


def take_all_of(ring: RingBuffer, count: int) -> list[tuple[Window, np.ndarray]]:
    """Take up to ``count`` windows (oldest first)."""
    taken = []
    for _ in range(count):
        out = np.empty((SHAPE[0], ring.length, *SHAPE[1:]), np.float32)
        window = ring.take_window(out)
        if window is None:
            break
        taken.append((window, out))
    return taken


def frame_values(clip: np.ndarray) -> list[int]:
    """The index each frame of a (C, T, H, W) clip was filled with; -1 if the frame is torn."""
    values = []
    for t in range(clip.shape[1]):
        plane = clip[:, t]
        values.append(int(plane.flat[0]) if (plane == plane.flat[0]).all() else -1)
    return values


def assert_intact(window: Window, clip: np.ndarray) -> None:
    """The window holds frames first_frame..last_frame, in order, each whole."""
    expected = list(range(window.first_frame, window.last_frame + 1))
    assert frame_values(clip) == expected
    np.testing.assert_allclose(window.frame_times, [T0 + i / 10.0 for i in expected])
    assert window.last_monotonic == pytest.approx(1000.0 + window.last_frame / 10.0)


def test_windows_are_ready_every_stride_frames_after_the_first_length() -> None:
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, capacity=32, lossless=True)

    write(ring, range(11))

    spans = [(w.first_frame, w.last_frame) for w, _ in take_all(ring)]
    assert spans == [(0, 3), (2, 5), (4, 7), (6, 9)]
    assert ring.windows_taken == 4 and ring.windows_skipped == 0


def test_a_phase_delays_every_window_of_a_segment_by_that_many_frames() -> None:
    ring = RingBuffer(
        "cam", length=4, stride=3, frame_shape=SHAPE, capacity=32, lossless=True, phase=2
    )

    write(ring, range(12))
    ring.mark_gap()
    write(ring, range(20, 27))

    spans = [(w.first_frame, w.last_frame) for w, _ in take_all(ring)]
    assert spans == [(2, 5), (5, 8), (8, 11), (22, 25)]


def test_window_view_holds_the_frames_in_order_across_the_wraparound() -> None:
    ring = RingBuffer("cam", length=4, stride=3, frame_shape=SHAPE, capacity=6, lossless=True)
    seen = []
    for i in range(40):  # the ring wraps more than 6 times
        write(ring, [i])
        for window, clip in take_all(ring):
            assert_intact(window, clip)
            seen.append(window.first_frame)
    assert seen == list(range(0, 37, 3))


def test_take_window_without_out_returns_a_copy_of_the_window() -> None:
    ring = RingBuffer("cam", length=4, stride=4, frame_shape=SHAPE, lossless=True)
    write(ring, range(4))
    clip = np.empty((1, 4, 2, 2), np.float32)

    window = ring.take_window(clip)

    assert window is not None and window.source == "cam"
    assert_intact(window, clip)
    assert ring.take_window() is None


def test_a_gap_restarts_windows_after_it() -> None:
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, capacity=32, lossless=True)

    write(ring, range(0, 5))  # one window (0..3); frame 4 starts another
    ring.mark_gap()  # e.g. a reconnect: frames 5, 6 never came
    write(ring, range(7, 15))

    spans = [(w.first_frame, w.last_frame) for w, _ in take_all(ring)]
    assert spans == [(0, 3), (7, 10), (9, 12), (11, 14)]
    assert ring.gaps == 1


def test_a_gap_right_after_another_counts_once() -> None:
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, lossless=True)
    write(ring, range(3))

    ring.mark_gap()
    ring.mark_gap()

    assert ring.gaps == 1


@pytest.mark.timeout(10)
def test_lossless_writer_waits_until_the_window_is_taken() -> None:
    ring = RingBuffer("cam", length=4, stride=4, frame_shape=SHAPE, capacity=5, lossless=True)
    write(ring, range(5))  # window 0..3 is ready; writing frame 5 would overwrite frame 0
    assert ring.slot(timeout=0.05) is None

    done = threading.Event()

    def writer() -> None:
        if ring.write_frame(frame(5), meta(5), timeout=5.0):
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not done.wait(0.2), "the writer overwrote a window nobody had taken"
    window, clip = take_all(ring)[0]
    thread.join(5.0)

    assert done.is_set()
    assert_intact(window, clip)
    assert ring.windows_skipped == 0


def test_lossless_writer_waits_for_the_oldest_of_several_pending_windows() -> None:
    """Regression guard: a writer that checked only the newest ready window overwrote the
    oldest ones while several were pending (the tests above only ever had one)."""
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, capacity=8, lossless=True)
    write(ring, range(8))  # windows 0..3, 2..5, 4..7 pending; frame 8 would overwrite frame 0
    assert ring.pending() == 3

    assert ring.slot(timeout=0.05) is None, "the writer would overwrite the oldest pending window"
    window, clip = take_all_of(ring, 1)[0]
    assert (window.first_frame, window.last_frame) == (0, 3)
    write(ring, [8, 9])  # frames 0 and 1 are free now
    assert ring.slot(timeout=0.05) is None, "frame 10 would overwrite frame 2, in window 2..5"

    taken = take_all(ring)
    assert [(w.first_frame, w.last_frame) for w, _ in taken] == [(2, 5), (4, 7), (6, 9)]
    for window, clip in taken:
        assert_intact(window, clip)
    assert ring.windows_skipped == 0


@pytest.mark.timeout(30)
def test_lossless_writer_and_a_reader_that_lets_windows_pile_up_lose_nothing() -> None:
    """The reader takes a window only once 4 are pending, so the writer keeps meeting a ring
    whose oldest pending window is several strides behind its newest."""
    n = 400
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, capacity=12, lossless=True)

    def write_all() -> None:
        for i in range(n):  # a generous timeout: on a busy machine the reader may be slow
            if not ring.write_frame(frame(i), meta(i), timeout=10.0):
                break
        ring.close()

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    taken: list[tuple[Window, np.ndarray]] = []
    while not (ring.closed and ring.pending() == 0):
        if ring.pending() < 4 and not ring.closed:
            time.sleep(0.0005)
            continue
        taken += take_all_of(ring, 1)
    writer.join(5.0)

    spans = [(w.first_frame, w.last_frame) for w, _ in taken]
    assert spans == [(s, s + 3) for s in range(0, n - 3, 2)]
    for window, clip in taken:
        assert_intact(window, clip)
    assert ring.windows_skipped == 0


@pytest.mark.timeout(10)
def test_close_wakes_a_waiting_lossless_writer_and_refuses_later_writes() -> None:
    ring = RingBuffer("cam", length=4, stride=4, frame_shape=SHAPE, capacity=5, lossless=True)
    write(ring, range(5))
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(ring.write_frame(frame(5), meta(5))))
    thread.start()
    time.sleep(0.1)

    ring.close()
    thread.join(5.0)

    assert result == [False]
    assert ring.closed
    assert ring.write_frame(frame(6), meta(6)) is False


def test_live_writer_never_waits_and_counts_windows_it_overwrote() -> None:
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, capacity=8, lossless=False)

    write(ring, range(40))  # nobody reads: 19 windows become ready

    taken = take_all(ring)
    assert taken, "the newest windows should still be there"
    for window, clip in taken:
        assert_intact(window, clip)
    assert ring.windows_skipped > 0
    assert ring.windows_skipped + ring.windows_taken == 19


def test_newest_takes_the_latest_window_and_counts_the_older_ones_skipped() -> None:
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, capacity=32, lossless=False)
    write(ring, range(10))  # windows end at 3, 5, 7, 9

    ((window, clip),) = take_all(ring, newest=True)

    assert (window.first_frame, window.last_frame) == (6, 9)
    assert_intact(window, clip)
    assert ring.windows_skipped == 3 and ring.pending() == 0


@pytest.mark.parametrize(("frames", "expected_last", "skipped"), [(8, [5, 7], 0), (10, [9], 2)])
def test_a_live_reader_catches_up_on_a_small_lag_and_jumps_past_a_large_one(
    frames: int, expected_last: list[int], skipped: int
) -> None:
    ring = RingBuffer("cam", length=4, stride=2, frame_shape=SHAPE, capacity=32, lossless=False)
    write(ring, range(4))
    assert ring.take_window(newest=True, max_lag=2).last_frame == 3  # on time so far
    write(ring, range(4, frames))  # then windows end at 5, 7 (and 9) before the reader is back

    taken = take_all(ring, newest=True, max_lag=2)

    assert [w.last_frame for w, _ in taken] == expected_last
    for window, clip in taken:
        assert_intact(window, clip)
    assert ring.windows_skipped == skipped


def test_live_reader_never_gets_a_window_whose_oldest_slot_the_writer_holds() -> None:
    """Regression: take_window treated the frame in the slot being written as intact.

    ``slot()`` hands the writer the slot of the frame ``capacity`` frames back before
    ``commit()``; a live reader could copy that window while the writer was half-way through
    preprocessing into it, and got a torn first frame.
    """
    ring = RingBuffer("cam", length=4, stride=1, frame_shape=SHAPE, capacity=5, lossless=False)
    write(ring, range(5))  # windows 0..3 and 1..4 ready
    target = ring.slot()
    assert target is not None
    target[...] = -7.0  # the writer is half-way through frame 5, in frame 0's slot

    taken = take_all(ring)

    assert [(w.first_frame, w.last_frame) for w, _ in taken] == [(1, 4)]
    for window, clip in taken:
        assert_intact(window, clip)
    assert ring.windows_skipped == 1


@pytest.mark.parametrize(
    ("kwargs", "expectation"),
    [
        ({"capacity": 17}, contextlib.nullcontext()),
        ({}, contextlib.nullcontext()),
        ({"capacity": 16}, pytest.raises(ValueError, match="capacity must exceed")),
        ({"capacity": 4}, pytest.raises(ValueError, match="capacity must exceed")),
        ({"stride": 0}, pytest.raises(ValueError, match="length and stride")),
        ({"length": 0}, pytest.raises(ValueError, match="length and stride")),
        ({"phase": 7}, contextlib.nullcontext()),
        ({"phase": 8}, pytest.raises(ValueError, match="phase must be")),
        ({"phase": -1}, pytest.raises(ValueError, match="phase must be")),
    ],
)
def test_capacity_and_sizes_are_validated(kwargs: dict, expectation) -> None:
    with expectation:
        ring = RingBuffer("cam", **{"length": 16, "stride": 8, "frame_shape": SHAPE, **kwargs})
        assert ring.capacity >= ring.length + 1


def test_default_capacity_leaves_slack_beyond_one_window() -> None:
    ring = RingBuffer("cam", length=16, stride=8, frame_shape=SHAPE)
    assert ring.capacity >= 16 + 8


class _SlowWriter(threading.Thread):
    """Writes frames 0..n-1 as capture does: slot(), fill it in steps, commit()."""

    def __init__(self, ring: RingBuffer, n: int, skip_at: int | None = None) -> None:
        super().__init__(daemon=True)
        self.ring, self.n, self.skip_at = ring, n, skip_at

    def run(self) -> None:
        for i in range(self.n):
            if i == self.skip_at:
                self.ring.mark_gap()  # a dropped run of frames: index i never arrives
                continue
            target = None
            while target is None:
                target = self.ring.slot(timeout=1.0)
            for t in range(target.shape[0]):  # one plane at a time, like preprocess_frame
                target[t] = i
                time.sleep(0)
            self.ring.commit(meta(i))
        self.ring.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("lossless", [True, False], ids=["lossless", "live"])
def test_concurrent_writer_and_reader_see_only_whole_consecutive_windows(lossless: bool) -> None:
    n, shape = 3000, (3, 2, 2)
    ring = RingBuffer("cam", length=16, stride=4, frame_shape=shape, capacity=21, lossless=lossless)
    writer = _SlowWriter(ring, n, skip_at=1234)
    out = np.empty((3, 16, 2, 2), np.float32)
    spans = []
    writer.start()
    while not (ring.closed and ring.pending() == 0):
        window = ring.take_window(out)
        if window is None:
            time.sleep(0.0002)
            continue
        expected = list(range(window.first_frame, window.last_frame + 1))
        for t in range(16):
            assert (out[:, t] == expected[t]).all(), (
                f"window {expected[0]}: frame {t} is {out[:, t].ravel()}"
            )
        assert 1234 not in expected, "a window spans the gap"
        spans.append((window.first_frame, window.last_frame))
    writer.join(5.0)

    assert spans == sorted(spans)
    produced = len(range(0, 1234 - 15, 4)) + len(range(1235, n - 15, 4))
    assert ring.windows_taken + ring.windows_skipped == produced
    if lossless:
        assert ring.windows_skipped == 0 and len(spans) == produced
