"""The JSONL event log: one JSON object per line, written through and crash-safe.

Every line is flushed as it is written; ``new``, ``end`` and ``status`` lines are also fsynced,
so after a power cut or SIGKILL every line but possibly the last parses. On open, a torn last
line is cut off and every event that has a ``new`` but no ``end`` gets an ``end`` with
``end_reason: crash_recovery``. Optional size-based rotation happens on line boundaries. A log
is locked (``flock``) while a run writes it, so a second run cannot take a live run's open
events for a crash's.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: logs are not locked there
    fcntl = None  # type: ignore[assignment]

from streamdet.errors import StreamdetError
from streamdet.events import EventChange
from streamdet.sources import redact_text

log = logging.getLogger(__name__)

SCHEMA = "streamdet.event/1"
_LINE_START = b'{"schema":"streamdet.event/'  # how every line of a log begins
_TAIL_BYTES = 1 << 20  # read from a log's end to find a torn last line
_ROTATED_KEEP = 5


def iso_utc(epoch_s: float) -> str:
    """UTC epoch seconds -> ``2026-11-26T13:40:00.123Z``."""
    t = dt.datetime.fromtimestamp(epoch_s, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def rotated_paths(path: Path) -> list[Path]:
    """Rotated files of ``path``, oldest first, then ``path`` itself."""
    return [path.with_name(f"{path.name}.{i}") for i in range(_ROTATED_KEEP, 0, -1)] + [path]


def read_lines(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Parsed lines of an event log and its rotated files, oldest first; torn lines skipped."""
    for p in rotated_paths(Path(path)):
        if not p.exists():
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    yield obj


