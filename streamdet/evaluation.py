"""Event-level evaluation: match detected events to ground truth by temporal IoU.

A detection matches a true event with the same label when their temporal IoU is at least
``iou`` (0.3 by default). Matching is one-to-one, greedy by IoU (highest first). From the matches:
precision, recall, F1 and the onset delay (detection start minus true start) at p50 and p90.

Intervals are compared in frame numbers when both sides have them, otherwise in seconds.
Frame intervals are inclusive (``start_frame..end_frame``), seconds are ``[start, end)``.

Inputs:

- The event log (JSONL) written by ``streamdet run``, its rotated files (``events.jsonl.5`` ...
  ``.1``) first, read by :func:`streamdet.sinks.jsonl.scan_lines`: lines it did not write are
  skipped with a warning. A line with ``"type": "end"`` closes an event and carries ``id``,
  ``source``, ``label``, ``start_frame``, ``end_frame``, ``start_time``, ``end_time`` (ISO-8601
  UTC such as ``2026-11-26T13:40:00.123Z``, or seconds). A ``"type": "new"`` line whose event
  never ends counts as an event up to the last frame (and time) seen in the log. Runs append to
  one log: only the lines of one run count (``run_id``; by default the latest). ISO times are
  turned into seconds from the truth's ``start_utc``.
- Ground truth JSON, as written by :func:`streamdet.data.synthetic.make_stream`::

    {"format": "streamdet-truth/1", "fps": 10.0, "frame_count": 900,
     "events": [{"label": "enter", "start_frame": 31, "end_frame": 42,
                 "start_time": 3.1, "end_time": 4.3}, ...]}

  ``start_frame``/``end_frame`` are inclusive; times are seconds from the first frame
  (``end_time = (end_frame + 1) / fps``). Events with only times, or a bare list of events, work too.

Example:
    >>> truth = [Interval("fall", 10, 19)]
    >>> found = [Interval("fall", 14, 25), Interval("run", 40, 50)]
    >>> m = event_metrics(found, truth)
    >>> (m.tp, m.fp, m.fn, round(m.f1, 3))
    (1, 1, 0, 0.667)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from streamdet.errors import ConfigError
from streamdet.report import percentile
from streamdet.sinks.jsonl import LogLine, line_problem, open_regular, rotated_paths, scan_lines

log = logging.getLogger(__name__)

DEFAULT_IOU = 0.3


@dataclass(frozen=True)
class Interval:
    """An event on a time line: inclusive frames, or seconds when ``unit == 's'``."""

    label: str
    start: float
    end: float
    unit: str = "frame"  # "frame" (inclusive ends) or "s" (half-open)
    id: str | None = None

    def bounds(self) -> tuple[float, float]:
        """Half-open [start, stop)."""
        return (self.start, self.end + 1) if self.unit == "frame" else (self.start, self.end)


def temporal_iou(a: Interval, b: Interval) -> float:
    """Intersection over union of two intervals in the same unit."""
    if a.unit != b.unit:
        raise ValueError(f"intervals must share a unit, but got {a.unit!r} and {b.unit!r}")
    a0, a1 = a.bounds()
    b0, b1 = b.bounds()
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = max(a1, b1) - min(a0, b0)
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Match:
    detection: int
    truth: int
    iou: float


def match_events(
    detections: Sequence[Interval], truth: Sequence[Interval], iou: float = DEFAULT_IOU
) -> list[Match]:
    """One-to-one matches of same-label pairs with IoU >= ``iou``, highest IoU first."""
    candidates = []
    for i, d in enumerate(detections):
        for j, t in enumerate(truth):
            if d.label == t.label:
                v = temporal_iou(d, t)
                if v >= iou:
                    candidates.append((v, i, j))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_d: set[int] = set()
    used_t: set[int] = set()
    matches = []
    for v, i, j in candidates:
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            matches.append(Match(i, j, v))
    return sorted(matches, key=lambda m: m.truth)


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


@dataclass
class EventMetrics:
    """Event-level detection quality. Delays are in seconds when a frame rate was known."""

    tp: int
    fp: int
    fn: int
    onset_delays: list[float] = field(default_factory=list)
    delay_unit: str = "s"
    per_label: dict[str, dict[str, float]] = field(default_factory=dict)
    iou: float = DEFAULT_IOU

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        # No events anywhere is a perfect score; otherwise 2PR/(P+R) == 2TP/(2TP+FP+FN).
        if self.tp + self.fp + self.fn == 0:
            return 1.0
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)

    @property
    def delay_p50(self) -> float:
        return percentile(self.onset_delays, 50)

    @property
    def delay_p90(self) -> float:
        return percentile(self.onset_delays, 90)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if isinstance(v, float) and math.isnan(v) else v

        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "iou": self.iou,
            "precision": clean(self.precision),
            "recall": clean(self.recall),
            "f1": clean(self.f1),
            "onset_delay_p50": clean(self.delay_p50),
            "onset_delay_p90": clean(self.delay_p90),
            "delay_unit": self.delay_unit,
            "per_label": {
                k: {kk: clean(vv) for kk, vv in v.items()} for k, v in self.per_label.items()
            },
        }

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        u = self.delay_unit
        return (
            f"events: truth {self.tp + self.fn}, detected {self.tp + self.fp}, matched {self.tp} (IoU >= {self.iou:g})  "
            f"precision {self.precision:.3f} recall {self.recall:.3f} F1 {self.f1:.3f}  "
            f"onset delay p50 {self.delay_p50:.2f} {u} p90 {self.delay_p90:.2f} {u}"
        )


def event_metrics(
    detections: Sequence[Interval],
    truth: Sequence[Interval],
    *,
    iou: float = DEFAULT_IOU,
    fps: float | None = None,
) -> EventMetrics:
    """Precision, recall, F1 and onset delays of ``detections`` against ``truth``.

    Args:
        detections, truth: intervals in one unit (frames or seconds).
        iou: temporal IoU a match needs.
        fps: frame rate, to report frame-based onset delays in seconds.
    """
    units = {i.unit for i in (*detections, *truth)}
    if len(units) > 1:
        raise ValueError(f"detections and truth must share a unit, but got {sorted(units)}")
    matches = match_events(detections, truth, iou)
    unit = units.pop() if units else "frame"
    scale = 1.0
    delay_unit = "s"
    if unit == "frame":
        if fps:
            scale = 1.0 / fps
        else:
            delay_unit = "frames"
    delays = [(detections[m.detection].start - truth[m.truth].start) * scale for m in matches]
    per_label: dict[str, dict[str, float]] = {}
    for label in sorted({i.label for i in (*detections, *truth)}):
        tp = sum(1 for m in matches if truth[m.truth].label == label)
        n_det = sum(1 for d in detections if d.label == label)
        n_true = sum(1 for t in truth if t.label == label)
        fp, fn = n_det - tp, n_true - tp
        per_label[label] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
        }
    return EventMetrics(
        len(matches),
        len(detections) - len(matches),
        len(truth) - len(matches),
        delays,
        delay_unit,
        per_label,
        iou,
    )


# --------------------------------------------------------------------------------------------
# Files


def parse_time(value: Any) -> float | datetime | None:
    """Seconds (a number) or an aware UTC datetime (an ISO-8601 string), or None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"time must be a number or an ISO-8601 string, but got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"time must be finite, but got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)  # ValueError: "Invalid isoformat string: ..."
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    raise ValueError(f"time must be a number or an ISO-8601 string, but got {value!r}")


