"""Per-source ring buffer of preprocessed frames, and the sliding windows taken from it.

The capture thread preprocesses each frame once, straight into a preallocated slot; the
inference thread copies a window of the newest 16 frames out in one strided copy. Every frame is
written twice (slot k and k + capacity), so any 16 consecutive frames are contiguous along the
time axis: a window is a view, never a gather, and never re-preprocessed.

Example:
    >>> import numpy as np
    >>> ring = RingBuffer("cam", length=4, stride=2, frame_shape=(1, 2, 2))
    >>> for i in range(6):
    ...     _ = ring.write_frame(np.full((1, 2, 2), i, np.float32), FrameMeta(i, float(i), float(i)))
    >>> w = ring.take_window()
    >>> (w.first_frame, w.last_frame)
    (0, 3)
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Scene:
    """What a frame meter saw of one frame: its grid of block means, and the noise thresholds
    a change of that grid must pass to count (``streamdet.gating``: local, global)."""

    grid: np.ndarray
    local_threshold: float
    global_threshold: float


class FrameMeter(Protocol):
    """Measures each committed frame (``streamdet.gating.ActivityMeter``: its activity)."""

    def update(self, frame: np.ndarray) -> float: ...

    def reset(self) -> None: ...

    def scene(self) -> Scene | None:
        """The last frame measured, or None when it was not (a warm-up)."""


@dataclass(frozen=True)
class FrameMeta:
    """Where a frame came from: its index in the source and its capture times."""

    index: int
    wall_time: float  # UTC epoch seconds
    monotonic: float  # time.monotonic() at capture


@dataclass(frozen=True)
class Window:
    """A window of consecutive frames taken from a ring buffer."""

    source: str
    first_frame: int
    last_frame: int
    frame_times: np.ndarray  # (length,) UTC epoch seconds of each frame
    last_monotonic: float  # monotonic capture time of the newest frame
    seq: int  # sequence number (frames written to this ring) of the newest frame
    # Of the frames new to this window (not in the ring's previous window taken; all of them
    # for the first window of a ring): the largest activity (> 1: active; inf: not measured),
    # and the seq of the newest measured active one (-1: none).
    activity: float = math.inf
    newest_active: int = -1
    scene: Scene | None = None  # the newest frame's, when a meter measured it

    @property
    def first_time(self) -> float:
        return float(self.frame_times[0])

    @property
    def last_time(self) -> float:
        return float(self.frame_times[-1])


class RingBuffer:
    """Preallocated ring of preprocessed frames for one source.

    Args:
        name: source name carried by its windows.
        length: frames per window.
        stride: a window is ready every ``stride`` frames (after the first ``length``).
        frame_shape: shape of one preprocessed frame, (C, H, W).
        capacity: frames kept (default ``length + stride + 8``).
        lossless: True (file replay): the writer waits rather than overwrite a frame of a window
            the reader has not taken. False (live): the writer never waits; windows overwritten
            before they were taken are counted in ``windows_skipped``.
        meter: measures each frame's activity as it is committed (motion gating); None: every
            frame counts as active.
        phase: frames (0 .. stride - 1) by which every window of a segment comes later than the
            stride alone would put it. Live cameras started together tick in step, so all their
            windows would be ready in the same instant and queue behind one another for the
            inference workers; giving each its own phase spreads them over the stride period.
    """

    def __init__(
        self,
        name: str,
        *,
        length: int = 16,
        stride: int = 8,
        frame_shape: tuple[int, int, int] = (3, 112, 112),
        capacity: int | None = None,
        lossless: bool = False,
        meter: FrameMeter | None = None,
        phase: int = 0,
    ) -> None:
        if length < 1 or stride < 1:
            raise ValueError(f"length and stride must be >= 1, but got {length}, {stride}")
        if not 0 <= phase < stride:
            raise ValueError(f"phase must be in [0, stride), but got {phase}")
        capacity = capacity if capacity is not None else length + stride + 8
        if capacity <= length:
            raise ValueError(f"capacity must exceed the window length {length}, but got {capacity}")
        self.name = name
        self.length = length
        self.stride = stride
        self.capacity = capacity
        self.lossless = lossless
        self.meter = meter
        self.phase = phase
        # (C, 2 * capacity, H, W): frame seq n lives at time index n % capacity and n % capacity + capacity.
        c, h, w = frame_shape
        self._frames = self._allocate((c, 2 * capacity, h, w))
        self._index = np.zeros(capacity, np.int64)
        self._wall = np.zeros(capacity, np.float64)
        self._mono = np.zeros(capacity, np.float64)
        self._activity = np.full(capacity, math.inf, np.float64)
        self._scene: list[Scene | None] = [None] * capacity

        # The lock protects every attribute below and the slots of published frames. Invariants:
        # frames with seq in [max(0, _written - capacity + 1), _written) are published and intact;
        # seq _written - capacity is intact too unless the writer holds its slot (slot() hands
        # it out before commit(), and it is filled without the lock): a live writer may hold it
        # at any time, a lossless one never while a ready window includes that frame;
        # _segment_start <= _written; each seq in _ready ends a window of `length` frames that
        # all belong to the segment starting at or after _segment_start at the time it was added.
        self._lock = threading.Lock()
        self._taken = threading.Condition(self._lock)  # notified when a window is taken or on close
        self._written = 0  # frames published so far (the next frame's seq)
        self._segment_start = 0  # seq of the first frame after the latest gap
        self._ready: deque[int] = deque(maxlen=capacity // stride + 2)
        self._last_taken = -1  # seq of the newest frame of the last window taken
        self._closed = False
        self.frames_written = 0
        self.windows_taken = 0
        self.windows_skipped = 0
        self.gaps = 0

    # -- storage: host memory here, a torch device in streamdet.device_buffer -----------------

    def _allocate(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """The (C, 2 * capacity, H, W) float32 frame store, zeroed."""
        return np.zeros(shape, np.float32)

    def _copy_window(self, view: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """``view`` (a window of the store) copied into ``out``, or into a new array."""
        if out is None:
            return view.copy()
        np.copyto(out, view)
        return out

    # -- writer side (one capture thread) ---------------------------------------------------

    def slot(self, timeout: float | None = None) -> np.ndarray | None:
        """The (C, H, W) view the next frame should be written into.

        In lossless mode it waits until writing cannot destroy an untaken window; returns None if
        that takes longer than ``timeout`` or the ring is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.lossless and not self._closed and self._would_overwrite_ready():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._taken.wait(remaining)
            if self._closed:
                return None
            return self._frames[:, self._written % self.capacity]

    def _would_overwrite_ready(self) -> bool:
        if not self._ready:
            return False
        overwritten = self._written - self.capacity  # seq whose slot the next write reuses
        return overwritten >= self._ready[0] - self.length + 1

    def commit(self, meta: FrameMeta) -> None:
        """Publish the frame just written into ``slot()``."""
        activity, scene = math.inf, None
        if self.meter is not None:
            # Only this (the writer's) thread moves _written, and the slot is its own until the
            # commit below: both are read without the lock.
            activity = self.meter.update(self._frames[:, self._written % self.capacity])
            scene = self.meter.scene()
        with self._lock:
            seq = self._written
            k = seq % self.capacity
            self._activity[k] = activity
            self._scene[k] = scene
            self._frames[:, k + self.capacity] = self._frames[:, k]
            self._index[k] = meta.index
            self._wall[k] = meta.wall_time
            self._mono[k] = meta.monotonic
            self._written = seq + 1
            self.frames_written += 1
            past_first = seq - self._segment_start + 1 - self.length - self.phase
            if past_first >= 0 and past_first % self.stride == 0:
                if len(self._ready) == self._ready.maxlen:
                    self.windows_skipped += 1
                self._ready.append(seq)

    def write_frame(self, frame: np.ndarray, meta: FrameMeta, timeout: float | None = None) -> bool:
        """Copy an already preprocessed frame in and publish it. False if closed or timed out."""
        target = self.slot(timeout)
        if target is None:
            return False
        target[...] = frame
        self.commit(meta)
        return True

    def mark_gap(self) -> None:
        """No window may span this point (reconnect, dropped frames, resolution change)."""
        with self._lock:
            if self._segment_start != self._written:
                self.gaps += 1
            self._segment_start = self._written
        if self.meter is not None:
            self.meter.reset()  # the scene after a gap is compared with itself, not the old one

    # -- reader side (the inference thread) ---------------------------------------------------

    def ready(self) -> bool:
        with self._lock:
            return bool(self._ready)

    def take_window(
        self, out: np.ndarray | None = None, *, newest: bool = False, max_lag: int = 1
    ) -> Window | None:
        """Copy a ready window into ``out`` (C, length, H, W) and describe it; None if none ready.

        Args:
            out: destination (e.g. a slot of a pinned batch tensor); allocated when None.
            newest: live sources: when more than ``max_lag`` windows are ready (inference lags),
                take the newest and count the older ones as skipped. Otherwise, and always when
                False (replay: nothing skipped), take the oldest.
            max_lag: ready windows a live reader may fall behind by before it jumps to the
                newest; 2 rides out a one-window hiccup without losing a window.
        """
        with self._lock:
            # A live writer may be filling the slot of seq _written - capacity right now.
            oldest_intact = self._written - self.capacity + (0 if self.lossless else 1)
            while self._ready and self._ready[0] - self.length + 1 < oldest_intact:
                self._ready.popleft()  # overwritten before anyone took it
                self.windows_skipped += 1
            if not self._ready:
                return None
            if newest and len(self._ready) > max_lag:
                self.windows_skipped += len(self._ready) - 1
                end = self._ready[-1]
                self._ready.clear()
            else:
                end = self._ready.popleft()
            start = end - self.length + 1
            k0 = start % self.capacity
            # (C, 2*cap, H, W)[:, k0:k0+length] is the window: contiguous in time, no wrap.
            out = self._copy_window(self._frames[:, k0 : k0 + self.length], out)
            slots = (np.arange(start, end + 1)) % self.capacity
            activity, newest_active = self._new_activity(start, end)
            window = Window(
                source=self.name,
                first_frame=int(self._index[slots[0]]),
                last_frame=int(self._index[slots[-1]]),
                frame_times=self._wall[slots].copy(),
                last_monotonic=float(self._mono[slots[-1]]),
                seq=end,
                activity=activity,
                newest_active=newest_active,
                scene=self._scene[end % self.capacity],
            )
            self._last_taken = end
            self.windows_taken += 1
            self._taken.notify_all()
            return window

    def _new_activity(self, start: int, end: int) -> tuple[float, int]:  # with the lock held
        """(largest activity, seq of the newest measured active frame or -1) of the frames of
        the window [start, end] that the previous window taken did not hold.

        Judging a window by its new frames only (not all of them) is what lets an active stretch
        cost about its own length in scored windows: by all its frames, every window that still
        held one active frame was scored, 15 frames' worth of windows after each stretch.
        """
        first = max(start, self._last_taken + 1)
        if first > end:  # the same window again (cannot happen: windows move forward)
            first = end
        values = self._activity[np.arange(first, end + 1) % self.capacity]
        active = np.flatnonzero((values > 1.0) & np.isfinite(values))
        newest = first + int(active[-1]) if active.size else -1
        return float(values.max()), newest

    def close(self) -> None:
        """Wake a waiting writer; later writes are refused."""
        with self._lock:
            self._closed = True
            self._taken.notify_all()

    @property
    def closed(self) -> bool:
        """True once the writer is done (source ended) or the run stops."""
        with self._lock:
            return self._closed

    def pending(self) -> int:
        with self._lock:
            return len(self._ready)
