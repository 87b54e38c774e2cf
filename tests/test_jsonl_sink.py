"""Tests of the JSONL event log: line format, ordering, rotation and crash recovery."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from streamdet.errors import StreamdetError
from streamdet.events import EventChange
from streamdet.sinks.jsonl import SCHEMA, EventLog, iso_utc, read_lines, rotated_paths

MODEL = {"name": "c3d_bn_demo.safetensors", "sha256": "ab" * 32}
T0 = 1_764_164_400.0  # 2025-11-26T13:40:00Z
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EVENT_KEYS = {
    "schema",
    "type",
    "id",
    "run_id",
    "seq",
    "source",
    "label",
    "score",
    "peak_score",
    "threshold",
    "start_time",
    "end_time",
    "start_frame",
    "end_frame",
    "window",
    "latency_ms",
    "end_reason",
    "model",
}


def change(
    type_: str = "new", event_id: str = "cam-fall-1", *, k: int = 2, end_reason: str | None = None
) -> EventChange:
    """A line of event ``event_id`` caused by the k-th window (stride 8, 10 fps)."""
    return EventChange(
        type=type_,
        id=event_id,
        source="cam",
        label="fall",
        class_index=1,
        score=0.712345,
        peak_score=0.8,
        threshold=0.6,
        start_time=T0,
        end_time=T0 + (8 * k + 15) / 10,
        start_frame=0,
        end_frame=8 * k + 15,
        window_first_frame=8 * k,
        window_last_frame=8 * k + 15,
        window_time=T0 + (8 * k + 15) / 10,
        end_reason=end_reason,
    )


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_event_lines_carry_every_field_of_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL, stride=8, length=16, run_id="run1") as log:
        log.write_event(change("new"), latency_ms=123.456)
        log.write_event(change("end", k=5, end_reason="score_drop"), latency_ms=None)

    new, end = lines_of(path)
    assert set(new) == EVENT_KEYS and set(end) == EVENT_KEYS
    assert new == {
        "schema": SCHEMA,
        "type": "new",
        "id": "cam-fall-1",
        "run_id": "run1",
        "seq": 1,
        "source": "cam",
        "label": "fall",
        "score": 0.7123,
        "peak_score": 0.8,
        "threshold": 0.6,
        "start_time": "2025-11-26T13:40:00.000Z",
        "end_time": "2025-11-26T13:40:03.100Z",
        "start_frame": 0,
        "end_frame": 31,
        "window": {"first_frame": 16, "last_frame": 31, "stride": 8, "length": 16},
        "latency_ms": 123.5,
        "end_reason": None,
        "model": MODEL,
    }
    assert (end["type"], end["end_reason"], end["latency_ms"], end["seq"]) == (
        "end",
        "score_drop",
        None,
        2,
    )
    assert end["window"] == {"first_frame": 40, "last_frame": 55, "stride": 8, "length": 16}


def test_status_lines_say_online_or_offline(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL) as log:
        log.write_status("cam", "online", "opened", T0)
        log.write_status("cam", "offline", "read failed", T0 + 12.3456)

    online, offline = lines_of(path)
    assert {k: online[k] for k in ("schema", "type", "source", "status", "reason", "time")} == {
        "schema": SCHEMA,
        "type": "status",
        "source": "cam",
        "status": "online",
        "reason": "opened",
        "time": "2025-11-26T13:40:00.000Z",
    }
    assert (offline["status"], offline["time"]) == ("offline", "2025-11-26T13:40:12.345Z")
    assert offline["run_id"] == online["run_id"] and offline["seq"] > online["seq"]


@pytest.mark.parametrize(
    ("epoch_s", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (T0 + 0.5, "2025-11-26T13:40:00.500Z"),
        (T0 + 59.9999, "2025-11-26T13:40:59.999Z"),  # truncated, never rounded into the next second
    ],
)
def test_times_are_iso_8601_utc_with_milliseconds(epoch_s: float, text: str) -> None:
    assert iso_utc(epoch_s) == text
    assert ISO_UTC_MS.match(iso_utc(epoch_s))


def test_each_line_is_in_the_file_as_soon_as_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, MODEL)
    try:
        log.write_event(change("update"), latency_ms=5.0)  # not fsynced, but flushed
        assert [obj["type"] for obj in lines_of(path)] == ["update"]
    finally:
        log.close()


@pytest.mark.timeout(30)
def test_seq_is_strictly_increasing_in_file_order_with_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL) as log:

        def writer(n: int) -> None:
            for i in range(100):
                if i % 10 == 0:
                    log.write_status(f"cam{n}", "online", "opened", T0 + i)
                else:
                    log.write_event(change("update", f"cam{n}-fall-{i}"), latency_ms=1.0)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)

    seqs = [obj["seq"] for obj in lines_of(path)]
    assert seqs == list(range(1, 401))


def test_rotation_happens_on_line_boundaries_and_loses_no_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(tmp_path / "probe.jsonl", MODEL) as probe:
        line_bytes = (
            len(json.dumps(probe.write_event(change(), latency_ms=1.0), separators=(",", ":"))) + 1
        )
    rotate_bytes = 7 * line_bytes + line_bytes // 2  # 7 lines per file
    with EventLog(path, MODEL, rotate_bytes=rotate_bytes) as log:
        for i in range(30):
            log.write_event(change("update", f"cam-fall-{i}"), latency_ms=float(i))

    files = [p for p in rotated_paths(path) if p.exists()]
    assert [p.name for p in files] == [
        "events.jsonl.4",
        "events.jsonl.3",
        "events.jsonl.2",
        "events.jsonl.1",
        "events.jsonl",
    ]
    for p in files:
        data = p.read_bytes()
        assert data.endswith(b"\n") and len(data) <= rotate_bytes
        for line in data.decode().splitlines():
            json.loads(line)  # whole lines only
    assert [obj["seq"] for obj in read_lines(path)] == list(range(1, 31))


def test_rotation_keeps_the_newest_five_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL, rotate_bytes=1) as log:  # every line in a file of its own
        for i in range(9):
            log.write_event(change("update", f"cam-fall-{i}"), latency_ms=None)

    assert [obj["seq"] for obj in read_lines(path)] == [4, 5, 6, 7, 8, 9]
    assert not path.with_name("events.jsonl.6").exists()


def test_reopening_after_a_crash_cuts_the_torn_line_and_ends_open_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, MODEL, run_id="crashed")
    log.write_event(change("new", "cam-fall-1"), latency_ms=1.0)
    log.write_event(change("new", "cam-fight-2"), latency_ms=1.0)
    log.write_event(change("update", "cam-fall-1", k=3), latency_ms=1.0)
    log.write_event(change("end", "cam-fight-2", k=4, end_reason="score_drop"), latency_ms=1.0)
    log.close()
    with open(path, "a") as f:
        f.write('{"schema":"streamdet.event/1","type":"update","id":"cam-fa')  # SIGKILL mid-line

    with EventLog(path, MODEL, run_id="next") as reopened:
        assert reopened.recovered == 1
        reopened.write_status("cam", "online", "opened", T0)

    lines = lines_of(path)  # every line parses: the torn one is gone
    assert [(o["type"], o.get("id")) for o in lines] == [
        ("new", "cam-fall-1"),
        ("new", "cam-fight-2"),
        ("update", "cam-fall-1"),
        ("end", "cam-fight-2"),
        ("end", "cam-fall-1"),
        ("status", None),
    ]
    recovered = lines[4]
    assert (recovered["end_reason"], recovered["run_id"], recovered["end_frame"]) == (
        "crash_recovery",
        "next",
        39,
    )
    assert recovered["seq"] < lines[5]["seq"]


def test_crash_recovery_finds_events_opened_in_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL, rotate_bytes=1) as log:
        log.write_event(change("new", "cam-fall-1"), latency_ms=1.0)
        log.write_event(change("update", "cam-fall-1", k=3), latency_ms=1.0)

    with EventLog(path, MODEL) as reopened:
        assert reopened.recovered == 1

    assert [(o["type"], o["end_reason"]) for o in read_lines(path)][-1] == ("end", "crash_recovery")


def test_reopening_a_cleanly_closed_log_appends_and_recovers_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL) as log:
        log.write_event(change("new"), latency_ms=1.0)
        log.write_event(change("end", end_reason="shutdown"), latency_ms=None)

    with EventLog(path, MODEL) as reopened:
        assert reopened.recovered == 0
        reopened.write_status("cam", "online", "opened", T0)

    assert [o["type"] for o in lines_of(path)] == ["new", "end", "status"]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("under-a-file", "cannot write the event log (Not a directory)"),
        ("a-folder", "is a folder, not a regular file: cannot use it as the event log"),
    ],
)
def test_a_log_that_cannot_be_written_is_a_clear_error(
    tmp_path: Path, where: str, message: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    path = (
        tmp_path / "a-file" / "events.jsonl" if where == "under-a-file" else tmp_path / "a-folder"
    )

    with pytest.raises(StreamdetError, match=re.escape(message)):
        EventLog(path, MODEL)


FULL_DISK_WRITER = """
import resource, signal, sys
from streamdet.errors import StreamdetError
from streamdet.sinks.jsonl import EventLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead
log = EventLog(sys.argv[1], {"name": "m", "sha256": "0"})
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # the disk is full at 2000 bytes
written = 0
try:
    for i in range(100):
        log.write_status("cam", "online", "opened " + "x" * (i % 7), 0.0)
        written += 1