def _read_bytes(path: Path, what: str) -> bytes:
    """The bytes of a regular file. ConfigError when it is missing or unreadable, StreamdetError
    when it is not a regular file (a FIFO is refused, never waited on)."""
    try:
        fd = open_regular(path, os.O_RDONLY, what)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    with open(fd, "rb") as f:
        return f.read()


def _not_utf8(where: str, exc: UnicodeDecodeError, what: str) -> ConfigError:
    return ConfigError(
        f"{where}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
        f"{exc.start}): not {what}"
    )


def _frame(rec: dict[str, Any], key: str, where: str) -> int | None:
    """``rec[key]`` as a frame number (an integer), or None when absent; ConfigError otherwise."""
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer frame number, but got {value!r}")
    return value


def _time(rec: dict[str, Any], key: str, where: str) -> float | datetime | None:
    """``rec[key]`` as seconds or an aware datetime, or None when absent; ConfigError otherwise."""
    try:
        return parse_time(rec.get(key))
    except ValueError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from exc


@dataclass
class _LogEvent:
    label: str
    id: str | None
    start_frame: int | None = None
    end_frame: int | None = None
    start_time: float | datetime | None = None
    end_time: float | datetime | None = None


@dataclass
class LoggedEvents:
    """The events of one run read from an event log, and the last frame and time it saw."""

    events: list[_LogEvent]
    last_frame: int | None
    last_time: float | datetime | None


