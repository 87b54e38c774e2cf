"""Capture threads: decode, stamp, preprocess once, write into the source's ring buffer.

A capture thread never waits on inference for live sources: when the ring is full the oldest
frames are overwritten and the windows lost are counted by the ring. File replays
(``realtime: false``) wait instead, so no frame and no window is ever skipped.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from streamdet.buffer import FrameMeta, RingBuffer
from streamdet.errors import SourceError, StreamdetError
from streamdet.preprocess import PreprocessContract, preprocess_frame
from streamdet.sources import OpenCVSource, SourceKind, VideoSource, redact_text, redact_url, source_kind

log = logging.getLogger(__name__)


class Status(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    ENDED = "ended"


@dataclass(frozen=True)
class StatusChange:
    """A source went online, offline (lost, will retry) or ended (file over, or gave up)."""

    source: str
    status: Status
    reason: str
    wall_time: float
    frame: int  # index of the last frame read before the change (-1 if none)


@dataclass
class CaptureStats:
    """Counters of one source; written by its capture thread, read by anyone (ints: atomic)."""

    frames_read: int = 0
    frames_used: int = 0  # sampled by the frame step and written to the ring
    frames_skipped: int = 0  # read but not used because the ring was busy (live)
    reconnects: int = 0
    stalls: int = 0
    offline_s: float = 0.0
    fps_in: float = 0.0
    started: float = field(default_factory=time.monotonic)


Opener = Callable[[], VideoSource]


class Backoff:
    """Exponential backoff with full jitter, reset after a healthy period.

    Example:
        >>> b = Backoff(0.5, 30.0, rng=random.Random(0))
        >>> [round(b.next_delay(), 2) for _ in range(3)]
        [0.46, 0.88, 1.42]
    """

    def __init__(self, initial: float, maximum: float, *, healthy_after: float = 60.0,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.healthy_after = healthy_after
        self._attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * (2 ** self._attempt))
        self._attempt += 1
        return self._rng.uniform(cap / 2, cap)

    def healthy_for(self, seconds: float) -> None:
        if seconds >= self.healthy_after:
            self._attempt = 0


class CaptureThread(threading.Thread):
    """Reads one source into its ring buffer until the source ends or ``stop_event`` is set.

    Args:
        name: source name.
        opener: opens the source (raises SourceError when it cannot).
        ring: the source's ring buffer (its ``lossless`` flag matches ``realtime is False``).
        contract: preprocessing of the model.
        stop_event: shared stop signal.
        kind: camera, file or stream; cameras and streams reconnect, files end.
        realtime: pace a file at its fps (live-like); ignored for cameras and streams.
        on_status: called (in this thread) on each online/offline/ended change.
        on_frame: called (in this thread) with every decoded frame, e.g. for the overlay.
        reconnect: reopen lost cameras/streams with backoff.
    """

    def __init__(
        self,
        name: str,
        opener: Opener,
        ring: RingBuffer,
        contract: PreprocessContract,
        stop_event: threading.Event,
        *,
        kind: SourceKind,
        realtime: bool,
        on_status: Callable[[StatusChange], None] = lambda change: None,
        on_frame: Callable[[str, FrameMeta, np.ndarray, bool], None] | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(name=f"capture-{name}", daemon=True)
        self.source_name = name
        self._opener = opener
        self.ring = ring
        self.contract = contract
        self.stop_event = stop_event
        self.kind = kind
        self.realtime = realtime or kind is not SourceKind.FILE
        self.on_status = on_status
        self.on_frame = on_frame
        self.reconnect = reconnect and kind is not SourceKind.FILE
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.stats = CaptureStats()
        self.error: StreamdetError | None = None
        self.last_frame_monotonic = time.monotonic()
        self.fps: float | None = None  # the open source's frame rate
        self._frame_index = -1
        self._shape: tuple[int, ...] | None = None

    def _status(self, status: Status, reason: str) -> None:
        change = StatusChange(self.source_name, status, reason, time.time(), self._frame_index)
        log.info("%s: %s (%s)", self.source_name, status.value, redact_text(reason))
        self.on_status(change)

    def run(self) -> None:
        first = True
        offline_since: float | None = None
        while not self.stop_event.is_set():
            try:
                source = self._opener()
            except SourceError as exc:
                if first and (not self.reconnect or self.kind is SourceKind.CAMERA):
                    self.error = exc
                    self._status(Status.ENDED, redact_text(str(exc)))
                    self.ring.close()
                    return
                if first:
                    self._status(Status.OFFLINE, redact_text(str(exc)))
                    offline_since = time.monotonic()
                first = False
                if not self.reconnect:
                    self._status(Status.ENDED, "gave up")
                    self.ring.close()
                    return
                if self.stop_event.wait(self.backoff.next_delay()):
                    return
                continue
            if offline_since is not None:
                self.stats.offline_s += time.monotonic() - offline_since
                offline_since = None
            if not first:
                self.stats.reconnects += 1
            first = False
            self._status(Status.ONLINE, "opened")
            opened_at = time.monotonic()
            try:
                ended = self._read_loop(source)
            finally:
                source.release()
            self.ring.mark_gap()  # no window spans an outage or a reopen
            if self.stop_event.is_set():
                return
            if ended == "ended" or not self.reconnect:
                self._status(Status.ENDED, "end of file" if self.kind is SourceKind.FILE else ended)
                self.ring.close()
                return
            self._status(Status.OFFLINE, ended)
            offline_since = time.monotonic()
            self.backoff.healthy_for(time.monotonic() - opened_at)
            if self.stop_event.wait(self.backoff.next_delay()):
                return

    def _read_loop(self, source: VideoSource) -> str:
        """Read until the source fails or ends. Returns why: 'ended' or 'read failed'."""
        self.fps = source.fps
        step = self.contract.step_for(source.fps) if source.fps else self.contract.frame_step
        pace = self.kind is SourceKind.FILE and self.realtime and source.fps
        t0 = time.monotonic()
        n_in_session = 0
        fps_window_start, fps_window_count = time.monotonic(), 0
        while not self.stop_event.is_set():
            frame = source.read()
            now_mono = time.monotonic()
            if frame is None:
                return "ended" if self.kind is SourceKind.FILE else "read failed"
            wall = time.time()
            self._frame_index += 1
            self.stats.frames_read += 1
            self.last_frame_monotonic = now_mono
            fps_window_count += 1
            if now_mono - fps_window_start >= 2.0:
                self.stats.fps_in = fps_window_count / (now_mono - fps_window_start)
                fps_window_start, fps_window_count = now_mono, 0
            meta = FrameMeta(self._frame_index, wall, now_mono)
            used = n_in_session % step == 0
            n_in_session += 1
            if used:
                self._write(frame, meta)
            if self.on_frame is not None:
                self.on_frame(self.source_name, meta, frame, used)
            if pace:
                due = t0 + n_in_session / source.fps
                delay = due - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break
        return "stopped"

    def _write(self, frame: np.ndarray, meta: FrameMeta) -> None:
        shape = frame.shape
        if self._shape is not None and shape != self._shape:
            log.info("%s: resolution changed %s -> %s", self.source_name, self._shape[:2], shape[:2])
            self.ring.mark_gap()
        self._shape = shape
        while not self.stop_event.is_set():
            slot = self.ring.slot(timeout=0.5)
            if slot is not None:
                break
        else:
            return
        try:
            preprocess_frame(frame, self.contract, out=slot)
        except ValueError:
            self.stats.frames_skipped += 1
            self.ring.mark_gap()
            return
        self.ring.commit(meta)
        self.stats.frames_used += 1


def make_opener(url: str, *, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0,
                fps: float | None = None) -> Opener:
    """An opener for :class:`CaptureThread` reading ``url`` with OpenCV."""

    def open_source() -> VideoSource:
        return OpenCVSource(url, open_timeout_s=open_timeout_s, read_timeout_s=read_timeout_s, fps=fps)

    open_source.__doc__ = f"Open {redact_url(url)}"
    return open_source


__all__ = ["Backoff", "CaptureStats", "CaptureThread", "Status", "StatusChange", "make_opener", "source_kind"]
