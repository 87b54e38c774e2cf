"""The JSONL event log: one JSON object per line, written through and crash-safe.

Every line is flushed as it is written; ``new``, ``end`` and ``status`` lines are also fsynced,
so after a power cut or SIGKILL every line but possibly the last parses. On open, a torn last
line is cut off and every event that has a ``new`` but no ``end`` gets an ``end`` with
``end_reason: crash_recovery``. Lines that are not the log's own (not UTF-8, not strict JSON, an
event without a string ``id``: an edit or a damaged disk) are left as they are, ignored by the
recovery and reported in one warning. Optional size-based rotation happens on line boundaries.
A log is locked (``flock``) while a run writes it, so a second run cannot take a live run's open
events for a crash's.

A log, and each of its rotated files, must be a regular file: a FIFO would block the run at
open, and a device such as ``/dev/zero`` would be read without end by the recovery.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import stat
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

try:
    import fcntl
except ImportError:  # not on Windows: logs are not locked there
    fcntl = None  # type: ignore[assignment]

from streamdet.errors import StreamdetError
from streamdet.events import EventChange
from streamdet.redaction import redact_text

log = logging.getLogger(__name__)

SCHEMA = "streamdet.event/1"
_LINE_START = b'{"schema":"streamdet.event/'  # how every line of a log begins
_TAIL_BYTES = 1 << 20  # read from a log's end to find a torn last line
_ROTATED_KEEP = 5
_READ_CHUNK = 1 << 16
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # not on Windows, which has no FIFOs to block on
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows only
_NOT_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def iso_utc(epoch_s: float) -> str:
    """UTC epoch seconds -> ``2026-11-26T13:40:00.123Z``."""
    t = dt.datetime.fromtimestamp(epoch_s, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def rotated_paths(path: Path) -> list[Path]:
    """Rotated files of ``path``, oldest first, then ``path`` itself."""
    return [path.with_name(f"{path.name}.{i}") for i in range(_ROTATED_KEEP, 0, -1)] + [path]


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words: ``'a FIFO (named pipe)'``, ...

    Example:
        >>> file_kind(os.stat("/").st_mode)
        'a folder'
    """
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for is_kind, kind in _NOT_REGULAR if is_kind(mode)), "a special file")


def _not_regular(path: Path, mode: int, what: str) -> StreamdetError:
    return StreamdetError(
        f"{path}: is {file_kind(mode)}, not a regular file: cannot use it as {what}"
    )


def _role(file: Path, log_path: Path) -> str:
    return "the event log" if file == log_path else "a rotated event log"


def check_log_path(path: str | os.PathLike[str]) -> None:
    """StreamdetError when the log at ``path``, or one of its rotated files, exists and is not a
    regular file (after symlinks): a folder, FIFO, device or socket.

    The runner calls this before it builds the model; :class:`EventLog` checks again on open.
    """
    for p in reversed(rotated_paths(Path(path))):  # the log first
        try:
            mode = os.stat(p).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:  # a symlink loop, a file in the path where a folder should be, ...
            why = exc.strerror or exc
            raise StreamdetError(f"{p}: cannot write the event log ({why})") from exc
        if not stat.S_ISREG(mode):
            raise _not_regular(p, mode, _role(p, Path(path)))


def open_regular(path: str | os.PathLike[str], flags: int, what: str) -> int:
    """A file descriptor of ``path`` opened with ``flags``; StreamdetError unless it is a regular
    file. The open never blocks: it is non-blocking until the file is known to be regular, so a
    FIFO put at ``path`` after any earlier check is refused instead of waited on.

    Args:
        path: the file.
        flags: ``os.O_RDONLY``, ``os.O_RDWR | os.O_APPEND | os.O_CREAT``, ...
        what: the file's role, for the error (``"the event log"``).
    """
    fd = os.open(path, flags | _O_NONBLOCK, 0o666)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(Path(path), mode, what)
        if _O_NONBLOCK and fcntl is not None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _raw_lines(fd: int) -> Iterator[bytes]:
    """The lines of an open file, without their newlines; read with pread (its offset is kept)."""
    offset, pending = 0, b""
    while chunk := os.pread(fd, _READ_CHUNK, offset):
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
    if pending:
        yield pending