def _log_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """("file:line", line) of every line the log wrote, its rotated files first.

    Raises:
        ConfigError: no file of the log exists or one cannot be read, or not one of its lines
            is the log's own (a file given as the log by mistake).
        StreamdetError: one of its files is not a regular file.
    """
    if not any(p.exists() for p in rotated_paths(path)):
        raise ConfigError(f"{path}: the event log not found")
    records: list[tuple[str, dict[str, Any]]] = []
    foreign: list[LogLine] = []
    try:
        for line in scan_lines(path):
            if line.obj is None:
                foreign.append(line)
            else:
                records.append((f"{line.file}:{line.number}", line.obj))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the event log ({exc.strerror or exc})") from exc
    if foreign and not records:
        first = foreign[0]
        raise ConfigError(
            f"{first.file}:{first.number}: {line_problem(first.raw)}: not an event "
            "log written by 'streamdet run'"
        )
    if foreign:
        log.warning(
            "%s: %d line(s) not written by streamdet skipped (first at %s:%d: %s)",
            path,
            len(foreign),
            foreign[0].file,
            foreign[0].number,
            line_problem(foreign[0].raw),
        )
    return records


def _later(t: float | datetime, than: float | datetime | None) -> bool:
    """Whether ``t`` is after ``than`` (None: nothing yet); seconds and datetimes never compare."""
    if than is None:
        return True
    if isinstance(t, datetime) and isinstance(than, datetime):
        return t > than
    if isinstance(t, float) and isinstance(than, float):
        return t > than
    return False


def read_event_log(
    path: str | os.PathLike[str], *, source: str | None = None, run_id: str | None = None
) -> LoggedEvents:
    """Read the events of a ``streamdet run`` JSONL log and of its rotated files.

    Args:
        path: the log. Runs append to it, so lines carry a ``run_id``.
        source: only events of this source.
        run_id: only lines of this run; ``None`` takes the run of the last line that has one
            (the latest run), or every line when no line has a ``run_id``.

    Raises:
        ConfigError: missing log, a file no line of which the log wrote (lines it did not write
            among its own are skipped), a field of the wrong type, or a ``run_id`` that no line
            has.
        StreamdetError: a path that is not a regular file (a FIFO, a device, a folder).
    """
    path = Path(path)
    records = _log_records(path)
    runs = list(dict.fromkeys(str(r["run_id"]) for _, r in records if r.get("run_id") is not None))
    if run_id is None:
        run_id = runs[-1] if runs else None
    elif run_id not in runs:
        raise ConfigError(
            f"{path}: no run {run_id!r} in this log (its runs, oldest first: "
            f"{', '.join(runs) or 'none'})"
        )
    open_events: dict[str, _LogEvent] = {}
    closed: list[_LogEvent] = []
    last_frame: int | None = None
    last_time: float | datetime | None = None
    for where, rec in records:
        if run_id is not None and rec.get("run_id") not in (None, run_id):
            continue
        if source is not None and rec.get("source") not in (None, source):
            continue
        for key in ("frame", "start_frame", "end_frame", "last_frame"):
            v = rec.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                last_frame = v if last_frame is None else max(last_frame, v)
        for key in ("time", "start_time", "end_time"):
            try:
                t = parse_time(rec.get(key))
            except ValueError:
                t = None
            if t is not None and _later(t, last_time):
                last_time = t
        kind = rec.get("type")
        if kind not in ("new", "end") or "label" not in rec:
            continue
        key = f"{rec.get('source')}|{rec.get('id')}"
        ev = open_events.get(key) or _LogEvent(
            str(rec["label"]), None if rec.get("id") is None else str(rec.get("id"))
        )
        if rec.get("start_frame") is not None:
            ev.start_frame = _frame(rec, "start_frame", where)
        if rec.get("start_time") is not None:
            ev.start_time = _time(rec, "start_time", where)
        if kind == "new":
            open_events[key] = ev
        else:
            ev.end_frame = _frame(rec, "end_frame", where)
            ev.end_time = _time(rec, "end_time", where)
            open_events.pop(key, None)
            closed.append(ev)
    for ev in open_events.values():  # never ended: up to the last frame/time seen
        ev.end_frame = last_frame
        ev.end_time = last_time
        closed.append(ev)
    return LoggedEvents(closed, last_frame, last_time)


@dataclass
class Truth:
    events: list[dict[str, Any]]
    fps: float | None
    start_utc: datetime | None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_truth_event(ev: Any, where: str) -> None:
    """ConfigError unless ``ev`` is a truth event: a string label, numeric frames and/or times."""
    if not isinstance(ev, dict) or "label" not in ev:
        raise ConfigError(f"{where} has no label")
    if not isinstance(ev["label"], str):
        raise ConfigError(f"{where}.label must be a string, but got {ev['label']!r}")
    for key in ("start_frame", "end_frame", "start_time", "end_time"):
        if key in ev and not _is_number(ev[key]):
            raise ConfigError(f"{where}.{key} must be a number, but got {ev[key]!r}")
    has_frames = "start_frame" in ev and "end_frame" in ev
    has_times = "start_time" in ev and "end_time" in ev
    if not (has_frames or has_times):
        raise ConfigError(f"{where} needs start_frame/end_frame or start_time/end_time")


