"""The sink protocol: what every output (annotated video, MQTT, webhooks, a web page...) gets
from the event stage, and the bounded queue and thread that keep a slow output from ever
slowing detection.

An output implements :class:`Sink`; :class:`BaseSink` gives it a no-op default for every
message it does not care about. The event router (``streamdet.router``) hands each sink to its
own :class:`SinkWorker`, which owns one thread and two bounded queues (frames, and everything
else) and calls the sink's methods from that thread only, in the order the router offered them:

=====================  ==============================================================
``on_event(msg)``      an event opened, rose or ended (:class:`EventMessage`): the event
                       log line is written, and for ``new``/``end`` fsynced, before it
``on_status(msg)``     a source went online or offline (:class:`StatusMessage`)
``on_scores(msg)``     a window was scored (:class:`ScoresMessage`), every window
``on_frame(msg)``      a decoded frame of a source named by ``frame_sources()``, when
                       ``wants_frame`` said yes
``on_source_ended``    every window of an ended source has been scored
``on_media(msg)``      a clip or snapshot of an event is complete (:class:`MediaMessage`): its
                       log line is written and fsynced before it
``on_stats(stats)``    the run's figures, about twice a second (:class:`RunStats`)
``close()``            after the last message; flush and release
=====================  ==============================================================

Two methods are called from the run's thread instead: ``caught_up()`` and ``progress_text()``
(what the progress line says of this output: keep it short, read counters only).

The router never waits for a sink: a message that finds its queue full is dropped and counted
(``SinkWorker.dropped``). A sink that raises is reported once, gets no further messages (they
count as dropped), and detection goes on. A sink that has work left after its last message (a
replay still being drawn) says so with ``caught_up()``; the run waits for it when detection
ended by itself, never when it was stopped.

Example:
    >>> class Printer(BaseSink):
    ...     name = "printer"
    ...     def on_event(self, msg):
    ...         print(msg.change.type, msg.change.label)
    >>> worker = SinkWorker(Printer())
    >>> worker.start()
    >>> worker.close(timeout=5.0)
    True
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from streamdet.events import EventChange

log = logging.getLogger(__name__)

MAX_MESSAGES = 1024  # events, statuses and scores waiting for one sink
MAX_FRAMES = 8  # frames waiting for one sink (each is a full decoded frame)


@dataclass(frozen=True)
class EventMessage:
    """An event changed. ``line`` is the event log's line for it (None when there is no log)."""

    change: EventChange
    line: Mapping[str, Any] | None
    latency_ms: float | None


@dataclass(frozen=True)
class StatusMessage:
    source: str
    status: str  # "online", "offline" (lost, will retry) or "ended" (a file read to its end)
    reason: str  # redacted
    wall_time: float


@dataclass(frozen=True)
class ScoresMessage:
    """One scored window of ``source`` and the events open after it."""

    source: str
    first_frame: int
    last_frame: int
    probs: np.ndarray
    inference_ms: float
    latency_ms: float
    open_events: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class FrameMessage:
    """A decoded frame (BGR, source resolution) of a live source; ``fps`` is the source's rate.

    ``frame`` is shared by every output that wants the source's frames, and read-only: copy it
    to draw on it."""

    source: str
    index: int
    frame: np.ndarray
    fps: float


@dataclass(frozen=True)
class MediaMessage:
    """A clip or snapshot of an event is complete; ``line`` is its event-log line (``type``
    ``clip`` or ``snapshot``, ``id`` the event's), as written (or as it would be, with no log)."""

    line: Mapping[str, Any]


@dataclass(frozen=True)
class SourceStats:
    """A source's figures as progress lines show them; latencies over its recent windows."""

    fps_in: float
    frames_skipped: int
    windows: int
    windows_skipped: int
    reconnects: int
    status: str
    latency_ms_p50: float = float("nan")
    latency_ms_p99: float = float("nan")
    windows_gated: int | None = None  # of ``windows``, not scored (motion gating); None: off


@dataclass(frozen=True)
class OutputStats:
    """An output's messages delivered and dropped so far, and whether it failed."""

    delivered: int
    dropped: int
    failed: bool