class LogLine(NamedTuple):
    """One line of a log as read: where it is, its bytes, and what it holds when it is the log's."""

    file: Path
    number: int  # from 1 in its file
    raw: bytes  # without its newline
    obj: dict[str, Any] | None  # parse_line(raw): None for a line that is not the log's own


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One line as the log writes it, or None when it is not one.

    A line of the log begins with its schema and is strict JSON (UTF-8, no NaN or Infinity).
    ``new``/``update``/``end`` lines need a non-empty string ``id``.

    Example:
        >>> parse_line(b'{"schema":"streamdet.event/1","type":"end","id":"cam-1"}')["id"]
        'cam-1'
        >>> parse_line(b'{"schema":"streamdet.event/1","type":"new","id":"a","score":NaN}') is None
        True
    """
    if not line.startswith(_LINE_START):
        return None
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(obj, dict):
        return None
    event_id = obj.get("id")
    if obj.get("type") in ("new", "update", "end") and not (isinstance(event_id, str) and event_id):
        return None
    return obj


def line_problem(line: bytes) -> str:
    """Why ``line`` is not a line of the log (``parse_line`` gave None), in words.

    Example:
        >>> line_problem(b"\\x89PNG")
        'not UTF-8 text (byte 0x89 at offset 0)'
    """
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    if not line.startswith(_LINE_START):
        return f"does not begin with {_LINE_START.decode()}"
    return "not strict JSON, or an event line without a string id"


def scan_lines(path: str | os.PathLike[str], *, rotated_only: bool = False) -> Iterator[LogLine]:
    """Every line of a log's rotated files (``events.jsonl.5`` ... ``.1``), then of the log
    itself: oldest first, as they were written. Files that do not exist are left out.

    Args:
        path: the log.
        rotated_only: leave out the log itself (the writer reads it through its own handle).

    Raises:
        StreamdetError: one of the files is not a regular file (a FIFO is refused, never read).
        OSError: one of them cannot be read.
    """
    path = Path(path)
    for p in rotated_paths(path)[:-1] if rotated_only else rotated_paths(path):
        try:
            fd = open_regular(p, os.O_RDONLY, _role(p, path))
        except FileNotFoundError:
            continue
        try:
            for n, line in enumerate(_raw_lines(fd), 1):
                yield LogLine(p, n, line, parse_line(line))
        finally:
            os.close(fd)


def read_lines(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Parsed lines of an event log and its rotated files, oldest first; lines that are not the
    log's own (torn by a crash, edited, damaged) skipped."""
    for line in scan_lines(path):
        if line.obj is not None:
            yield line.obj