def read_truth(path: str | os.PathLike[str]) -> Truth:
    """Read a truth JSON (``streamdet-truth/1``, ``{"events": [...]}`` or a bare list).

    Raises:
        ConfigError: missing, not UTF-8 JSON, or a field of the wrong type.
        StreamdetError: a path that is not a regular file (a FIFO, a device, a folder).
    """
    path = Path(path)
    data = _read_bytes(path, "the truth file")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _not_utf8(str(path), exc, "a truth JSON") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc.msg})") from exc
    except RecursionError:
        raise ConfigError(f"{path}: not a truth JSON (nested too deeply)") from None
    if isinstance(doc, list):
        doc = {"events": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise ConfigError(f"{path}: expected a JSON object with an 'events' list")
    for i, ev in enumerate(doc["events"]):
        _check_truth_event(ev, f"{path}: events[{i}]")
    fps = doc.get("fps")
    if fps is not None and not (_is_number(fps) and fps > 0):
        raise ConfigError(f"{path}: fps must be a number > 0, but got {fps!r}")
    start_utc = doc.get("start_utc")
    if start_utc is not None and not isinstance(start_utc, str):
        raise ConfigError(
            f"{path}: start_utc must be an ISO-8601 time string, but got {start_utc!r}"
        )
    start = _time(doc, "start_utc", str(path)) if start_utc else None
    return Truth(
        doc["events"], float(fps) if fps else None, start if isinstance(start, datetime) else None
    )


def _seconds(t: float | datetime | None, origin: datetime | None, what: str) -> float:
    if t is None:
        raise ConfigError(f"{what}: no time")
    if isinstance(t, datetime):
        if origin is None:
            raise ConfigError(f"{what}: ISO times need the stream start: 'start_utc' in the truth")
        return (t - origin).total_seconds()
    return float(t)


def to_intervals(
    logged: LoggedEvents, truth: Truth
) -> tuple[list[Interval], list[Interval], float | None]:
    """Detections and truth as intervals in a shared unit: frames when both have them, else seconds."""
    frames_ok = all(
        e.start_frame is not None and e.end_frame is not None for e in logged.events
    ) and all("start_frame" in t and "end_frame" in t for t in truth.events)
    if frames_ok:
        dets = [
            Interval(e.label, float(e.start_frame), float(e.end_frame), "frame", e.id)
            for e in logged.events
            if e.start_frame is not None and e.end_frame is not None  # all of them: frames_ok
        ]
        trues = [
            Interval(str(t["label"]), float(t["start_frame"]), float(t["end_frame"]), "frame")
            for t in truth.events
        ]
        return dets, trues, truth.fps
    origin = truth.start_utc
    dets = []
    for e in logged.events:
        if e.start_time is not None:
            s, t_end = (
                _seconds(e.start_time, origin, "event log"),
                _seconds(e.end_time, origin, "event log"),
            )
        elif e.start_frame is not None and e.end_frame is not None and truth.fps:
            s, t_end = e.start_frame / truth.fps, (e.end_frame + 1) / truth.fps
        else:
            raise ConfigError("event log: an event has neither times nor frames")
        dets.append(Interval(e.label, s, t_end, "s", e.id))
    trues = []
    for t in truth.events:
        if "start_time" in t and "end_time" in t:
            s, t_end = float(t["start_time"]), float(t["end_time"])
        elif truth.fps:
            s, t_end = t["start_frame"] / truth.fps, (t["end_frame"] + 1) / truth.fps
        else:
            raise ConfigError("truth: frames without fps cannot be compared with times")
        trues.append(Interval(str(t["label"]), s, t_end, "s"))
    return dets, trues, None


def evaluate_files(
    events: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    iou: float = DEFAULT_IOU,
    source: str | None = None,
    run_id: str | None = None,
    ignore_labels: Iterable[str] = ("none",),
) -> EventMetrics:
    """Event metrics of a JSONL event log (its latest run unless ``run_id`` is given) against a
    truth JSON; ``none`` events on either side are ignored."""
    logged = read_event_log(events, source=source, run_id=run_id)
    t = read_truth(truth)
    ignore = set(ignore_labels)
    logged.events = [e for e in logged.events if e.label not in ignore]
    t.events = [e for e in t.events if e["label"] not in ignore]
    dets, trues, fps = to_intervals(logged, t)
    return event_metrics(dets, trues, iou=iou, fps=fps)


def evaluate_event_log(
    events: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    run_id: str | None = None,
    iou: float = DEFAULT_IOU,
) -> EventMetrics:
    """The events of run ``run_id`` in a log against a truth file; ``str()`` of the result is its
    one-line summary (with ``F1 <value>``). Used by ``streamdet run`` for its summary."""
    return evaluate_files(events, truth, iou=iou, run_id=run_id)