@dataclass(frozen=True)
class RunStats:
    """The run's figures, as ``on_stats`` gets them (nan: nothing measured yet)."""

    sources: Mapping[str, SourceStats]
    inference_ms_p50: float = float("nan")
    inference_ms_p99: float = float("nan")
    latency_ms_p50: float = float("nan")
    latency_ms_p99: float = float("nan")
    events_opened: int = 0
    outputs: Mapping[str, OutputStats] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceHealth:
    """One source's health, as a readiness check judges it.

    Attributes:
        status: ``online``, ``offline``, ``ended`` or ``never online``.
        frames: frames read so far.
        last_frame_time: wall-clock time (UTC epoch s) of the newest frame read; None before
            the first.
        stall_timeout_s: the source's ``options.stall_timeout_s``.
        capture_alive: its capture thread is running.
    """

    status: str
    frames: int
    last_frame_time: float | None
    stall_timeout_s: float
    capture_alive: bool


@dataclass(frozen=True)
class RunHealth:
    """The run's health now: each source's, and whether inference is alive."""

    sources: Mapping[str, SourceHealth]
    inference_alive: bool


class Sink(Protocol):
    """An output of the event stage. Every method is called from the sink's own thread."""

    name: str

    def frame_sources(self) -> Collection[str]:
        """Sources whose decoded frames this sink wants (a frame no sink wants is not decoded)."""
        ...

    def wants_frame(self, source: str, used: bool) -> bool:
        """Whether this sink wants the next frame of ``source`` (``used``: the model's too).
        Called from the source's capture thread before the frame is converted to BGR, so it
        must be cheap and thread-safe; a frame that no sink wants and the model does not use
        (at 30 fps, two in three) is never converted."""
        ...

    def on_event(self, msg: EventMessage) -> None: ...

    def on_status(self, msg: StatusMessage) -> None: ...

    def on_scores(self, msg: ScoresMessage) -> None: ...

    def on_frame(self, msg: FrameMessage) -> None: ...

    def on_source_ended(self, source: str) -> None: ...

    def on_media(self, msg: MediaMessage) -> None: ...

    def on_stats(self, stats: RunStats) -> None: ...

    def caught_up(self) -> bool:
        """False while the sink still has work of its own (a replay being drawn); called from
        the run's thread, unlike the other methods."""
        ...

    def progress_text(self) -> str:
        """What the progress line says of this output ('' for nothing); called from the run's
        thread, so it only reads counters."""
        ...

    def summary_lines(self) -> list[str]:
        """What the run summary says of this output (after ``close``)."""
        ...

    def close(self) -> None: ...


