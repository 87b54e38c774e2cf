"""The JSONL event log survives SIGKILL at any moment, and rotates without splitting a line.

The crash test kills ``streamdet run`` (vtest.avi with a tiny model whose scores swing, so
events open, update and end all the time) 20 times at seeded random moments, restarting it on
the same log each time, then checks every line of every file. Importing torch costs seconds per
process, so most runs are forked from a "zygote" process that imported everything once and then
runs ``streamdet.cli.main`` in each child; every fifth run is a plain ``python -m streamdet run``
killed at a random moment of its start-up.

The file is paced (``realtime: true``) at ``PACE_FPS``, so every run lasts at least
``795 / PACE_FPS`` seconds on any machine and is still running when it is killed. A replay as
fast as it decodes did not: on a fast 2-core machine it ended in 1 s, before its kill.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from assets import vtest_path
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_model import make_tiny_weights, make_walk_clip

from streamdet.models.weights import load_checkpoint, save_checkpoint
from streamdet.sinks.jsonl import EventLog, read_lines, rotated_paths

KILLS = 20
SEED = 20261126
# Pace of the replay, and the model's frame rate so that it uses every frame (a window each 8
# frames: 12.5 windows, so about as many lines, a second). A run lasts >= 795 / 100 = 7.95 s:
# longer than the latest kill (the first event plus up to 1 s, or start-up plus up to 2.5 s).
PACE_FPS = 100.0
ZYGOTE = """
import os, signal, sys
import cv2, numpy, torch  # the slow imports, once
import streamdet.cli, streamdet.inference, streamdet.pipeline, streamdet.runner  # noqa: F401
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped by the kernel
argv = sys.argv[1:]
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        os._exit(streamdet.cli.main(argv))
    print(pid, flush=True)
"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, its contract at ``PACE_FPS`` so that a file paced at that rate uses every
    frame (the default 10 fps would use one frame in 10 and make 10 times fewer lines)."""
    folder = tmp_path_factory.getbasetemp() / "streamdet-e2e"
    folder.mkdir(exist_ok=True)
    tiny = load_checkpoint(make_tiny_weights(folder, make_walk_clip(folder)))
    path = tmp_path_factory.mktemp("paced") / "tiny-paced.safetensors"
    save_checkpoint(
        path,
        tiny.model,
        class_names=tiny.class_names,
        contract=dataclasses.replace(tiny.contract, fps=PACE_FPS),
    )
    return path


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still exists {timeout} s after SIGKILL")


def assert_running(pid: int) -> None:
    """The forked run ``pid`` is still running (a run that ended early was killed by nobody)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise AssertionError(f"the forked run {pid} ended before its kill") from None


def all_raw_lines(path: Path) -> list[bytes]:
    return [
        line
        for p in rotated_paths(path)
        if p.exists()
        for line in p.read_bytes().splitlines(keepends=True)
    ]


def check_pairs(lines: list[dict[str, Any]]) -> dict[str, int]:
    """Every ``new`` is followed by exactly one ``end`` of its id before the id opens again.

    Event ids restart in each run, so a ``new`` and its ``end`` are paired in file order (which
    is also how crash recovery pairs them). Returns the count of each end reason.
    """
    open_ids: set[str] = set()
    reasons: dict[str, int] = {}
    for obj in lines:
        kind, event_id = obj.get("type"), obj.get("id")
        if kind == "new":
            assert event_id not in open_ids, f"{event_id} opened twice without an end"
            open_ids.add(event_id)
        elif kind == "update":
            assert event_id in open_ids, f"update of {event_id}, which is not open"
        elif kind == "end":
            assert event_id in open_ids, f"end of {event_id}, which is not open (a second end?)"
            open_ids.discard(event_id)
            reasons[obj["end_reason"]] = reasons.get(obj["end_reason"], 0) + 1
    assert not open_ids, f"events never ended: {sorted(open_ids)}"
    return reasons


