"""What a node's engine sends the driver, and the stand-in event log that collects it.

A node's pipeline writes its event, status and media lines to an :class:`Outbox` instead of a
file; the driver drains it (:meth:`Outbox.drain`) and writes the lines to the one log. Records
are small frozen dataclasses: an event change with its latency and the fields the node's outputs
add to its line (an ``end`` line's ``snapshot``), a status line, or a media line (a clip or
snapshot the node made: the media files stay on the node, only their lines travel).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamdet.events import EventChange
from streamdet.sinks.base import SourceHealth, SourceStats


@dataclass(frozen=True)
class EventRecord:
    """An event line as the node's tracker made it (its id is the node's own).

    ``extra``: what the node's outputs add to the line (the media output: the snapshot's path
    on ``end``, a file on the node named with the node's event id).
    """

    change: EventChange
    latency_ms: float | None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatusRecord:
    """A status line: ``online`` or ``offline`` (``reason`` ``ended``: a file read to its end)."""

    source: str
    status: str
    reason: str
    wall_time: float


@dataclass(frozen=True)
class MediaRecord:
    """A clip or snapshot line as the node's media output made it: ``type`` (``clip`` or
    ``snapshot``), ``id`` (the node's event id), ``source``, ``path`` (on the node) and what
    the media says of itself."""

    fields: Mapping[str, Any]


Record = EventRecord | StatusRecord | MediaRecord


@dataclass(frozen=True)
class EngineReport:
    """An engine's answer to a poll.

    Attributes:
        incarnation: changes when the engine actor is a new one (a restart starts empty).
        sources: the sources it runs now.
        records: lines since the previous poll, in the order its trackers made them.
        stats: each of its sources' figures.
        windows: windows scored since it started.
        errors: why a source group stopped on its own (a source that failed), redacted.
        health: each of its running sources' health (newest frame, capture thread alive), for
            the driver's ``/readyz``.
        inference_alive: the inference of every pipeline still running is alive.
        pipelines_alive: its pipelines still running. One whose sources all ended runs on
            until its outputs are done (a file's last clip is cut after its end): the driver
            waits for it before it stops the run.
    """

    incarnation: str
    sources: tuple[str, ...]
    records: tuple[Record, ...] = ()
    stats: dict[str, SourceStats] = field(default_factory=dict)
    windows: int = 0
    errors: tuple[str, ...] = ()
    health: dict[str, SourceHealth] = field(default_factory=dict)
    inference_alive: bool = True
    pipelines_alive: int = 0


class Outbox:
    """Takes the event log's writes on a node and keeps them for the driver.

    Duck-types what :class:`~streamdet.router.EventRouter` calls on an
    :class:`~streamdet.sinks.jsonl.EventLog`. Unbounded on purpose: a line is never dropped,
    and the driver drains it several times a second (events are rare beside windows). The
    driver's poll waits on it (:meth:`wait`), so a line leaves the node as soon as it is made.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()  # protects _records and lines_written
        self._records: list[Record] = []
        self.lines_written = 0

    def write_event(
        self,
        change: EventChange,
        *,
        latency_ms: float | None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        # ``extra`` comes from the node's outputs' event_line_fields (the media output's)
        self._put(EventRecord(change, latency_ms, dict(extra or {})))
        return {}  # the line is the driver's to write

    def write_status(
        self, source: str, status: str, reason: str, wall_time: float
    ) -> dict[str, Any]:
        self._put(StatusRecord(source, status, reason, wall_time))
        return {}

    def write_media(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A clip or snapshot the node's media output finished (from that output's thread)."""
        self._put(MediaRecord(dict(fields)))
        return dict(fields)

    def close(self) -> None:
        """Nothing to close: several pipelines of one engine share the outbox."""

    def _put(self, record: Record) -> None:
        with self._cond:
            self._records.append(record)
            self.lines_written += 1
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a record to drain; True when there is one."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._records), timeout)

    def drain(self) -> tuple[Record, ...]:
        """Every record since the previous drain, oldest first."""
        with self._cond:
            records, self._records = tuple(self._records), []
        return records