class BaseSink:
    """No-op defaults for every :class:`Sink` method: subclass and override what you need."""

    name = "sink"

    def frame_sources(self) -> Collection[str]:
        return ()

    def wants_frame(self, source: str, used: bool) -> bool:
        return True

    def on_event(self, msg: EventMessage) -> None:
        pass

    def on_status(self, msg: StatusMessage) -> None:
        pass

    def on_scores(self, msg: ScoresMessage) -> None:
        pass

    def on_frame(self, msg: FrameMessage) -> None:
        pass

    def on_source_ended(self, source: str) -> None:
        pass

    def on_media(self, msg: MediaMessage) -> None:
        pass

    def on_stats(self, stats: RunStats) -> None:
        pass

    def caught_up(self) -> bool:
        return True

    def progress_text(self) -> str:
        return ""

    def summary_lines(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


_Call = tuple[Callable[..., None], Any]


class SinkWorker(threading.Thread):
    """One sink's thread and bounded queues; ``offer_*`` never block.

    Args:
        sink: the output.
        max_messages: bound of the queue of events, statuses, scores and stats
            (default ``MAX_MESSAGES``).
        max_frames: bound of the frame queue (default ``MAX_FRAMES``).
    """

    def __init__(
        self, sink: Sink, *, max_messages: int | None = None, max_frames: int | None = None
    ) -> None:
        super().__init__(name=f"sink-{sink.name}", daemon=True)
        self.sink = sink
        self._max_messages = max_messages or MAX_MESSAGES
        self._max_frames = max_frames or MAX_FRAMES
        # The condition's lock protects the queues, the counters and the flags below.
        self._cond = threading.Condition()
        self._messages: deque[_Call] = deque()
        self._frames: deque[_Call] = deque()
        self._closing = False
        self.delivered = 0
        self.dropped = 0
        self.error: BaseException | None = None  # set once, when the sink raised
        self.closed = threading.Event()  # set when the sink's close() has returned (or failed)

    # -- called by the router (any thread): never block ----------------------------------------

    def offer_event(self, msg: EventMessage) -> None:
        self._offer(self._messages, self._max_messages, (self.sink.on_event, msg))

    def offer_status(self, msg: StatusMessage) -> None:
        self._offer(self._messages, self._max_messages, (self.sink.on_status, msg))

    def offer_scores(self, msg: ScoresMessage) -> None:
        self._offer(self._messages, self._max_messages, (self.sink.on_scores, msg))

    def offer_source_ended(self, source: str) -> None:
        self._offer(self._messages, self._max_messages, (self.sink.on_source_ended, source))

    def offer_media(self, msg: MediaMessage) -> None:
        self._offer(self._messages, self._max_messages, (self.sink.on_media, msg))

    def offer_stats(self, stats: RunStats) -> None:
        self._offer(self._messages, self._max_messages, (self.sink.on_stats, stats))

    def offer_frame(self, msg: FrameMessage) -> None:
        self._offer(self._frames, self._max_frames, (self.sink.on_frame, msg))

    def _offer(self, queue: deque[_Call], bound: int, call: _Call) -> None:
        with self._cond:
            if self.error is not None or self._closing or len(queue) >= bound:
                self.dropped += 1
                return
            queue.append(call)
            self._cond.notify()

    def progress_text(self) -> str:
        """The sink's part of the progress line ('' for none, or when it cannot say)."""
        try:
            return str(self.sink.progress_text() or "")
        except Exception:  # an output that cannot describe itself does not spoil the line
            return ""

    def caught_up(self) -> bool:
        """The sink has no work of its own left (or it failed). Messages still queued do not
        count: a hung output must not hold a finished run forever."""
        with self._cond:
            if self.error is not None:
                return True
        try:
            return bool(self.sink.caught_up())
        except Exception:  # a sink that cannot say is not waited for
            return True

    def close(self, timeout: float) -> bool:
        """Deliver what is queued, then the sink's ``close()``; wait up to ``timeout`` seconds.

        Returns False when the sink did not finish in time: it is left to end with the process,
        and what it was never given counts as dropped.
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
        if not self.is_alive() and not self.closed.is_set():  # never started: close it here
            self._close_sink()
        if self.closed.wait(timeout):
            return True
        with self._cond:
            self.dropped += len(self._messages) + len(self._frames)
            self._messages.clear()
            self._frames.clear()
        return False

    # -- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        while (call := self._next()) is not None:
            fn, arg = call
            try:
                fn(arg)
            except Exception as exc:
                self._fail(exc)
                continue
            with self._cond:
                self.delivered += 1
        self._close_sink()

    def _next(self) -> _Call | None:
        """The next call (messages before frames: events must not wait behind pictures); None
        once closing with nothing left, or after the sink failed."""
        with self._cond:
            while True:
                if self.error is not None:
                    return None
                if self._messages:
                    return self._messages.popleft()
                if self._frames:
                    return self._frames.popleft()
                if self._closing:
                    return None
                self._cond.wait()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            self.dropped += len(self._messages) + len(self._frames)
            self._messages.clear()
            self._frames.clear()
        log.error(
            "output %s failed and gets no more messages (detection goes on): %s: %s",
            self.sink.name,
            type(exc).__name__,
            exc,
        )

    def _close_sink(self) -> None:
        started = time.monotonic()
        try:
            self.sink.close()
        except Exception as exc:
            if self.error is None:
                self.error = exc
                log.error(
                    "output %s failed to close: %s: %s", self.sink.name, type(exc).__name__, exc
                )
        finally:
            log.debug("output %s closed in %.2f s", self.sink.name, time.monotonic() - started)
            self.closed.set()
