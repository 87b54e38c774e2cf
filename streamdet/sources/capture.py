"""Capture threads: decode, stamp, preprocess once, write into the source's ring buffer.

A capture thread never waits on inference for a live or paced source: when the ring is full
the oldest frames are overwritten and the windows lost are counted by the ring. A replay
(:class:`~streamdet.sources.pacing.Pacing`) waits instead, so no frame and no window is ever
skipped.

Each :class:`CaptureThread` is a supervisor: every open of its source runs in a session thread
(open, then read until the source fails or ends) and the supervisor is the watchdog of that
session, with the rules of :mod:`streamdet.sources.watchdog`. A read that blocks for the read
timeout ends the session as a stall even when it returns a frame (after a hang FFmpeg flushes
stale frames, each one a full timeout apart). A session that makes no progress at all (no new
frame for ``stall_timeout_s``, or an open far past its timeout) is retired and abandoned: it can
never write to the ring or report a status again, its thread is left to die in its blocking call,
and a new session opens the source. More than ``MAX_ABANDONED_THREADS`` abandoned threads alive
at once stop the run with an error.

A source read with PyAV also gives its encoded packets: with a packet ring (a live source with
event clips on) each session starts a segment of it and appends its packets, stamped with their
frame's index and wall time, before the frame reaches the ring buffer, under the same rule: a
retired session appends nothing. :class:`SourceOpener` picks each source's backend.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamdet.buffer import FrameMeta, RingBuffer
from streamdet.errors import SourceError
from streamdet.preprocess import PreprocessContract, preprocess_frame
from streamdet.redaction import redact_text, redact_url
from streamdet.sources.backoff import Backoff
from streamdet.sources.opening import Backend, OpenCVSource, SourceKind, VideoSource, backend_for
from streamdet.sources.pacing import Pacing
from streamdet.sources.packets import EncodedPacket, PacketRing, StreamInfo
from streamdet.sources.pyav import PyAVSource, UnsupportedSourceError
from streamdet.sources.watchdog import (
    AbandonedThreads,
    Phase,
    Progress,
    Stall,
    StallWatch,
    StuckThreadsError,
)

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
    stalls: int = 0  # sessions ended because no frame came in time (slow read or watchdog)
    abandoned: int = 0  # session threads left blocked in a read or open
    offline_s: float = 0.0  # completed outages; see offline_total() for the current one too
    offline_since: float | None = None  # monotonic start of the current outage
    fps_in: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def offline_total(self, now: float | None = None) -> float:
        """Seconds offline so far, the outage in progress included."""
        since = self.offline_since
        current = 0.0 if since is None else (time.monotonic() if now is None else now) - since
        return self.offline_s + max(current, 0.0)


Opener = Callable[[], VideoSource]
# (frame, contract, ring slot) -> fills the slot: a host array's or a device tensor's preprocessing
Preprocess = Callable[[Any, PreprocessContract, Any], object]

SESSION_JOIN_S = 1.0  # how long a stopping supervisor waits for its session thread


class Outcome(enum.Enum):
    """How a session that opened its source ended. The value is the reason its status gives."""

    STOPPED = "stopped"  # the run is stopping
    RETIRED = "retired"  # the supervisor retired it (stuck): it may publish nothing more
    ENDED = "ended"  # a file's last frame was read
    READ_FAILED = "read failed"  # a camera or stream returned no frame
    STALLED = "stalled"  # a read ran into its timeout; the session's ``stall`` says how long


class _Session:
    """One open of a source, run in its own thread; retired when its generation is stale.

    Written by its thread: ``progress`` (what it does and since when, for the watchdog),
    ``outcome`` and ``stall`` (once it opened the source), ``open_error``, ``error``; ``done`` is
    set last. The supervisor reads them (single attributes: atomic).
    """

    def __init__(self, generation: int, reconnecting: bool) -> None:
        self.generation = generation
        self.reconnecting = reconnecting  # an open before this one was tried
        self.opened_at: float | None = None
        self.progress = Progress()
        self.outcome: Outcome | None = None
        self.stall: Stall | None = None  # why, when the outcome is STALLED
        self.open_error: SourceError | None = None
        self.error: BaseException | None = None
        self.segment: StreamInfo | None = None  # of the packet ring's segment it appends to
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def reason(self) -> str:
        """The reason the source's status gives for this end: "read failed",
        "stalled: a read blocked 4.6 s"."""
        if self.stall is not None:
            return self.stall.reason
        assert self.outcome is not None, "a session that never opened its source has no outcome"
        return self.outcome.value


class CaptureThread(threading.Thread):
    """Reads one source into its ring buffer until the source ends or ``stop_event`` is set.

    Args:
        name: source name.
        opener: opens the source (raises SourceError when it cannot).
        ring: the source's ring buffer (its ``lossless`` flag is ``pacing.lossless``).
        contract: preprocessing of the model.
        stop_event: shared stop signal.
        kind: camera, file or stream; cameras and streams reconnect, files end.
        pacing: how frames are timed: ``LIVE`` for cameras and streams; a file is ``PACED`` (read
            at its fps) or a ``REPLAY`` (read as fast as the ring takes its frames, stamped on
            the file's own timeline).
        on_status: called (in this thread) on each online/offline/ended change.
        on_frame: called (in this thread) with every decoded frame, e.g. for the overlay.
        wants_frame: asked (in this thread) before a frame the model does not sample
            (``frame_step``) is converted: whether ``on_frame`` wants it (None: it wants every
            frame). A frame nobody wants is skipped where the source can (``skip()``: decoded
            without the colour conversion to BGR).
        on_used: called (in this thread) after each frame written to the ring.
        reconnect: reopen lost cameras/streams with backoff.
        backoff: reconnect delays (default 0.5 s doubling to 30 s, with jitter).
        read_timeout_s: the source's read timeout; a read that blocks this long (even one that
            returns a frame) ends the session as a stall. None: reads are not timed.
        stall_timeout_s: watchdog: a session with no new frame for this long is abandoned and the
            source reopened. None: no watchdog. Only sources that reconnect are watched.
        open_timeout_s: the source's open timeout; an open still blocked ``OPEN_GRACE_S`` after
            it is abandoned too.
        abandoned: registry of abandoned threads shared by a run's captures (default: own).
        packet_ring: where the encoded packets of a source that gives them (``drain_packets``)
            go, each stamped with its frame's index and wall time; a segment per session. None:
            packets are not kept. Closed when the capture ends.
        preprocess: writes a frame, as the source gives it, into its ring slot (``frame,
            contract, out``): :func:`~streamdet.preprocess_torch.preprocess_tensor` for the
            tensors of the device path (:mod:`streamdet.sources.decoding`); None:
            :func:`~streamdet.preprocess.preprocess_frame`, for host frames. A ValueError
            skips the frame.
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
        pacing: Pacing,
        on_status: Callable[[StatusChange], None] = lambda change: None,
        on_frame: Callable[[str, FrameMeta, np.ndarray, bool], None] | None = None,
        wants_frame: Callable[[], bool] | None = None,
        on_used: Callable[[], None] | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        read_timeout_s: float | None = None,
        stall_timeout_s: float | None = None,
        open_timeout_s: float = 10.0,
        abandoned: AbandonedThreads | None = None,
        packet_ring: PacketRing | None = None,
        preprocess: Preprocess | None = None,
    ) -> None:
        if (kind is SourceKind.FILE) == (pacing is Pacing.LIVE):
            raise ValueError(
                f"a {kind.value} source cannot be paced {pacing.value}: cameras and "
                "streams are live, files paced or replayed"
            )
        super().__init__(name=f"capture-{name}", daemon=True)
        self.source_name = name
        self._opener = opener
        self.ring = ring
        self.contract = contract
        self.stop_event = stop_event
        self.kind = kind
        self.pacing = pacing
        self.on_status = on_status
        self.on_frame = on_frame
        self.wants_frame = wants_frame
        self.on_used = on_used
        self.reconnect = reconnect and kind is not SourceKind.FILE
        self.backoff = backoff or Backoff(0.5, 30.0)
        # Only sources that reconnect are watched: a file or a source given up on just ends.
        self.watch = StallWatch(
            stall_timeout_s=stall_timeout_s if self.reconnect else None,
            open_timeout_s=open_timeout_s,
            read_timeout_s=read_timeout_s if self.reconnect else None,
        )
        self.abandoned = abandoned if abandoned is not None else AbandonedThreads()
        self.packet_ring = packet_ring
        self.preprocess = preprocess
        self.stats = CaptureStats()
        self.error: BaseException | None = None  # SourceError, or a crash of this thread
        self.last_frame_monotonic = time.monotonic()
        self.fps: float | None = None  # the open source's frame rate
        self._frame_index = -1
        self._shape: tuple[int, ...] | None = None
        # Held while a session publishes (ring commit, status) and while the supervisor retires
        # one: protects _generation, so a retired session can never publish again.
        self._publish_lock = threading.Lock()
        self._generation = 0
        self._online = False  # last status reported was ONLINE (read under _publish_lock)

    def _status(self, status: Status, reason: str) -> None:
        change = StatusChange(self.source_name, status, reason, time.time(), self._frame_index)
        log.info("%s: %s (%s)", self.source_name, status.value, redact_text(reason))
        self.on_status(change)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a crash stops the whole run with this error, never hangs it
            log.error(
                "%s: capture failed: %s: %s",
                self.source_name,
                type(exc).__name__,
                redact_text(str(exc)),
            )
            self.error = exc
            self.stop_event.set()
            self.ring.close()
        finally:
            if self.packet_ring is not None:  # no more packets from this source
                self.packet_ring.close()

    def _run(self) -> None:
        attempts = 0
        while not self.stop_event.is_set():
            attempts += 1
            session = self._start_session(reconnecting=attempts > 1)
            stalled = self._supervise(session)
            if self.stop_event.is_set():
                return
            if (
                stalled
                and attempts == 1
                and session.opened_at is None
                and self.kind is SourceKind.CAMERA
            ):
                # Like a camera that fails to open: a clear error now, not a retry loop.
                self._retire(session)
                assert session.thread is not None
                self.abandoned.add(session.thread)
                self.error = SourceError(
                    f"{self.source_name}: the camera's open never returned ({stalled.detail})"
                )
                self._status(Status.ENDED, str(self.error))
                self.ring.close()
                return
            if stalled:
                self._abandon(session, stalled)
            elif session.error is not None:
                raise session.error
            elif session.open_error is not None:
                exc = session.open_error
                if attempts == 1 and (not self.reconnect or self.kind is SourceKind.CAMERA):
                    self.error = exc
                    self._status(Status.ENDED, redact_text(str(exc)))
                    self.ring.close()
                    return
                if not self.reconnect:
                    self._status(Status.ENDED, "gave up")
                    self.ring.close()
                    return
                log.debug("%s: open failed: %s", self.source_name, redact_text(str(exc)))
                self._go_offline(redact_text(str(exc)))
            else:
                self.ring.mark_gap()  # no window spans an outage or a reopen
                outcome = session.outcome
                if outcome is Outcome.STOPPED:
                    return
                if outcome is Outcome.ENDED or not self.reconnect:
                    self._status(
                        Status.ENDED,
                        "end of file" if self.kind is SourceKind.FILE else session.reason(),
                    )
                    self.ring.close()
                    return
                if outcome is Outcome.STALLED:
                    self.stats.stalls += 1
                self._go_offline(session.reason())
            if session.opened_at is not None:
                self.backoff.healthy_for(time.monotonic() - session.opened_at)
            if self.stop_event.wait(self.backoff.next_delay()):
                return

    # -- sessions and their watchdog ------------------------------------------------------------

    def _start_session(self, *, reconnecting: bool) -> _Session:
        with self._publish_lock:
            self._generation += 1
            session = _Session(self._generation, reconnecting)
        session.thread = threading.Thread(
            target=self._session_main,
            args=(session,),
            name=f"{self.name}-{session.generation}",
            daemon=True,
        )
        session.thread.start()
        return session

    def _supervise(self, session: _Session) -> Stall | None:
        """Wait until ``session`` ends; returns why it must be abandoned (None if it ended)."""
        while not session.done.is_set():
            if self.stop_event.is_set():
                session.done.wait(SESSION_JOIN_S)
                return None
            stuck = self.watch.stuck(session.progress, time.monotonic())
            if stuck is not None:
                return stuck
            session.done.wait(0.1)
        return None

    def _retire(self, session: _Session) -> None:
        """From now on ``session`` can neither commit a frame nor report a status."""
        with self._publish_lock:
            if session.generation == self._generation:
                self._generation += 1

    def _abandon(self, session: _Session, stall: Stall) -> None:
        """Retire a stuck session, then report the stall; its thread is left to die.

        Retired first: from then on the session can neither commit a frame nor report ONLINE,
        so the OFFLINE line and the ring's gap come after everything it published.
        """
        self._retire(session)
        self._go_offline(stall.reason)
        self.ring.mark_gap()  # no window spans the stall
        self.stats.stalls += 1
        self.stats.abandoned += 1
        assert session.thread is not None
        alive = self.abandoned.add(session.thread)
        log.warning(
            "%s: %s; its thread is abandoned (%d abandoned thread(s) alive, limit %d)",
            self.source_name,
            stall.reason,
            alive,
            self.abandoned.limit,
        )
        if alive > self.abandoned.limit:
            raise StuckThreadsError(
                f"{self.source_name}: {alive} capture threads are stuck in calls that never returned "
                f"(limit {self.abandoned.limit}); stopping instead of leaking more"
            )

    def _session_main(self, session: _Session) -> None:
        """Body of a session thread: open, report online, read until done, release."""
        try:
            try:
                source = self._opener()
            except SourceError as exc:
                session.open_error = exc
                return
            try:
                with self._publish_lock:
                    if session.generation != self._generation:
                        session.outcome = Outcome.RETIRED
                        return
                    session.opened_at = time.monotonic()
                    session.progress.enter(Phase.READING)
                    self._went_online(session.reconnecting)
                session.outcome = self._read_loop(source, session)
            finally:
                session.progress.enter(Phase.RELEASING)
                source.release()
        except BaseException as exc:  # the supervisor re-raises it in its own thread
            session.error = exc
        finally:
            session.done.set()

    def _went_online(self, reconnecting: bool) -> None:
        """Account for the outage that ends now and report ONLINE (under ``_publish_lock``)."""
        now = time.monotonic()
        since = self.stats.offline_since
        if since is not None:
            self.stats.offline_s += now - since
            self.stats.offline_since = None
        if reconnecting:
            self.stats.reconnects += 1
        self._online = True
        self._status(Status.ONLINE, "opened")

    def _go_offline(self, reason: str) -> None:
        """Report OFFLINE once per outage and start timing it (supervisor thread only)."""
        if self._online or self.stats.offline_since is None:
            self._online = False
            self.stats.offline_since = time.monotonic()
            self._status(Status.OFFLINE, reason)

    def _current(self, session: _Session) -> bool:
        return session.generation == self._generation

    def _read_loop(self, source: VideoSource, session: _Session) -> Outcome:
        """Read until the source fails, ends, stalls or the session is retired. Returns how."""
        self.fps = source.fps
        step = self.contract.step_for(source.fps) if source.fps else self.contract.frame_step
        pace_fps = source.fps if self.pacing is Pacing.PACED else None
        t0 = time.monotonic()
        # A replay is stamped on the file's own timeline from the open, so stream times, and the
        # events that depend on them, do not depend on decoding speed.
        replay_clock = (
            (time.time(), source.fps or self.contract.fps) if self.pacing is Pacing.REPLAY else None
        )
        # Frames nobody looks at need no colour conversion: skip them where the source can.
        skip = getattr(source, "skip", None)
        drain = getattr(source, "drain_packets", None) if self.packet_ring is not None else None
        n_in_session = 0
        fps_window_start, fps_window_count = time.monotonic(), 0
        while not self.stop_event.is_set():
            used = n_in_session % step == 0
            read_started = time.monotonic()
            if used or skip is None or self._frame_wanted():
                frame = source.read()
                got = frame is not None
            else:
                frame, got = None, bool(skip())
            now_mono = time.monotonic()
            if not self._current(session):
                return Outcome.RETIRED
            stall = self.watch.slow_read(read_started, now_mono)
            if stall is not None:  # a stale frame or none: reopen (see StallWatch.slow_read)
                session.stall = stall
                return Outcome.STALLED
            if not got:
                return Outcome.ENDED if self.kind is SourceKind.FILE else Outcome.READ_FAILED
            session.progress.beat(now_mono)
            wall = replay_clock[0] + n_in_session / replay_clock[1] if replay_clock else time.time()
            self._frame_index += 1
            self.stats.frames_read += 1
            self.last_frame_monotonic = now_mono
            fps_window_count += 1
            if now_mono - fps_window_start >= 0.5:  # short, so a brief replay shows its rate too
                self.stats.fps_in = fps_window_count / (now_mono - fps_window_start)
                fps_window_start, fps_window_count = now_mono, 0
            meta = FrameMeta(self._frame_index, wall, now_mono)
            n_in_session += 1
            if drain is not None:  # before the frame reaches inference: an event's packets are
                self._keep_packets(source, drain(meta.index, meta.wall_time), session)  # kept
            if used:
                assert frame is not None
                self._write(frame, meta, session)
            if frame is not None and self.on_frame is not None and self._current(session):
                self.on_frame(self.source_name, meta, frame, used)
            if pace_fps:
                due = t0 + n_in_session / pace_fps
                delay = due - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break
        return Outcome.STOPPED

    def _frame_wanted(self) -> bool:
        """Whether ``on_frame`` wants a frame the model does not use."""
        if self.on_frame is None:
            return False
        return self.wants_frame is None or self.wants_frame()

    def _keep_packets(
        self, source: VideoSource, packets: list[EncodedPacket], session: _Session
    ) -> None:
        """Append a session's packets to the packet ring, in a new segment at its start and when
        the picture size changes (a clip never spans two sizes). Only the current session may:
        a retired one's packets would join the wrong segment."""
        if not packets:
            return
        assert self.packet_ring is not None
        with self._publish_lock:
            if not self._current(session):
                return
            info: StreamInfo = source.stream_info  # type: ignore[attr-defined]
            if session.segment is None or _size(info) != _size(session.segment):
                self.packet_ring.start_segment(info)  # a (re)connect, or a new picture size
                session.segment = info
            for packet in packets:
                self.packet_ring.append(packet)

    def _write(self, frame: Any, meta: FrameMeta, session: _Session) -> None:
        shape = frame.shape
        if self._shape is not None and shape != self._shape:
            log.info(
                "%s: resolution changed %s -> %s", self.source_name, self._shape[:2], shape[:2]
            )
            self.ring.mark_gap()
        self._shape = shape
        while not self.stop_event.is_set():
            slot = self.ring.slot(timeout=0.5)
            if slot is not None:
                break
            if self.ring.closed:
                return
        else:
            return
        # Only the current session may fill the slot and publish it: a retired one that wakes up
        # from a stuck read finds a newer generation and drops its frame.
        with self._publish_lock:
            if not self._current(session):
                return
            try:
                preprocess = self.preprocess or preprocess_frame
                preprocess(frame, self.contract, slot)
            except ValueError:
                self.stats.frames_skipped += 1
                self.ring.mark_gap()
                return
            self.ring.commit(meta)
        self.stats.frames_used += 1
        if self.on_used is not None:
            self.on_used()


