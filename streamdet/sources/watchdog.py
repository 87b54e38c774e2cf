"""The capture watchdog: when a session reading a source is stuck, and the threads it leaves.

A session (one open of a source, in its own thread) reports what it is doing in a
:class:`Progress`; the capture's supervisor asks a :class:`StallWatch` whether that progress has
stopped. A stuck session is retired and its thread abandoned to die in its blocking call; the
run's :class:`AbandonedThreads` bounds how many such threads may be alive at once.

Example:
    >>> watch = StallWatch(stall_timeout_s=5.0, open_timeout_s=10.0, read_timeout_s=2.0)
    >>> progress = Progress()
    >>> progress.enter(Phase.READING)
    >>> watch.stuck(progress, now=progress.heartbeat + 1.0) is None
    True
    >>> watch.stuck(progress, now=progress.heartbeat + 6.0).reason
    'stalled: no frame for 6.0 s'
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

from streamdet.errors import SourceError

__all__ = [
    "MAX_ABANDONED_THREADS",
    "AbandonedThreads",
    "Phase",
    "Progress",
    "Stall",
    "StallWatch",
    "StuckThreadsError",
]

MAX_ABANDONED_THREADS = 8  # alive at once, over all sources of a run; one more stops the run
OPEN_GRACE_S = 5.0  # an open may overrun its own timeout this long before it is abandoned
RELEASE_GRACE_S = 5.0  # a release blocking longer than this is abandoned
SLOW_READ_FRACTION = 0.9  # a read blocking this fraction of the read timeout is a stall


class Phase(enum.Enum):
    """What a session thread is doing."""

    OPENING = "opening"
    READING = "reading"
    RELEASING = "releasing"


class Progress:
    """What a session is doing and since when: written by its thread, read by the watchdog.

    ``heartbeat`` is the monotonic time of the phase's start, then of each frame read. Single
    attributes, so reads and writes are atomic; ``enter`` writes the phase last, so the watchdog
    never sees the new phase with the old times.
    """

    def __init__(self) -> None:
        self.phase_started = self.heartbeat = time.monotonic()
        self.phase = Phase.OPENING

    def enter(self, phase: Phase) -> None:
        self.phase_started = self.heartbeat = time.monotonic()
        self.phase = phase

    def beat(self, now: float) -> None:
        """A frame came at monotonic time ``now``."""
        self.heartbeat = now


@dataclass(frozen=True)
class Stall:
    """Why a session is making no progress, e.g. ``Stall("no frame for 5.2 s")``."""

    detail: str

    @property
    def reason(self) -> str:
        """The words of the source's offline status: ``"stalled: no frame for 5.2 s"``."""
        return f"stalled: {self.detail}"


class StallWatch:
    """The rules that make a session stuck. Only sources that reconnect are watched.

    Args:
        stall_timeout_s: a reading session with no new frame for this long is stuck; an opening
            one ``OPEN_GRACE_S`` past ``open_timeout_s``, and a releasing one after
            ``RELEASE_GRACE_S``. None: the supervisor never finds a session stuck.
        open_timeout_s: the source's open timeout.
        read_timeout_s: the source's read timeout: a read blocking ``SLOW_READ_FRACTION`` of it
            is a stall, even one that returns a frame. None: reads are not timed.
    """

    def __init__(
        self, *, stall_timeout_s: float | None, open_timeout_s: float, read_timeout_s: float | None
    ) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s

    def stuck(self, progress: Progress, now: float) -> Stall | None:
        """Why a session with this ``progress`` is stuck at monotonic ``now`` (None: it is not)."""
        if self.stall_timeout_s is None:
            return None
        phase = progress.phase  # first: enter() writes the times before the phase
        if phase is Phase.READING and now - progress.heartbeat > self.stall_timeout_s:
            return Stall(f"no frame for {now - progress.heartbeat:.1f} s")
        opening_limit = self.open_timeout_s + OPEN_GRACE_S
        if phase is Phase.OPENING and now - progress.phase_started > opening_limit:
            return Stall(f"open blocked for {now - progress.phase_started:.1f} s")
        if phase is Phase.RELEASING and now - progress.phase_started > RELEASE_GRACE_S:
            return Stall(f"release blocked for {now - progress.phase_started:.1f} s")
        return None

    def slow_read(self, started: float, now: float) -> Stall | None:
        """A stall when a read that began at ``started`` ran (nearly) into its timeout by ``now``.

        After a hang FFmpeg flushes stale frames, each a full timeout apart: such a read is a
        stall whether it returned nothing or a stale frame, and the source is reopened.
        """
        if self.read_timeout_s is None or now - started < self.read_timeout_s * SLOW_READ_FRACTION:
            return None
        return Stall(f"a read blocked {now - started:.1f} s")


class StuckThreadsError(SourceError):
    """Too many capture threads are blocked in reads or opens that never returned."""


class AbandonedThreads:
    """The session threads left blocked in a call that never returned, with a bound.

    One registry is shared by the captures of a run. Threads that finally return drop out.

    Example:
        >>> graveyard = AbandonedThreads(limit=8)
        >>> graveyard.alive()
        0
    """

    def __init__(self, limit: int = MAX_ABANDONED_THREADS) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, but got {limit}")
        self.limit = limit
        self._lock = threading.Lock()  # protects _threads
        self._threads: list[threading.Thread] = []

    def add(self, thread: threading.Thread) -> int:
        """Record an abandoned thread; returns how many abandoned threads are alive."""
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            if thread.is_alive():
                self._threads.append(thread)
            return len(self._threads)

    def alive(self) -> int:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            return len(self._threads)