class EventLog:
    """Appends event and status lines to a JSONL file.

    Args:
        path: the log file (parent folders are created).
        model: ``{"name": ..., "sha256": ...}`` of the model in use.
        stride: window stride, recorded in each line's ``window``.
        length: window length.
        rotate_bytes: start a new file past this size (None: never).

    Example:
        >>> import tempfile
        >>> with EventLog(tempfile.mktemp(suffix=".jsonl"), {"name": "m", "sha256": "0"}) as log_:
        ...     log_.write_status("cam", "online", "opened", 0.0)["type"]
        'status'
    """

    def __init__(self, path: str | os.PathLike[str], model: dict[str, str], *, stride: int = 8,
                 length: int = 16, rotate_bytes: int | None = None, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.model = dict(model)
        self.stride = stride
        self.length = length
        self.rotate_bytes = rotate_bytes
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._lock = threading.Lock()  # protects _seq, _file, _broken and the file's contents
        self._broken: str | None = None  # why the log cannot be written any more (disk full, ...)
        self._seq = 0
        self.lines_written = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._open()
        except OSError as exc:
            raise self._cannot_write(exc) from exc
        try:  # locked before recovery: another run's open events are not a crash's
            self._lock_file(self._file)
            self.recovered = self._recover()
        except OSError as exc:
            self._file.close()
            raise self._cannot_write(exc) from exc
        except BaseException:
            self._file.close()
            raise

    # -- crash recovery -----------------------------------------------------------------------

    def _recover(self) -> int:
        """Cut a torn last line and end events left open by a crash. Returns events ended.

        StreamdetError when the file exists and is not an event log (a config given as the log
        by mistake): it is neither cut nor appended to.
        """
        if self.path.exists():
            with open(self.path, "rb+") as f:
                head = f.read(len(_LINE_START))
                size = f.seek(0, os.SEEK_END)
                # Every line starts with the schema; a crash may have left a first line torn short of it.
                if size and head != _LINE_START and not (size == len(head) and _LINE_START.startswith(head)):
                    raise StreamdetError(f"{self.path}: exists and is not a streamdet event log; not writing "
                                         f"to it (give another --events or sinks.events.path)")
                tail_start = max(0, size - _TAIL_BYTES)  # lines are short: the tail holds the last one
                f.seek(tail_start)
                tail = f.read()
                if tail and not tail.endswith(b"\n"):
                    if b"\n" not in tail and tail_start > 0:
                        raise StreamdetError(f"{self.path}: its last line is over {_TAIL_BYTES} bytes: "
                                             f"not a streamdet event log; not writing to it")
                    cut = tail_start + tail.rfind(b"\n") + 1
                    f.truncate(cut)
                    log.warning("%s: removed a torn last line (%d bytes) left by a crash", self.path, size - cut)
        open_events: dict[str, dict[str, Any]] = {}
        for obj in read_lines(self.path):
            kind, event_id = obj.get("type"), obj.get("id")
            if kind in ("new", "update") and event_id:
                open_events[event_id] = obj
            elif kind == "end" and event_id:
                open_events.pop(event_id, None)
        if not open_events:
            return 0
        self._append(b"".join(
            self._encode(dict(last, type="end", end_reason="crash_recovery", run_id=self.run_id,
                              seq=self._next_seq(), latency_ms=None))
            for last in open_events.values()
        ))
        os.fsync(self._file.fileno())
        log.warning("%s: ended %d event(s) left open by a crash", self.path, len(open_events))
        return len(open_events)

    # -- writing ------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _cannot_write(self, exc: OSError) -> StreamdetError:
        return StreamdetError(f"{self.path}: cannot write the event log ({exc.strerror or exc})")

    def _write(self, obj: dict[str, Any], durable: bool) -> dict[str, Any]:
        """Append one line. StreamdetError when the file cannot be written (a full disk, ...): the
        part of the line that was written is cut at once, and every later write fails the same way."""
        with self._lock:
            if self._broken is not None:
                raise StreamdetError(self._broken)
            obj["seq"] = self._next_seq()
            line = self._encode(obj)
            start = None
            try:
                if self.rotate_bytes and self._file.tell() > 0 and self._file.tell() + len(line) > self.rotate_bytes:
                    self._rotate()
                start = self._file.tell()
                self._append(line)
                if durable:
                    os.fsync(self._file.fileno())
            except OSError as exc:
                error = self._cannot_write(exc)
                self._broken = str(error)
                if start is not None:  # no torn line: readers see only whole lines (truncating frees space)
                    try:
                        os.ftruncate(self._file.fileno(), start)
                    except OSError:
                        pass  # the next start cuts it (crash recovery)
                raise error from exc
            self.lines_written += 1
        return obj

    @staticmethod
    def _encode(obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()

    def _append(self, data: bytes) -> None:
        written = 0
        while written < len(data):  # unbuffered: a short write leaves nothing behind in memory
            written += self._file.write(data[written:])

    def _open(self) -> io.FileIO:
        # Unbuffered bytes: each line is one write call, so nothing waits in a buffer to be lost
        # in a crash or written after a failure.
        return open(self.path, "ab", buffering=0)

    def _lock_file(self, file: io.FileIO) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StreamdetError(f"{self.path}: in use by another running streamdet; give each run its own "
                                 f"event log (--events or sinks.events.path)") from None
        except OSError as exc:  # a file system without locks (some network mounts): write unlocked
            log.warning("%s: cannot be locked (%s): a second run on this log would not be refused",
                        self.path, exc.strerror or exc)

    def _rotate(self) -> None:
        os.fsync(self._file.fileno())
        paths = rotated_paths(self.path)  # [.5, .4, ..., .1, path]
        if paths[0].exists():
            paths[0].unlink()
        for older, newer in zip(paths, paths[1:], strict=False):
            if newer.exists():
                os.replace(newer, older)
        # The new file is locked before the old one (now .1) is closed: the lock never lapses.
        new = self._open()
        self._lock_file(new)
        self._file.close()
        self._file = new

    def write_event(self, change: EventChange, *, latency_ms: float | None) -> dict[str, Any]:
        """Append one ``new``/``update``/``end`` line; returns what was written."""
        obj: dict[str, Any] = {
            "schema": SCHEMA,
            "type": change.type,
            "id": change.id,
            "run_id": self.run_id,
            "seq": 0,
            "source": change.source,
            "label": change.label,
            "score": round(float(change.score), 4),
            "peak_score": round(float(change.peak_score), 4),
            "threshold": change.threshold,
            "start_time": iso_utc(change.start_time),
            "end_time": iso_utc(change.end_time),
            "start_frame": change.start_frame,
            "end_frame": change.end_frame,
            "window": {
                "first_frame": change.window_first_frame,
                "last_frame": change.window_last_frame,
                "stride": self.stride,
                "length": self.length,
            },
            "latency_ms": None if latency_ms is None else round(latency_ms, 1),
            "end_reason": change.end_reason,
            "model": self.model,
        }
        return self._write(obj, durable=change.type != "update")

    def write_status(self, source: str, status: str, reason: str, wall_time: float) -> dict[str, Any]:
        """Append a ``status`` line (``online`` / ``offline``)."""
        obj = {
            "schema": SCHEMA,
            "type": "status",
            "run_id": self.run_id,
            "seq": 0,
            "source": source,
            "status": status,
            "reason": redact_text(reason),  # reasons quote errors, which may quote a URL
            "time": iso_utc(wall_time),
        }
        return self._write(obj, durable=True)

    def close(self) -> None:
        """fsync and close. StreamdetError when that fails, unless a write has already reported
        the log broken."""
        with self._lock:
            if self._file.closed:
                return
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                if self._broken is None:
                    self._broken = str(self._cannot_write(exc))
                    raise StreamdetError(self._broken) from exc
            finally:
                self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