except StreamdetError as exc:
    print(written, exc)
try:
    log.write_status("cam", "offline", "later", 0.0)
except StreamdetError as exc:
    print("again:", exc)
log.close()  # already reported: no second error
print("closed")
"""


@pytest.mark.timeout(60)
def test_a_full_disk_is_a_clear_error_and_leaves_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    # A real failing write: the child process may not grow any file past 2000 bytes.
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITER, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    first, again, closed = done.stdout.splitlines()
    written, message = first.split(" ", 1)
    assert message == f"{path}: cannot write the event log (File too large)"
    assert again == f"again: {message}" and closed == "closed"
    lines = lines_of(path)  # every line whole: the torn one was cut at once
    assert len(lines) == int(written) > 0 and path.stat().st_size <= 2000
    assert [o["seq"] for o in lines] == list(range(1, len(lines) + 1))


def test_a_log_in_use_is_refused_until_closed_and_its_open_events_are_left_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    live = EventLog(path, MODEL, rotate_bytes=2000)
    live.write_event(change("new"), latency_ms=1.0)

    with pytest.raises(StreamdetError, match="in use by another running streamdet"):
        EventLog(path, MODEL)
    for i in range(10):  # past a rotation the log is still locked
        live.write_status("cam", "online", f"opened {i}", T0)
    assert path.with_name(path.name + ".1").exists()
    with pytest.raises(StreamdetError, match="in use by another running streamdet"):
        EventLog(path, MODEL)
    assert not any(o.get("end_reason") == "crash_recovery" for o in read_lines(path))

    live.close()
    with EventLog(path, MODEL) as after:  # free again; the event never ended is a crash's now
        assert after.recovered == 1


def test_a_file_that_is_not_an_event_log_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "rtsp.yaml"  # a config given as the log by mistake; no final newline either
    content = b"sources:\n  - name: cam\n    url: rtsp://cam.local/stream1"
    path.write_bytes(content)

    with pytest.raises(StreamdetError, match="exists and is not a streamdet event log"):
        EventLog(path, MODEL)
    assert path.read_bytes() == content


def test_a_first_line_torn_short_of_its_schema_is_cut_like_any_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"schema":"strea')  # a crash during the very first write

    with EventLog(path, MODEL) as log_:
        log_.write_status("cam", "online", "opened", T0)
    assert [o["seq"] for o in lines_of(path)] == [1]


def test_a_file_system_without_locks_gets_an_unlocked_log_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    from streamdet.sinks import jsonl

    if jsonl.fcntl is None:
        pytest.skip("logs are not locked on this platform")

    def no_locks(fd: int, operation: int) -> None:  # as flock on some network mounts
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(jsonl.fcntl, "flock", no_locks)
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL) as log_:
        log_.write_status("cam", "online", "opened", T0)

    assert [o["type"] for o in lines_of(path)] == ["status"]
    assert "cannot be locked (No locks available)" in caplog.text


# -- paths that are not regular files -----------------------------------------------------------

DEADLINE_S = 20.0  # an open or a read that would block forever fails the test after this


def call_within(deadline_s: float, fn: Callable[[], object]) -> object:
    """``fn()``'s result (or its exception, re-raised) when it returns within ``deadline_s``.

    It runs on a daemon thread: a regression that blocks forever fails the test at the deadline
    instead of hanging the suite.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="call-within", daemon=True)
    thread.start()
    thread.join(deadline_s)
    assert not thread.is_alive(), f"still blocked after {deadline_s} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