def event_line(
    change: EventChange,
    *,
    seq: int,
    run_id: str,
    model: Mapping[str, str],
    stride: int,
    length: int,
    latency_ms: float | None,
) -> dict[str, Any]:
    """The fields of ``change``'s ``new``/``update``/``end`` line, in the log's order: what
    :meth:`EventLog.write_event` writes, and what an output builds for a run without a log."""
    return {
        "schema": SCHEMA,
        "type": change.type,
        "id": change.id,
        "run_id": run_id,
        "seq": seq,
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
            "stride": stride,
            "length": length,
        },
        "latency_ms": None if latency_ms is None else round(latency_ms, 1),
        "end_reason": change.end_reason,
        "model": dict(model),
    }


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

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: dict[str, str],
        *,
        stride: int = 8,
        length: int = 16,
        rotate_bytes: int | None = None,
        run_id: str | None = None,
    ) -> None:
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
        check_log_path(self.path)
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

        Everything is read through the log's own locked handle (and the rotated files, each
        checked to be a regular file). StreamdetError when the file exists and is not an event
        log (a config given as the log by mistake): it is neither cut nor appended to.
        """
        fd = self._file.fileno()
        self._cut_torn_line(fd)
        open_events: dict[str, dict[str, Any]] = {}
        ignored: list[str] = []
        for where, obj in self._scan(fd):
            if obj is None:
                ignored.append(where)
            elif obj.get("type") in ("new", "update"):
                open_events[obj["id"]] = obj
            elif obj.get("type") == "end":
                open_events.pop(obj["id"], None)
        if ignored:
            log.warning(
                "%s: %d line(s) are not event lines written by streamdet (not UTF-8, not "
                "strict JSON or an event without a string id; first at %s): left as they "
                "are and ignored",
                self.path,
                len(ignored),
                ignored[0],
            )
        if not open_events:
            return 0
        self._append(
            b"".join(
                self._encode(
                    dict(
                        last,
                        type="end",
                        end_reason="crash_recovery",
                        run_id=self.run_id,
                        seq=self._next_seq(),
                        latency_ms=None,
                    )
                )
                for last in open_events.values()
            )
        )
        os.fsync(fd)
        log.warning("%s: ended %d event(s) left open by a crash", self.path, len(open_events))
        return len(open_events)

    def _cut_torn_line(self, fd: int) -> None:
        """Cut a last line without its newline (a crash mid-write); refuse a file not a log."""
        size = os.fstat(fd).st_size
        head = os.pread(fd, len(_LINE_START), 0)
        # Every line starts with the schema; a crash may have left a first line torn short of it.
        torn_first = size == len(head) and _LINE_START.startswith(head)
        if size and head != _LINE_START and not torn_first:
            raise StreamdetError(
                f"{self.path}: exists and is not a streamdet event log; not "
                f"writing to it (give another --events or sinks.events.path)"
            )
        tail_start = max(0, size - _TAIL_BYTES)  # lines are short: the tail holds the last one
        tail = os.pread(fd, size - tail_start, tail_start)
        if tail and not tail.endswith(b"\n"):
            if b"\n" not in tail and tail_start > 0:
                raise StreamdetError(
                    f"{self.path}: its last line is over {_TAIL_BYTES} bytes: "
                    f"not a streamdet event log; not writing to it"
                )
            cut = tail_start + tail.rfind(b"\n") + 1
            os.ftruncate(fd, cut)
            self._file.seek(0, os.SEEK_END)  # the next line's start, should its write fail
            log.warning(
                "%s: removed a torn last line (%d bytes) left by a crash", self.path, size - cut
            )

    def _scan(self, fd: int) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """('file:line', parsed line or None) of the rotated files, then of the log itself."""
        for rotated in scan_lines(self.path, rotated_only=True):
            yield f"{rotated.file}:{rotated.number}", rotated.obj
        for n, line in enumerate(_raw_lines(fd), 1):
            yield f"{self.path}:{n}", parse_line(line)

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
                if (
                    self.rotate_bytes
                    and self._file.tell() > 0
                    and self._file.tell() + len(line) > self.rotate_bytes
                ):
                    self._rotate()
                start = self._file.tell()
                self._append(line)
                if durable:
                    os.fsync(self._file.fileno())
            except OSError as exc:
                error = self._cannot_write(exc)
                self._broken = str(error)
                if (
                    start is not None
                ):  # no torn line: readers see only whole lines (truncating frees space)
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
        # in a crash or written after a failure. Readable too: the recovery reads through it.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_BINARY
        return io.FileIO(open_regular(self.path, flags, "the event log"), "ab")

    def _lock_file(self, file: io.FileIO) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StreamdetError(
                f"{self.path}: in use by another running streamdet; give each run its own "
                f"event log (--events or sinks.events.path)"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts): write unlocked
            log.warning(
                "%s: cannot be locked (%s): a second run on this log would not be refused",
                self.path,
                exc.strerror or exc,
            )

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

    def write_event(
        self,
        change: EventChange,
        *,
        latency_ms: float | None,
        extra: Mapping[str, Any] | None = None,
        node: str | None = None,
    ) -> dict[str, Any]:
        """Append one ``new``/``update``/``end`` line (with ``extra``'s fields after the
        event's own, such as an ``end`` line's ``snapshot`` path); returns what was written.

        ``node``: the cluster node that scored it (``--backend ray``), a ``node`` field; none on
        a single machine."""
        obj = event_line(
            change,
            seq=0,
            run_id=self.run_id,
            model=self.model,
            stride=self.stride,
            length=self.length,
            latency_ms=latency_ms,
        )
        if node is not None:
            obj["node"] = node
        obj.update((k, v) for k, v in (extra or {}).items() if k not in obj)
        return self._write(obj, durable=change.type != "update")

    def write_status(
        self, source: str, status: str, reason: str, wall_time: float, node: str | None = None
    ) -> dict[str, Any]:
        """Append a ``status`` line (``online`` / ``offline``); ``node`` as in :meth:`write_event`."""
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
        if node is not None:
            obj["node"] = node
        return self._write(obj, durable=True)

    def write_media(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Append a media line (``type`` ``clip`` or ``snapshot``, for an event ``id``), fsynced;
        returns what was written."""
        obj = {"schema": SCHEMA, "type": fields["type"], "run_id": self.run_id, "seq": 0}
        obj.update((k, v) for k, v in fields.items() if k not in obj)
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
