"""The events the page and ``/api/events`` show: a bounded store of the run's recent events with
their snapshots and clips, and the checked filters of a query.

:class:`EventStore` is fed by the web output's thread (event lines and media lines) and read by
request threads; one lock protects it. It holds the newest :data:`MAX_EVENTS` events of this
run (the JSONL log is the record; this is a view). Every change bumps a revision, so a live
viewer asks only for what changed since it last looked.

Example:
    >>> q = parse_event_query({"label": ["walk"], "min_score": ["0.5"], "limit": ["10"]})
    >>> (q.label, q.min_score, q.limit)
    ('walk', 0.5, 10)
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from streamdet.events import EventChange
from streamdet.sinks.jsonl import iso_utc

MAX_EVENTS = 2000  # events kept in memory (a few hundred bytes each)
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Event ids are f"{run_id}-{source}-{label}-{n}"; anything else in a URL is not an event of ours.
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")
_QUERY_KEYS = {"source", "label", "after", "before", "in_progress", "min_score", "limit"}
# A clip is written after its event ends (post_capture_s later, plus muxing): until this much
# later than that, an event without a clip line is answered 202 (still being recorded).
CLIP_GRACE_S = 30.0


class QueryError(ValueError):
    """A query parameter that cannot be used; the message is the 400 answer."""


class ClipState(Enum):
    """What ``/api/events/{id}/clip.mp4`` answers."""

    READY = "ready"  # 200 with the file
    RECORDING = "recording"  # 202: the event is open, or ended so recently its clip is pending
    NONE = "none"  # 404: clips are off, or the clip never came


@dataclass(frozen=True)
class EventRecord:
    """One event as the store keeps it (its latest line, plus its media)."""

    id: str
    source: str
    label: str
    score: float
    peak_score: float
    start_time: float  # UTC epoch s
    end_time: float
    start_frame: int
    end_frame: int
    latency_ms: float | None
    in_progress: bool
    end_reason: str | None
    ended_at: float | None = None  # wall-clock time the end line came
    snapshot: str | None = None  # file path, as the media line gave it
    clip: str | None = None
    rev: int = 0

    def to_json(self, clip_state: ClipState) -> dict[str, Any]:
        """The event as ``/api/events`` returns it (URLs of its media, relative to the root)."""
        base = f"/api/events/{self.id}"
        return {
            "id": self.id,
            "source": self.source,
            "label": self.label,
            "score": round(self.score, 4),
            "peak_score": round(self.peak_score, 4),
            "start_time": iso_utc(self.start_time),
            "end_time": iso_utc(self.end_time),
            "start_frame": self.start_frame,
            "end_frame": self.end_frame,
            "in_progress": self.in_progress,
            "end_reason": self.end_reason,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
            "snapshot_url": f"{base}/snapshot.jpg" if self.snapshot else None,
            "clip_url": f"{base}/clip.mp4" if clip_state is not ClipState.NONE else None,
            "clip": clip_state.value,
        }


@dataclass(frozen=True)
class EventQuery:
    """The filters of ``/api/events`` (None: not filtered)."""

    source: str | None = None
    label: str | None = None
    after: float | None = None  # start_time >= after (UTC epoch s)
    before: float | None = None  # start_time < before
    in_progress: bool | None = None
    min_score: float | None = None  # peak_score >= min_score
    limit: int = DEFAULT_LIMIT

    def matches(self, e: EventRecord) -> bool:
        return (
            (self.source is None or e.source == self.source)
            and (self.label is None or e.label == self.label)
            and (self.after is None or e.start_time >= self.after)
            and (self.before is None or e.start_time < self.before)
            and (self.in_progress is None or e.in_progress == self.in_progress)
            and (self.min_score is None or e.peak_score >= self.min_score)
        )


def valid_id(text: str) -> bool:
    """``text`` may be an event id (letters, digits, ``_ . -``): never a path."""
    return bool(_ID.match(text)) and text not in (".", "..")


def parse_time(name: str, text: str) -> float:
    """UTC epoch seconds from ``1767000000.5`` or ISO 8601 (``2026-11-26T13:40:00Z``; no zone:
    UTC)."""
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise QueryError(
                f"{name} must be epoch seconds or an ISO 8601 time, but got {text[:64]!r}"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.timezone.utc)
        return parsed.timestamp()
    if not math.isfinite(value):
        raise QueryError(f"{name} must be a finite number, but got {text[:64]!r}")
    return value


def _one(params: Mapping[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise QueryError(f"{key} given {len(values)} times; give it once")
    return values[0]


def _bool(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise QueryError(f"{name} must be true or false, but got {text[:64]!r}")


def _number(name: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise QueryError(f"{name} must be a number, but got {text[:64]!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise QueryError(f"{name} must be between {low:g} and {high:g}, but got {text[:64]!r}")
    return value


def parse_event_query(params: Mapping[str, list[str]]) -> EventQuery:
    """The filters of a ``/api/events`` query string (``urllib.parse.parse_qs`` output; a
    ``token`` parameter is the server's, not a filter).

    Raises:
        QueryError: an unknown parameter, or a value that does not parse.
    """
    unknown = sorted(k for k in params if k not in _QUERY_KEYS and k != "token")
    if unknown:
        raise QueryError(
            f"unknown parameter(s) {', '.join(u[:32] for u in unknown[:5])}; "
            f"expected {', '.join(sorted(_QUERY_KEYS))}"
        )
    after, before = _one(params, "after"), _one(params, "before")
    in_progress, min_score = _one(params, "in_progress"), _one(params, "min_score")
    limit = _one(params, "limit")
    if limit is not None and not limit.isdigit():
        raise QueryError(f"limit must be a whole number, but got {limit[:64]!r}")
    return EventQuery(
        source=_one(params, "source"),
        label=_one(params, "label"),
        after=None if after is None else parse_time("after", after),
        before=None if before is None else parse_time("before", before),
        in_progress=None if in_progress is None else _bool("in_progress", in_progress),
        min_score=None if min_score is None else _number("min_score", min_score, 0.0, 1.0),
        limit=DEFAULT_LIMIT if limit is None else int(_number("limit", limit, 1, MAX_LIMIT)),
    )


def _media_path(value: Any) -> str | None:
    """The file of a media field: a path, or a mapping with a ``path``."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and isinstance(value.get("path"), str):
        return str(value["path"])
    return None


class EventStore:
    """The newest events of the run, with their snapshots and clips.

    Args:
        max_events: events kept; the oldest is forgotten first.
        clips: whether event clips are being recorded (else a clip is never awaited).
        clip_wait_s: after an event's end, how long a missing clip still counts as being
            recorded (``post_capture_s`` plus :data:`CLIP_GRACE_S`).
    """

    def __init__(
        self, *, max_events: int = MAX_EVENTS, clips: bool = False, clip_wait_s: float = 0.0
    ) -> None:
        self.max_events = max_events
        self.clips = clips
        self.clip_wait_s = clip_wait_s
        self._lock = threading.Lock()  # protects the two fields below
        self._events: OrderedDict[str, EventRecord] = OrderedDict()  # by first line's order
        self._rev = 0

    # -- fed by the web output's thread --------------------------------------------------------

    def apply(self, change: EventChange, latency_ms: float | None, now: float) -> None:
        """A ``new``/``update``/``end`` line of an event (``now``: wall-clock time)."""
        with self._lock:
            self._rev += 1
            old = self._events.get(change.id)
            ended = change.type == "end"
            record = EventRecord(
                id=change.id,
                source=change.source,
                label=change.label,
                score=float(change.score),
                peak_score=float(change.peak_score),
                start_time=change.start_time,
                end_time=change.end_time,
                start_frame=change.start_frame,
                end_frame=change.end_frame,
                latency_ms=latency_ms if old is None else old.latency_ms,
                in_progress=not ended,
                end_reason=change.end_reason,
                ended_at=now if ended else None,
                snapshot=old.snapshot if old else None,
                clip=old.clip if old else None,
                rev=self._rev,
            )
            self._events[change.id] = record
            while len(self._events) > self.max_events:
                self._events.popitem(last=False)

    def add_media(self, line: Mapping[str, Any]) -> bool:
        """A media line (``type`` ``clip`` or ``snapshot``, ``id``, ``path``), or an event line
        carrying ``snapshot``/``clip``; False when its event is not (or no longer) here."""
        event_id = line.get("id")
        kind = line.get("type")
        if not isinstance(event_id, str):
            return False
        if kind in ("clip", "snapshot"):
            snapshot = _media_path(line.get("path")) if kind == "snapshot" else None
            clip = _media_path(line.get("path")) if kind == "clip" else None
        else:  # an event line that names its media
            snapshot, clip = _media_path(line.get("snapshot")), _media_path(line.get("clip"))
        with self._lock:
            record = self._events.get(event_id)
            if record is None or not (snapshot or clip):
                return False
            self._rev += 1
            self._events[event_id] = replace(
                record,
                rev=self._rev,
                snapshot=snapshot or record.snapshot,
                clip=clip or record.clip,
            )
            return True

    # -- read by request threads ----------------------------------------------------------------

    @property
    def rev(self) -> int:
        with self._lock:
            return self._rev

    def get(self, event_id: str) -> EventRecord | None:
        with self._lock:
            return self._events.get(event_id)

    def query(self, q: EventQuery) -> list[EventRecord]:
        """Matching events, newest start first (ties: the later first seen first)."""
        with self._lock:
            records = list(self._events.values())
        matching = [e for e in reversed(records) if q.matches(e)]
        matching.sort(key=lambda e: e.start_time, reverse=True)  # stable: keeps ties' order
        return matching[: q.limit]

    def changed_since(self, rev: int, limit: int) -> tuple[list[EventRecord], int]:
        """Events changed after revision ``rev`` (the newest ``limit``), and the revision now."""
        with self._lock:
            changed = [e for e in self._events.values() if e.rev > rev]
            now_rev = self._rev
        changed.sort(key=lambda e: e.rev)
        return changed[-limit:], now_rev

    def open_counts(self) -> dict[str, int]:
        """Events in progress, per source."""
        with self._lock:
            counts: dict[str, int] = {}
            for e in self._events.values():
                if e.in_progress:
                    counts[e.source] = counts.get(e.source, 0) + 1
            return counts

    def clip_state(self, record: EventRecord, now: float) -> ClipState:
        """Whether ``record``'s clip is ready, still being recorded, or not coming."""
        if record.clip:
            return ClipState.READY
        if not self.clips:
            return ClipState.NONE
        if record.in_progress:
            return ClipState.RECORDING
        ended = record.ended_at if record.ended_at is not None else now
        return ClipState.RECORDING if now - ended <= self.clip_wait_s else ClipState.NONE

    def to_json(self, record: EventRecord, now: float) -> dict[str, Any]:
        return record.to_json(self.clip_state(record, now))