def make_special(path: Path, kind: str) -> Path:
    """A FIFO, or a symlink to the character device /dev/null, at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/null")  # a device that cannot fill memory if a regression reads it
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize(
    ("kind", "described"), [("fifo", "a FIFO (named pipe)"), ("device", "a character device")]
)
@pytest.mark.parametrize("which", ["events.jsonl", "events.jsonl.2"], ids=["log", "rotated-file"])
def test_a_log_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, kind: str, described: str, which: str
) -> None:
    """A FIFO blocked the open forever; /dev/zero or /dev/full was read by crash recovery until
    memory ran out; a rotated file that is a FIFO blocked the recovery's read."""
    path = tmp_path / "events.jsonl"
    special = make_special(tmp_path / which, kind)

    refused = re.escape(f"{special}: is {described}, not a regular file")
    with pytest.raises(StreamdetError, match=refused):
        call_within(DEADLINE_S, lambda: EventLog(path, MODEL))
    with pytest.raises(StreamdetError, match="not a regular file"):
        call_within(DEADLINE_S, lambda: list(read_lines(path)))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_that_appears_after_the_check_is_refused_instead_of_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path check and the open are two steps: the open itself must never block."""
    from streamdet.sinks import jsonl

    monkeypatch.setattr(jsonl, "check_log_path", lambda path: None)  # as if made in between
    fifo = make_special(tmp_path / "events.jsonl", "fifo")

    with pytest.raises(StreamdetError, match="is a FIFO"):
        call_within(DEADLINE_S, lambda: EventLog(fifo, MODEL))
    with pytest.raises(StreamdetError, match="is a FIFO"):
        call_within(DEADLINE_S, lambda: jsonl.open_regular(fifo, os.O_RDONLY, "the event log"))


# -- lines that are not the log's own ------------------------------------------------------------

HEAD = b'{"schema":"streamdet.event/1",'


def strict_lines(data: bytes) -> list[dict]:
    """Lines parsed as strict JSON (NaN or Infinity fail the test)."""
    return [json.loads(line, parse_constant=pytest.fail) for line in data.splitlines()]


@pytest.mark.parametrize(
    "bad",
    [
        HEAD + b'"type":"new","id":"cam-fall-9","score":NaN}',
        HEAD + b'"type":"new","id":["cam-fall-9"],"score":0.7}',
        HEAD + b'"type":"new","id":"cam-fall-\xff\xfe9","score":0.7}',
        HEAD + b'"type":"new","id":"cam-fall-9",',
        b"",
    ],
    ids=["nan-score", "list-id", "not-utf8", "not-json", "blank"],
)
def test_crash_recovery_ignores_lines_that_are_not_the_logs_own_and_keeps_them(
    tmp_path: Path, bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Each of these made the recovery crash (ValueError, TypeError, UnicodeDecodeError) and the
    run end with an internal error."""
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL, run_id="crashed") as log_:
        log_.write_event(change("new", "cam-fall-1"), latency_ms=1.0)
    with open(path, "ab") as f:  # an edit, or a damaged disk, in the middle of the log
        f.write(bad + b"\n")
    with EventLog(path, MODEL, run_id="before") as log_:
        log_.write_event(change("new", "cam-fight-2"), latency_ms=1.0)
    before = path.read_bytes()
    caplog.clear()

    with EventLog(path, MODEL, run_id="next") as reopened:
        assert reopened.recovered == 1  # cam-fight-2: cam-fall-1 was ended by the run before
        reopened.write_status("cam", "online", "opened", T0)

    content = path.read_bytes()
    assert content.startswith(before)  # the user's lines, the bad one included, as they were
    added = strict_lines(content[len(before) :])
    assert [(o["type"], o.get("id"), o.get("end_reason")) for o in added] == [
        ("end", "cam-fight-2", "crash_recovery"),
        ("status", None, None),
    ]
    assert "1 line(s) are not event lines written by streamdet (" in caplog.text
    assert f"first at {path}:2)" in caplog.text


