"""A network camera that cannot be opened at start: retried, picked up late, or named as never online.

With ``options.reconnect: true`` (the default) a camera that boots after the detector is not an
error: the run warns once, retries with backoff, runs the other sources, and its summary says
which sources never came online, however the run was stopped (``--max-seconds`` or a signal).
Without reconnect it is one ``error:`` line and exit 2 (tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RtspServer, free_port
from tiny_model import make_tiny_weights

from streamdet.cli import main

REPO = Path(__file__).resolve().parent.parent
SECRET = "hunter2-never-logged"
STREAM_OPTIONS = {
    "open_timeout_s": 2.0,
    "read_timeout_s": 2.0,
    "backoff_initial_s": 0.2,
    "backoff_max_s": 0.5,
}


@pytest.fixture(scope="module")
def weights(assets_dir: Path, walk_clip: Path) -> Path:
    return make_tiny_weights(assets_dir, walk_clip)


def write_config(path: Path, sources: list[dict[str, Any]], weights: Path) -> Path:
    """Thresholds of 0: every window of a source that is online opens or continues events."""
    path.write_text(
        yaml.safe_dump(
            {
                "sources": sources,
                "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
                "events": {
                    "threshold": 0.0,
                    "exit_threshold": 0.0,
                    "smoothing": 1,
                    "open_windows": 1,
                    "update_min_interval_s": 60.0,
                },
                "sinks": {"events": {"path": str(path.with_suffix(".jsonl"))}},
                "progress_interval_s": 0.5,
            }
        )
    )
    return path


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # A line being written may be incomplete: only whole lines count.
    return [
        json.loads(line)
        for line in path.read_text().splitlines(keepends=True)
        if line.endswith("\n")
    ]


def statuses(lines: list[dict[str, Any]], source: str) -> list[str]:
    return [o["status"] for o in lines if o["type"] == "status" and o["source"] == source]


def wait_for(
    condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    """Wait until ``condition`` holds, failing early if the run ``proc`` has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.1)


def never_online_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("[summary] never online: ")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.mark.timeout(120)
def test_a_camera_that_never_comes_online_is_named_in_the_summary_and_the_other_source_runs(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: the summary did not say that a camera had never come online."""
    dead_port = free_port()  # closed again: connections are refused
    cfg = write_config(
        tmp_path / "two.yaml",
        [
            {
                "name": "walk",
                "url": str(walk_clip),
                "realtime": True,
            },  # 10 s paced: still live at the stop
            {
                "name": "dead",
                "url": f"rtsp://admin:{SECRET}@127.0.0.1:{dead_port}/cam",
                "options": STREAM_OPTIONS,
            },
        ],
        weights,
    )

    with caplog.at_level(logging.INFO):
        code = main(["run", str(cfg), "--max-seconds", "6"])
    out, err = capsys.readouterr()

    assert code == 0, err[-3000:]
    lines = log_lines(cfg.with_suffix(".jsonl"))
    assert {o["source"] for o in lines if o["type"] == "new"} == {"walk"}
    assert statuses(lines, "dead") == ["offline"]
    shown = f"rtsp://admin:***@127.0.0.1:{dead_port}/cam"
    assert never_online_line(out) == (
        f"[summary] never online: dead ({shown}: cannot open stream (Connection refused))"
    )
    assert re.search(r"\[progress\] [^|]*dead: [^;|]* s offline", out), (
        "progress lines show it offline"
    )
    dead_warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "dead" in r.getMessage()
    ]
    assert (
        len(dead_warnings) == 1 and "not online at start, retrying with backoff" in dead_warnings[0]
    )
    assert shown in dead_warnings[0]
    for text in (out, err, caplog.text, cfg.with_suffix(".jsonl").read_text()):
        assert SECRET not in text


@pytest.mark.timeout(240)
def test_a_camera_that_boots_after_the_detector_is_picked_up_and_a_signal_still_gives_the_summary(
    tmp_path: Path, weights: Path, rtsp_video: Path
) -> None:
    """A camera whose server starts after the run has found it offline comes online in the same
    run; SIGINT then ends the run with a summary naming only the camera that never came."""
    late = RtspServer(["--video", str(rtsp_video)], free_port(), tmp_path / "rtsp_server.log")
    cfg = write_config(
        tmp_path / "late.yaml",
        [
            {"name": "late", "url": late.url, "options": STREAM_OPTIONS},
            {
                "name": "dead",
                "url": f"rtsp://127.0.0.1:{free_port()}/cam",
                "options": STREAM_OPTIONS,
            },
        ],
        weights,
    )
    events = cfg.with_suffix(".jsonl")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "STREAMDET_CACHE_DIR": str(tmp_path / "cache")}
    with open(out_path, "wb") as out_file, open(err_path, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamdet", "run", str(cfg), "--max-seconds", "200"],
            stdout=out_file,
            stderr=err_file,
            env=env,
            cwd=tmp_path,
        )
    try:
        wait_for(
            lambda: statuses(log_lines(events), "late") == ["offline"],
            "the run found the camera offline",
            proc,
            90,
        )
        late.start()
        wait_for(
            lambda: any(o["type"] == "new" and o["source"] == "late" for o in log_lines(events)),
            "an event from the camera that came online",
            proc,
            90,
        )
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        late.stop()

    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, err[-3000:]
    lines = log_lines(events)
    assert statuses(lines, "late") == ["offline", "online"]
    assert statuses(lines, "dead") == ["offline"]
    news = {o["id"] for o in lines if o["type"] == "new"}
    assert {o["id"]: o["end_reason"] for o in lines if o["type"] == "end"} == dict.fromkeys(
        news, "shutdown"
    )
    assert never_online_line(out).startswith("[summary] never online: dead (rtsp://127.0.0.1:")
    assert "late" not in never_online_line(out)
    for name in ("late", "dead"):
        assert (
            len(re.findall(rf"WARNING streamdet\.router: {name}: not online at start", err)) == 1
        ), err