def _size(info: StreamInfo) -> tuple[int, int]:
    return info.width, info.height


class SourceOpener:
    """Opens one source with its backend, for :class:`CaptureThread` (each call, a new open).

    With ``backend="auto"`` a file or stream is read with PyAV and a camera index with OpenCV
    (:func:`~streamdet.sources.opening.backend_for`). When PyAV cannot read a source at all
    (its format, codec or protocol: :class:`~streamdet.sources.pyav.UnsupportedSourceError`, not
    a source that is unreachable now) and OpenCV can, OpenCV reads it from then on, logged once;
    it gives no encoded packets (no event clips for that source).

    Args:
        url: camera index, file path or stream URL.
        backend: ``auto``, ``pyav`` or ``opencv`` (``sources[].options.backend``).
        open_timeout_s: for URLs, give up opening after this long.
        read_timeout_s: for URLs, a read blocking this long fails.
        fps: override the reported frame rate.
        decode_threads: FFmpeg decoding threads (None: FFmpeg's choice).
        keep_packets: PyAV keeps the encoded packets (``drain_packets``) for a packet ring.

    Raises:
        ConfigError: ``pyav`` asked for a camera index.
    """

    def __init__(
        self,
        url: str,
        *,
        backend: str = "auto",
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        fps: float | None = None,
        decode_threads: int | None = None,
        keep_packets: bool = False,
    ) -> None:
        self.url = url
        self.backend = backend_for(url, backend)
        self.fallback = backend == "auto"
        self.keep_packets = keep_packets
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.fps = fps
        self.decode_threads = decode_threads

    def __call__(self) -> VideoSource:
        if self.backend is Backend.OPENCV:
            return self._opencv()
        try:
            return self._pyav()
        except UnsupportedSourceError as exc:
            if not self.fallback:
                raise
            try:
                source = self._opencv()
            except SourceError:
                raise exc from None  # PyAV's reason says more
            self.backend = Backend.OPENCV
            log.warning(
                "%s: PyAV cannot read it (%s); OpenCV reads it from now on (no event clips)",
                redact_url(self.url),
                redact_text(str(exc)),
            )
            return source

    def _pyav(self) -> PyAVSource:
        return PyAVSource(
            self.url,
            open_timeout_s=self.open_timeout_s,
            read_timeout_s=self.read_timeout_s,
            fps=self.fps,
            decode_threads=self.decode_threads,
            keep_packets=self.keep_packets,
        )

    def _opencv(self) -> OpenCVSource:
        return OpenCVSource(
            self.url,
            open_timeout_s=self.open_timeout_s,
            read_timeout_s=self.read_timeout_s,
            fps=self.fps,
            decode_threads=self.decode_threads,
        )

    def __repr__(self) -> str:
        return f"SourceOpener({redact_url(self.url)!r}, backend={self.backend.value!r})"


def make_opener(
    url: str,
    *,
    backend: str = "auto",
    open_timeout_s: float = 10.0,
    read_timeout_s: float = 5.0,
    fps: float | None = None,
    decode_threads: int | None = None,
    keep_packets: bool = False,
) -> Opener:
    """An opener for :class:`CaptureThread` reading ``url`` (see :class:`SourceOpener`)."""
    return SourceOpener(
        url,
        backend=backend,
        open_timeout_s=open_timeout_s,
        read_timeout_s=read_timeout_s,
        fps=fps,
        decode_threads=decode_threads,
        keep_packets=keep_packets,
    )


__all__ = [
    "CaptureStats",
    "CaptureThread",
    "Opener",
    "SourceOpener",
    "Status",
    "StatusChange",
    "make_opener",
]