# -- durability: what is fsynced ---------------------------------------------------------------


def record_fsyncs(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[int]:
    """The log's size at each fsync of the file at ``path`` (fsyncs of other files are not kept).

    A SIGKILL keeps the page cache, so only this shows a line is made durable (power cut safe).
    """
    sizes: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if path.exists() and os.path.samestat(st, os.stat(path)):
            sizes.append(st.st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return sizes


def test_new_end_and_status_lines_are_fsynced_once_written_and_update_lines_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Updates are many and are superseded by the end line; everything else must survive a power
    cut as soon as it is written. Removing an fsync went unnoticed by every kill test."""
    path = tmp_path / "events.jsonl"
    synced = record_fsyncs(monkeypatch, path)
    log_ = EventLog(path, MODEL)
    writes = [
        ("new", lambda: log_.write_event(change("new"), latency_ms=1.0)),
        ("update", lambda: log_.write_event(change("update", k=3), latency_ms=1.0)),
        ("status", lambda: log_.write_status("cam", "offline", "read failed", T0)),
        (
            "end",
            lambda: log_.write_event(change("end", k=4, end_reason="score_drop"), latency_ms=1.0),
        ),
    ]
    for kind, write in writes:
        synced.clear()
        write()
        size = path.stat().st_size
        assert synced == ([] if kind == "update" else [size]), kind  # after the line, not before

    synced.clear()
    log_.close()
    assert synced == [path.stat().st_size]


def test_the_lines_crash_recovery_adds_are_fsynced_before_the_run_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL, run_id="crashed") as log_:
        log_.write_event(change("new", "cam-fall-1"), latency_ms=1.0)
        log_.write_event(change("new", "cam-fight-2"), latency_ms=1.0)
    with open(path, "ab") as f:
        f.write(HEAD + b'"type":"upd')  # torn by the crash
    synced = record_fsyncs(monkeypatch, path)

    with EventLog(path, MODEL, run_id="next") as reopened:
        assert reopened.recovered == 2
        assert synced == [path.stat().st_size]  # both end lines, and the cut, made durable
    assert [o["end_reason"] for o in lines_of(path)] == [
        None,
        None,
        "crash_recovery",
        "crash_recovery",
    ]


# -- through the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(assets_dir: Path, walk_clip: Path) -> Path:
    from tiny_model import make_tiny_weights

    return make_tiny_weights(assets_dir, walk_clip)


@pytest.mark.timeout(120)
def test_a_run_on_a_log_with_lines_not_its_own_keeps_them_and_ends_the_events_left_open(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``streamdet run --events`` on a log with a NaN score, a list id or non-UTF-8 bytes ended
    with 'error: internal error' (exit 1) before writing anything."""
    from streamdet.cli import main

    path = tmp_path / "events.jsonl"
    with EventLog(path, MODEL, run_id="crashed") as log_:
        log_.write_event(change("new", "cam-fall-1"), latency_ms=1.0)
    with open(path, "ab") as f:
        f.write(HEAD + b'"type":"update","id":"cam-fall-1","score":NaN}\n')
        f.write(HEAD + b'"type":"new","id":["cam-fall-2"],"score":0.7}\n')
        f.write(HEAD + b'"type":"new","id":"cam-fall-\xff3","score":0.7}\n')
    before = path.read_bytes()

    code = main(
        [
            "run",
            "--source",
            str(walk_clip),
            "--weights",
            str(weights),
            "--precision",
            "fp32",
            "--events",
            str(path),
        ]
    )

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "error" not in err and "[summary]" in out
    content = path.read_bytes()
    assert content.startswith(before)
    added = strict_lines(content[len(before) :])
    first = added[0]
    assert (first["type"], first["id"]) == ("end", "cam-fall-1")
    assert first["end_reason"] == "crash_recovery"
    assert len(added) > 1 and all(o["run_id"] == added[0]["run_id"] for o in added)
    assert "3 line(s) are not event lines written by streamdet" in caplog.text
