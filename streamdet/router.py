"""The event stage: window scores in, events out, to the event log and to every output.

:class:`EventRouter` owns the event tracker and the JSONL event log. Inference hands it each
batch of scored windows, the capture threads their status changes and frames; it turns them
into event changes and fans everything out to the outputs (``streamdet.sinks.base.Sink``), each
behind its own bounded queue and thread (:class:`~streamdet.sinks.base.SinkWorker`).

Guarantees:

- The event log is the record, and it is written synchronously: an event's ``new`` line is
  written and fsynced before any output sees that event, and lines keep the tracker's order.
- Outputs never slow detection: offering them a message never blocks. A slow or hung output
  loses messages (counted per output in progress lines and the summary); one that raises is
  reported once and gets nothing more.
- A frame is decoded only when some output wants that source's frames
  (:meth:`EventRouter.wants_frames`).

Locking: ``_lock`` protects the tracker, the log and the counters. Under it the router calls
only the log (the record, whose lines must follow the tracker's order) and the outputs'
non-blocking ``offer_*``; it never waits for an output.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from streamdet.events import EndReason, EventChange, EventTracker, TrackerSettings, window_span
from streamdet.redaction import redact_text
from streamdet.sinks.base import (
    EventMessage,
    FrameMessage,
    MediaMessage,
    RunStats,
    ScoresMessage,
    Sink,
    SinkWorker,
    StatusMessage,
)
from streamdet.sinks.jsonl import EventLog
from streamdet.sources.capture import Status, StatusChange

if TYPE_CHECKING:
    from streamdet.inference import WindowResult

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 6.0  # for an output to finish its queue and close, at the end of a run


class EventRouter:
    """Tracks events from window scores and hands them to the log and the outputs.

    Args:
        settings: the event tracker's settings.
        run_id: the run's id (event ids start with it).
        stride: window stride in frames (an event spans the central ``stride`` frames of its
            windows).
        event_log: the JSONL log, or None for none. The router closes it.
        sinks: the other outputs.
        urls: each source's URL, redacted, to name a source that never came online.

    The ``on_*`` methods are called from the inference and capture threads.
    """

    def __init__(
        self,
        settings: TrackerSettings,
        *,
        run_id: str,
        stride: int,
        event_log: EventLog | None = None,
        sinks: Sequence[Sink] = (),
        urls: Mapping[str, str] | None = None,
    ) -> None:
        self.run_id = run_id
        self.stride = stride
        self.event_log = event_log
        self.workers = [SinkWorker(s) for s in sinks]
        self._frame_workers: dict[str, list[SinkWorker]] = {}
        for w in self.workers:
            for source in w.sink.frame_sources():
                self._frame_workers.setdefault(source, []).append(w)
        # Outputs that add to event lines (the media output: the snapshot's path on ``end``)
        # define ``event_line_fields(change) -> Mapping``; it must only compute, never wait.
        self._line_fields = [
            f for w in self.workers if (f := getattr(w.sink, "event_line_fields", None)) is not None
        ]
        self._urls = dict(urls or {})
        self._lock = threading.Lock()  # protects everything below
        # Event ids start with the run id: several runs append to one log, each counting from 1.
        self.tracker = EventTracker(settings, id_prefix=f"{run_id}-")
        self._status: dict[str, str] = {}
        self._online_once: set[str] = set()
        self._not_yet_online: dict[str, str] = {}  # source -> why it was offline before that
        self._released: set[str] = set()  # handed to another node: their later lines are dropped
        self.latency_ms: deque[float] = deque(maxlen=4096)
        self._source_latency_ms: dict[str, deque[float]] = {}
        self.event_counts: dict[str, int] = {}
        self.events_opened = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def close(self, reason: EndReason = "shutdown") -> None:
        """End every open event with ``reason``, let each output finish, then close the log.

        The log closes last: an output that completes media as the run stops (a clip cut from
        a replayed file, a clip whose camera stopped) still gets its line written.

        Raises:
            StreamdetError: the log could not be written or closed (the outputs are closed all
                the same).
        """
        try:
            with self._lock:
                self._emit(self.tracker.close_all(reason), None)
        finally:
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            for w in self.workers:
                if not w.close(max(0.0, deadline - time.monotonic())):
                    log.warning(
                        "output %s did not finish in %.0f s: left to end with the process",
                        w.sink.name,
                        CLOSE_TIMEOUT_S,
                    )
            if self.event_log is not None:
                self.event_log.close()

    def caught_up(self) -> bool:
        """True when no output still has work queued or of its own (a replay being drawn)."""
        return all(w.caught_up() for w in self.workers)

    # -- inputs ------------------------------------------------------------------------------

    def wants_frames(self, source: str) -> bool:
        return source in self._frame_workers

    def wants_frame(self, source: str, used: bool) -> bool:
        """Whether an output wants ``source``'s next frame (capture threads ask before they
        convert a frame the model does not use)."""
        return any(w.sink.wants_frame(source, used) for w in self._frame_workers.get(source, ()))

    def on_frame(self, source: str, index: int, frame: np.ndarray, fps: float, used: bool) -> None:
        # One array for every output that wants it: read-only, so none can draw on another's
        # picture (the overlay's labels in the web page's frame or in a snapshot).
        frame.flags.writeable = False
        msg = FrameMessage(source, index, frame, fps)
        for w in self._frame_workers.get(source, ()):
            if w.sink.wants_frame(source, used):
                w.offer_frame(msg)

    def on_status(self, change: StatusChange) -> None:
        """A source went online or offline, or ended (a file's last frame was read: its events
        end when its last window is scored, :meth:`on_source_done`)."""
        status, reason = change.status.value, redact_text(change.reason)
        with self._lock:
            if change.source in self._released:
                return
            self._note_first_online(change.source, status, reason)
            self._publish_status(
                change.source,
                status,
                reason,
                change.wall_time,
                log_it=change.status is not Status.ENDED,
            )
            if change.status is Status.OFFLINE:
                self._emit(self.tracker.close_source(change.source, "stream_lost"), None)

    def on_source_done(self, source: str) -> None:
        """Every window of an ended source has been scored: end its events."""
        with self._lock:
            if source in self._released:
                return
            self._emit(self.tracker.close_source(source, "stream_ended"), None)
            if self.event_log is not None:
                self.event_log.write_status(source, "offline", "ended", time.time())
            for w in self.workers:
                w.offer_source_ended(source)

    def release(self, source: str, reason: str) -> bool:
        """Let ``source`` go (another node of a cluster takes it), unless it has an open event:
        it goes ``offline`` with ``reason``, and nothing more of it is written (its windows still
        scored, a late status change, its end). Checked and done under the lock, so no event can
        open in between and none is cut.

        Returns:
            False, and nothing done, while ``source`` has an open event.
        """
        with self._lock:
            if self.tracker.open_events(source):
                return False
            self._released.add(source)
            self._publish_status(source, "offline", redact_text(reason), time.time())
            return True

    def _publish_status(
        self, source: str, status: str, reason: str, wall_time: float, *, log_it: bool = True
    ) -> None:  # under _lock
        """Note ``source``'s status, write its line (``log_it``) and hand it to every output."""
        self._status[source] = status
        if self.event_log is not None and log_it:
            self.event_log.write_status(source, status, reason, wall_time)
        msg = StatusMessage(source, status, reason, wall_time)
        for w in self.workers:
            w.offer_status(msg)

    def on_results(self, results: Sequence[WindowResult]) -> None:
        """Scored windows, in the order inference took them."""
        with self._lock:
            for r in results:
                self._score(r)

    def _score(self, r: WindowResult) -> None:
        w = r.window
        if self._status.get(w.source) == "offline":
            # Scored after its source went offline (a window from before the outage): its
            # events already ended with stream_lost; none may open during the outage.
            return
        span = window_span(w.first_frame, w.last_frame, w.frame_times, self.stride)
        changes = self.tracker.update(
            w.source, w.first_frame, w.last_frame, w.first_time, w.last_time, r.probs, span=span
        )
        self._emit(changes, w.last_monotonic)
        latency = (time.monotonic() - w.last_monotonic) * 1000.0  # newest frame -> lines written
        if not r.gated:  # the latency figures are those of scored windows (a gated one is ~0)
            self.latency_ms.append(latency)
            self._source_latency_ms.setdefault(w.source, deque(maxlen=1024)).append(latency)
        if self.workers:
            open_events = tuple((e.label, e.score) for e in self.tracker.open_events(w.source))
            msg = ScoresMessage(
                w.source, w.first_frame, w.last_frame, r.probs, r.inference_ms, latency, open_events
            )
            for worker in self.workers:
                worker.offer_scores(msg)

    def publish_stats(self, stats: RunStats) -> None:
        for w in self.workers:
            w.offer_stats(stats)

    def record_media(self, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        """An output finished a clip or snapshot of an event: append its line to the log
        (fsynced), then hand it to every output (the one that made it too). Called from that
        output's thread. Returns the line.

        ``fields`` holds ``type`` (``clip`` or ``snapshot``), ``id`` (the event's), ``source``
        and what the media says of itself (``path``, ...).

        Raises:
            StreamdetError: the log cannot be written (the line is not handed on).
        """
        with self._lock:
            line: Mapping[str, Any] = dict(fields)
            if self.event_log is not None:
                line = self.event_log.write_media(dict(fields))
            msg = MediaMessage(line)
            for w in self.workers:
                w.offer_media(msg)
        return line

    # -- what the run reports ----------------------------------------------------------------

    def latencies(self, source: str | None = None) -> list[float]:
        """Recent window latencies (ms), of every source or of ``source``."""
        with self._lock:
            if source is None:
                return list(self.latency_ms)
            return list(self._source_latency_ms.get(source, ()))

    def status(self, source: str) -> str:
        with self._lock:
            return self._status.get(source, "never online")

    def never_online(self, source: str) -> str | None:
        """Why ``source`` never came online in this run; None if it did."""
        with self._lock:
            if source in self._online_once:
                return None
            pending = "still opening when the run stopped"
            return self._not_yet_online.get(source) or self._with_url(source, pending)

    def output_counts(self) -> list[tuple[str, int, int, bool]]:
        """(name, delivered, dropped, failed) per output."""
        return [(w.sink.name, w.delivered, w.dropped, w.error is not None) for w in self.workers]

    @property
    def lines_written(self) -> int:
        return self.event_log.lines_written if self.event_log is not None else 0

    # -- internals (under _lock) -------------------------------------------------------------

    def _emit(self, changes: Collection[EventChange], last_monotonic: float | None) -> None:
        for change in changes:
            if change.type == "new":
                self.events_opened += 1
                self.event_counts[change.label] = self.event_counts.get(change.label, 0) + 1
            latency = (
                None if last_monotonic is None else (time.monotonic() - last_monotonic) * 1000.0
            )
            line = None
            if self.event_log is not None:  # written (and fsynced) before any output sees it
                extra: dict[str, Any] = {}
                for fields in self._line_fields:
                    extra.update(fields(change))
                line = self.event_log.write_event(change, latency_ms=latency, extra=extra)
            msg = EventMessage(change, line, latency)
            for w in self.workers:
                w.offer_event(msg)
            if change.type in ("new", "end"):
                log.info(
                    "%s %s %s score %.2f%s",
                    change.type,
                    change.source,
                    change.label,
                    change.score,
                    f" ({change.end_reason})" if change.end_reason else "",
                )

    def _note_first_online(self, source: str, status: str, reason: str) -> None:  # under _lock
        """Track whether a source has come online yet; warn once about one that cannot at start.

        Only a source that reconnects goes offline before its first open: one that does not (a
        webcam index, a file, ``reconnect: false``) is an error instead.
        """
        if status == "online":
            self._online_once.add(source)
        elif (
            status == "offline"
            and source not in self._online_once
            and source not in self._not_yet_online
        ):
            why = self._with_url(source, reason)
            self._not_yet_online[source] = why
            log.warning(
                "%s: not online at start, retrying with backoff until it comes online: %s",
                source,
                why,
            )

    def _with_url(self, source: str, reason: str) -> str:
        """``reason`` naming the source's redacted URL, which open errors already do."""
        url = self._urls.get(source, "")
        return reason if not url or url in reason else f"{url}: {reason}"
