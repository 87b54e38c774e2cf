"""The driver's end of a cluster run: one event log and one set of outputs, fed by every node.

:class:`ClusterLog` takes each node's records (:mod:`streamdet.distributed.records`) and writes
them to the JSONL log in the order they arrive: ``seq`` stays strictly increasing, and each line
gets a ``node`` field naming the node that scored it. Event ids are renumbered here as a single
machine numbers them (``<run id>-<source>-<label>-<n>``), so that a source moved to another node
never repeats an id. The driver remembers every open event, so that it can end those of a node
that is lost (``stream_lost``) or that never answered the stop (``shutdown``).

Event media (clips and snapshots) are made on the node that holds the camera's connection, in
``media.dir`` on that node's filesystem, and named with the node's own event id (the node names
its files before the driver has numbered the event). Their lines come here like the others: the
driver writes them with its own id for the event, so that a media line and its event's lines
carry one id, and leaves ``path`` (and an ``end`` line's ``snapshot``) as the node gave it: the
file's real name. It remembers the ids of the last ``MAX_ENDED_IDS`` ended events for their
media, which come after the ``end`` (a clip is finished ``post_capture_s`` later).

Locking: ``_lock`` protects the log, the open events, the statuses and the counters; under it
only the log is written and the outputs' non-blocking ``offer_*`` called.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from streamdet.distributed.records import EventRecord, MediaRecord, Record, StatusRecord
from streamdet.events import EndReason, EventChange
from streamdet.redaction import redact_text
from streamdet.router import CLOSE_TIMEOUT_S
from streamdet.sinks.base import (
    EventMessage,
    MediaMessage,
    RunStats,
    Sink,
    SinkWorker,
    StatusMessage,
)
from streamdet.sinks.jsonl import EventLog

log = logging.getLogger(__name__)

# Ended events whose ids the driver keeps for their media lines. A clip comes within
# post_capture_s plus its grace of the end; thousands of events end in that time only on a
# cluster far beyond one log's rate.
MAX_ENDED_IDS = 4096


@dataclasses.dataclass
class _Open:
    node: str
    change: EventChange  # its latest line, with the driver's id


class ClusterLog:
    """Writes every node's lines to one log and hands them to the outputs.

    Args:
        run_id: the run's id (event ids start with it).
        event_log: the JSONL log, or None for none. Closed by :meth:`close`.
        sinks: the other outputs (MQTT, webhooks, web).
    """

    def __init__(self, run_id: str, event_log: EventLog | None, sinks: Sequence[Sink] = ()):
        self.run_id = run_id
        self.event_log = event_log
        self.workers = [SinkWorker(s) for s in sinks]
        self._lock = threading.Lock()  # protects everything below
        self._open: dict[str, _Open] = {}  # by the node's event id (unique: it has a uuid)
        self._ended: OrderedDict[str, str] = OrderedDict()  # node's id -> driver's, newest last
        self._status: dict[str, str] = {}
        self._count = 0
        self.events_opened = 0
        self.event_counts: dict[str, int] = {}
        self.media_counts: dict[str, int] = {}  # media lines written, by type (clip, snapshot)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    # -- from the nodes ----------------------------------------------------------------------

    def deliver(self, node: str, records: Iterable[Record]) -> None:
        """A node's records, in the order its trackers made them."""
        with self._lock:
            for record in records:
                if isinstance(record, EventRecord):
                    self._event(node, record.change, record.latency_ms, record.extra)
                elif isinstance(record, MediaRecord):
                    self._media(node, record.fields)
                else:
                    self._status_line(node, record)

    def lose(self, node: str, sources: Iterable[str], why: str) -> None:
        """``node`` is gone (or its engine): its sources go offline and their open events end
        ``stream_lost``, as a camera lost on a single machine."""
        now, lost = time.time(), sorted(set(sources))
        with self._lock:
            self._end_open(lambda opened: opened.change.source in lost, "stream_lost")
            for source in lost:
                self._status_line(node, StatusRecord(source, "offline", why, now))

    def close(self, reason: EndReason = "shutdown") -> None:
        """End every event still open (a node that never answered the stop) with ``reason``,
        close the log, then let each output finish."""
        try:
            with self._lock:
                self._end_open(lambda _: True, reason)
            if self.event_log is not None:
                self.event_log.close()
        finally:
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            for w in self.workers:
                if not w.close(max(0.0, deadline - time.monotonic())):
                    log.warning("output %s did not finish in time", w.sink.name)

    def publish_stats(self, stats: RunStats) -> None:
        for w in self.workers:
            w.offer_stats(stats)

    # -- what the run reports ----------------------------------------------------------------

    def status(self, source: str) -> str:
        with self._lock:
            return self._status.get(source, "never online")

    def open_sources(self) -> set[str]:
        """The sources with an event open, as the lines delivered so far tell."""
        with self._lock:
            return {opened.change.source for opened in self._open.values()}

    def open_events(self) -> int:
        with self._lock:
            return len(self._open)

    @property
    def lines_written(self) -> int:
        return self.event_log.lines_written if self.event_log is not None else 0

    # -- internals (under _lock) -------------------------------------------------------------

    def driver_id(self, remote: str) -> str | None:
        """The driver's id of the event a node calls ``remote`` (open, or among the last
        ``MAX_ENDED_IDS`` ended); None when unknown."""
        with self._lock:
            return self._driver_id(remote)

    def _driver_id(self, remote: str) -> str | None:
        opened = self._open.get(remote)
        return opened.change.id if opened is not None else self._ended.get(remote)

    def _event(
        self,
        node: str,
        change: EventChange,
        latency_ms: float | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        remote = change.id
        if change.type == "new":
            self._count += 1
            local = f"{self.run_id}-{change.source}-{change.label}-{self._count}"
            self.events_opened += 1
            self.event_counts[change.label] = self.event_counts.get(change.label, 0) + 1
        elif remote in self._open:
            local = self._open[remote].change.id
        else:  # the driver ended it already (its node was taken for lost): no line after end
            return
        change = dataclasses.replace(change, id=local)
        if change.type == "end":
            del self._open[remote]
            self._remember_ended(remote, local)
        else:
            self._open[remote] = _Open(node, change)
        self._write(node, change, latency_ms, extra)

    def _remember_ended(self, remote: str, local: str) -> None:
        self._ended[remote] = local
        while len(self._ended) > MAX_ENDED_IDS:
            self._ended.popitem(last=False)

    def _media(self, node: str, fields: Mapping[str, Any]) -> None:
        """A node's clip or snapshot line: written with the driver's id for its event."""
        remote = str(fields.get("id"))
        local = self._driver_id(remote)
        if local is None:  # its event's lines never came (or long ago): keep the line as it is
            log.warning("%s of an unknown event %s from %s", fields.get("type"), remote, node)
            local = remote
        kind = str(fields.get("type"))
        self.media_counts[kind] = self.media_counts.get(kind, 0) + 1
        line: Mapping[str, Any] = {**fields, "id": local, "node": node}
        if self.event_log is not None:
            line = self.event_log.write_media(dict(line))
        msg = MediaMessage(line)
        for w in self.workers:
            w.offer_media(msg)

    def _end_open(self, which: Callable[[_Open], bool], reason: EndReason) -> None:
        for remote, opened in list(self._open.items()):
            if which(opened):
                del self._open[remote]
                self._remember_ended(remote, opened.change.id)
                end = dataclasses.replace(opened.change, type="end", end_reason=reason)
                self._write(opened.node, end, None)

    def _write(
        self,
        node: str,
        change: EventChange,
        latency_ms: float | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        line = None
        if self.event_log is not None:  # written (and fsynced) before any output sees it
            line = self.event_log.write_event(change, latency_ms=latency_ms, extra=extra, node=node)
        msg = EventMessage(change, line, latency_ms)
        for w in self.workers:
            w.offer_event(msg)
        if change.type in ("new", "end"):
            log.info("%s %s %s on %s", change.type, change.source, change.label, node)

    def _status_line(self, node: str, record: StatusRecord) -> None:
        reason = redact_text(record.reason)
        self._status[record.source] = record.status
        if self.event_log is not None:
            self.event_log.write_status(
                record.source, record.status, reason, record.wall_time, node=node
            )
        msg = StatusMessage(record.source, record.status, reason, record.wall_time)
        for w in self.workers:
            w.offer_status(msg)
            if record.status == "offline" and record.reason == "ended":
                w.offer_source_ended(record.source)
