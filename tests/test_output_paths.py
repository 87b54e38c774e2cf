"""``streamdet run`` refuses outputs that would hang the run or destroy a file, before the model
is built: an event log that is not a regular file, and two outputs (or an output and an input)
on one file."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from streamdet.cli import main
from streamdet.config import load_config
from streamdet.errors import StreamdetError
from streamdet.runner import check_outputs

DEADLINE_S = 120  # a run that blocks on its log fails here; a good one ends in seconds
MEMORY_CAP = 4 << 30  # bytes of address space: a regression reading /dev/zero stops here


def assert_one_error_line(code: int, out: str, err: str) -> str:
    """The single ``error:`` line of a failed command (exit 2, nothing else printed)."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def files_in(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` and its bytes (links followed)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


@pytest.mark.timeout(DEADLINE_S * 2)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize(
    ("events", "described"),
    [
        ("fifo.jsonl", "a FIFO (named pipe)"),
        ("/dev/zero", "a character device"),
        ("/dev/full", "a character device"),
    ],
)
def test_an_event_log_that_is_not_a_regular_file_is_one_error_line_before_the_model_is_built(
    tmp_path: Path, events: str, described: str
) -> None:
    """A FIFO hung the run for ever at open (--max-seconds could not help); on /dev/zero or
    /dev/full crash recovery read the device until MemoryError. In a subprocess with a deadline
    and a memory cap, so a regression fails the test instead of hanging or filling memory."""
    if events == "fifo.jsonl":
        os.mkfifo(tmp_path / events)

    done = subprocess.run(
        [sys.executable, "-m", "streamdet", "run", "--events", events, "--max-seconds", "5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        preexec_fn=cap_memory,
    )

    line = assert_one_error_line(done.returncode, done.stdout, done.stderr)  # no model log lines
    assert line == (
        f"error: {events}: is {described}, not a regular file: cannot use it as the event log"
    )


@pytest.fixture
def videos(tmp_path: Path, walk_clip: Path) -> tuple[Path, Path]:
    """Two small real videos, sources ``cam1`` and ``cam2`` when given with --source."""
    cam1, cam2 = tmp_path / "cam1.avi", tmp_path / "cam2.avi"
    shutil.copyfile(walk_clip, cam1)
    shutil.copyfile(walk_clip, cam2)
    return cam1, cam2


def _rotating_config(tmp: Path, cam1: Path) -> list[str]:
    config = tmp / "rotating.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "cam1", "url": str(cam1)}],
                "sinks": {
                    "events": {"path": str(tmp / "events.jsonl"), "rotate_mb": 1},
                    "overlay": {"video": str(tmp / "events.jsonl.1")},
                },
            }
        )
    )
    return ["run", str(config)]


def _symlink(tmp: Path) -> list[str]:
    (tmp / "link.jsonl").symlink_to(tmp / "events.jsonl")
    return ["run", "--events", "link.jsonl", "--output-video", "events.jsonl"]


def _hard_link(tmp: Path) -> list[str]:
    os.link(tmp / "events.jsonl", tmp / "annotated.mp4")
    return ["run", "--events", "events.jsonl", "--output-video", "annotated.mp4"]


CASES: dict[str, tuple[Callable[[Path, Path, Path], list[str]], str]] = {
    "same-path": (
        lambda t, a, b: ["run", "--events", "out.mp4", "--output-video", "out.mp4"],
        "out.mp4 is both the event log and the annotated video",
    ),
    "relative-and-absolute": (
        lambda t, a, b: [
            "run",
            "--events",
            "events.jsonl",
            "--output-video",
            str(t / "events.jsonl"),
        ],
        "events.jsonl is both the event log and the annotated video",
    ),
    "symlink": (
        lambda t, a, b: _symlink(t),
        "link.jsonl is both the event log and the annotated video",
    ),
    "hard-link": (
        lambda t, a, b: _hard_link(t),
        "events.jsonl is both the event log and the annotated video",
    ),
    "video-of-one-of-several-sources": (
        lambda t, a, b: [
            "run",
            "--source",
            str(a),
            "--source",
            str(b),
            "--output-video",
            "out.avi",
            "--events",
            "out_cam2.avi",
        ],
        "out_cam2.avi is both the event log and the annotated video of source 'cam2'",
    ),
    "video-over-its-source": (
        lambda t, a, b: ["run", "--source", str(a), "--output-video", str(a)],
        "{t}/cam1.avi is both the annotated video and the video of source 'cam1'",
    ),
    "log-over-the-truth": (
        lambda t, a, b: [
            "run",
            "--source",
            str(a),
            "--truth",
            "events.jsonl",
            "--events",
            "events.jsonl",
        ],
        "events.jsonl is both the event log and the truth",
    ),
    "video-over-a-rotated-log": (
        lambda t, a, b: _rotating_config(t, a),
        "{t}/events.jsonl.1 is both a rotated file of the event log and the annotated video",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_two_outputs_or_an_output_and_an_input_on_one_file_is_one_error_line_and_nothing_is_written(
    tmp_path: Path,
    videos: tuple[Path, Path],
    case: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``--events X --output-video X`` overwrote the event log with the video."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.jsonl").write_bytes(b'{"schema":"streamdet.event/1","type":"status"}\n')
    make_argv, message = CASES[case]
    argv = make_argv(tmp_path, *videos)
    before = files_in(tmp_path)

    with caplog.at_level("INFO"):
        code = main(argv)

    out, err = capsys.readouterr()
    line = assert_one_error_line(code, out, err)
    assert line == f"error: {message.format(t=tmp_path)}: give each output a path of its own"
    assert files_in(tmp_path) == before  # the user's files as they were, nothing new
    assert [r.getMessage() for r in caplog.records if r.name.startswith("streamdet")] == []


def test_the_video_names_checked_are_the_ones_the_overlay_writes(
    tmp_path: Path, videos: tuple[Path, Path]
) -> None:
    """With several sources the annotated videos are ``name_<source>.ext``: the check must use
    the overlay's own naming, or it would compare paths nothing writes."""
    from streamdet.sinks.overlay import OverlaySink

    overlay = OverlaySink(
        ["a", "b"], video_path=str(tmp_path / "out.avi"), display=False, sources=["cam1", "cam2"]
    )
    overlay._open_writer("cam2", np.zeros((48, 64, 3), np.uint8), 10.0).release()
    written = str(overlay._paths["cam2"])  # the file the overlay opened for cam2
    sources = [{"name": p.stem, "url": str(p)} for p in videos]

    def config(events: str) -> object:
        return load_config(
            None,
            {
                "sources": sources,
                "sinks": {
                    "events": {"path": events},
                    "overlay": {"video": str(tmp_path / "out.avi")},
                },
            },
        )

    check_outputs(config(str(tmp_path / "events.jsonl")))  # distinct outputs pass
    with pytest.raises(
        StreamdetError, match="is both the event log and the annotated video of source 'cam2'"
    ):
        check_outputs(config(written))