@pytest.mark.timeout(300)
def test_twenty_sigkills_at_random_moments_leave_a_log_where_every_event_ends_once(
    tmp_path: Path, weights: Path
) -> None:
    log_path = tmp_path / "events.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # Paced: many lines per second, and a run lasts 7.95 s or more however fast the machine.
                "sources": [
                    {
                        "name": "walk",
                        "url": str(vtest_path()),
                        "realtime": True,
                        "options": {"fps": PACE_FPS},
                    }
                ],
                "model": {
                    "weights": str(weights),
                    "device": "cpu",
                    "precision": "fp32",
                    "max_batch": 1,
                },
                "events": {
                    "threshold": 0.6,
                    "exit_threshold": 0.4,
                    "smoothing": 1,
                    "open_windows": 1,
                    "update_min_delta": 0.0,
                    "update_min_interval_s": 0.0,
                },
                # Small files so that some kills land around a rotation (2 or 3 of them); 5 files hold
                # the whole test. The paced runs write about as much on any machine (64 kB here; more
                # only where the last whole-process run, killed 1.9 s after its start, reaches events).
                "sinks": {"events": {"path": str(log_path), "rotate_mb": 0.025}},
                "progress_interval_s": 60,
            }
        )
    )
    rng = random.Random(SEED)
    argv = ["run", str(config), "--precision", "fp32", "--device", "cpu"]
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    killed_running = 0
    try:
        for kill in range(KILLS):
            lines_before = len(all_raw_lines(log_path))
            if (
                kill % 5 == 4
            ):  # a whole process, killed at any moment of start-up (imports, recovery, open)
                proc = subprocess.Popen(
                    [sys.executable, "-m", "streamdet", *argv],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(rng.uniform(0.2, 2.5))
                assert proc.poll() is None, "streamdet run exited early"
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            else:  # a forked run, killed while it writes events
                zygote.stdin.write("go\n")
                zygote.stdin.flush()
                pid = int(zygote.stdout.readline())
                deadline = time.monotonic() + 20
                while not any(
                    b'"type":"new"' in line for line in all_raw_lines(log_path)[lines_before:]
                ):
                    assert time.monotonic() < deadline, "the forked run opened no event in 20 s"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.0))
                assert_running(pid)
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid)
                killed_running += 1
            # Before recovery: every line but possibly the last of the newest file parses.
            raw = all_raw_lines(log_path)
            for line in raw[:-1]:
                json.loads(line)
    finally:
        zygote.kill()
        zygote.wait(10)
        zygote.stdin.close()
        zygote.stdout.close()

    with EventLog(log_path, {"name": "m", "sha256": "-"}):  # the restart after the last kill
        pass

    assert not any(p.exists() for p in rotated_paths(log_path)[:1]), (
        "more than 6 files: lines were dropped"
    )
    raw = all_raw_lines(log_path)
    assert all(line.endswith(b"\n") for line in raw)
    lines = [json.loads(line) for line in raw]  # after recovery every line parses
    assert lines == list(read_lines(log_path))
    reasons = check_pairs(lines)
    assert reasons.get("crash_recovery", 0) >= 5, reasons
    runs = list(dict.fromkeys(o["run_id"] for o in lines))
    assert len(runs) >= killed_running
    for run_id in runs:
        seqs = [o["seq"] for o in lines if o["run_id"] == run_id]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.mark.timeout(60)
@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=120),
    rotate_bytes=st.integers(min_value=200, max_value=3000),
)
def test_rotation_splits_no_line_and_loses_none_while_the_files_hold_them(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], rotate_bytes: int
) -> None:
    path = tmp_path_factory.mktemp("rot") / "events.jsonl"
    with EventLog(path, {"name": "m", "sha256": "-"}, rotate_bytes=rotate_bytes) as log:
        for n in sizes:
            log.write_status("cam", "online", "x" * n, 0.0)

    files = [p for p in rotated_paths(path) if p.exists()]
    lines = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    for p in files:
        data = p.read_bytes()
        assert data.endswith(b"\n")
        # a file only exceeds the limit when it holds one line longer than the limit
        assert len(data) <= rotate_bytes or data.count(b"\n") == 1
    seqs = [o["seq"] for o in lines]
    assert seqs == sorted(seqs) and seqs == list(range(seqs[0], seqs[-1] + 1))
    if len(files) < len(rotated_paths(path)):  # nothing rotated out of the kept files yet
        assert seqs == list(range(1, len(sizes) + 1))


@pytest.mark.timeout(30)
def test_a_kill_between_rotation_renames_loses_no_line(tmp_path: Path) -> None:
    """A crash after ``events.jsonl`` moved to ``.1`` but before the new file exists."""
    path = tmp_path / "events.jsonl"
    with EventLog(path, {"name": "m", "sha256": "-"}, rotate_bytes=10_000) as log:
        for _ in range(3):
            log.write_status("cam", "online", "opened", 0.0)
    os.replace(path, path.with_name("events.jsonl.1"))  # what _rotate does, then the kill

    with EventLog(path, {"name": "m", "sha256": "-"}, rotate_bytes=10_000) as log:
        log.write_status("cam", "offline", "lost", 0.0)

    assert [o["status"] for o in read_lines(path)] == ["online"] * 3 + ["offline"]
