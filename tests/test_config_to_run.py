"""From a YAML config (or ``--source`` options) through ``streamdet run`` to what the run does.

Each test writes a config the way a user would, runs the CLI's ``main`` in this process on a real
clip with the tiny fitted model (tests/tiny_model.py: its 11 windows score "run" over windows 0-1
and 7-9 and "walk" over windows 2-6), and checks the event log, the summary or the model's
inputs. With stride 8 each window stands for its central frames 8 i + 4 ... 8 i + 11, so at
10 fps the events last 1.5 s (run), 3.9 s (walk) and 2.3 s (run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from assets import cut_clip, vtest_path
from tiny_model import CLASS_NAMES, make_tiny_weights

from streamdet import inference
from streamdet.cli import main
from streamdet.config import load_config
from streamdet.events import ClassRule, TrackerSettings
from streamdet.inference import calibration_windows
from streamdet.models.weights import load_checkpoint
from streamdet.pipeline import tracker_settings

REPO = Path(__file__).resolve().parent.parent
EVENT_TYPES = ("new", "update", "end")


@pytest.fixture(scope="module")
def weights(assets_dir: Path, walk_clip: Path) -> Path:
    return make_tiny_weights(assets_dir, walk_clip)


def write_config(
    path: Path,
    source: Path,
    weights: Path,
    *,
    events: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    source_keys: dict[str, Any] | None = None,
) -> Path:
    """A YAML config replaying ``source`` with thresholds 0.6/0.4, no smoothing, 1 window to open."""
    cfg = {
        "sources": [{"name": "walk", "url": str(source), "realtime": False, **(source_keys or {})}],
        "model": {"weights": str(weights), "device": "cpu", "precision": "fp32", **(model or {})},
        "window": {"stride": 8},
        "events": {
            "threshold": 0.6,
            "exit_threshold": 0.4,
            "smoothing": 1,
            "open_windows": 1,
            **(events or {}),
        },
        "sinks": {"events": {"path": str(path.parent / "events.jsonl")}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def event_lines(path: Path) -> list[dict[str, Any]]:
    return [o for o in log_lines(path) if o["type"] in EVENT_TYPES]


def labels_of_events(path: Path) -> list[str]:
    """The label of each event, in the order the events opened."""
    return [o["label"] for o in event_lines(path) if o["type"] == "new"]


def seconds(iso: str) -> float:
    """'2026-01-01T00:00:00.123Z' -> epoch seconds (ms precision)."""
    return time.mktime(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")) + int(iso[20:23]) / 1000


# --- the events section reaches the tracker -----------------------------------------------------


def test_tracker_settings_carry_every_key_of_the_events_section(tmp_path: Path) -> None:
    """Regression guard: keys dropped between the config and the tracker are ignored silently."""
    path = tmp_path / "events.yaml"
    path.write_text(
        "events:\n"
        "  threshold: 0.7\n  exit_threshold: 0.3\n  smoothing: 4\n  open_windows: 3\n"
        "  min_duration_s: 2.5\n  background: none\n  update_min_delta: 0.1\n"
        "  update_min_interval_s: 2.0\n"
        "  classes:\n    walk: {threshold: 0.9}\n    run: {threshold: 0.8, exit_threshold: 0.5}\n"
    )

    settings = tracker_settings(load_config(path), CLASS_NAMES)

    assert settings == TrackerSettings(
        class_names=CLASS_NAMES,
        default_rule=ClassRule(enter=0.7, exit=0.3),
        # a class's missing threshold is the section's
        rules={"walk": ClassRule(enter=0.9, exit=0.3), "run": ClassRule(enter=0.8, exit=0.5)},
        smoothing=4,
        open_windows=3,
        min_duration_s=2.5,
        background="none",
        update_min_delta=0.1,
        update_min_interval_s=2.0,
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ({}, ["run", "walk", "run"]),
        ({"classes": {"walk": {"threshold": 0.95}}}, ["run", "run"]),
        ({"classes": {"run": {"threshold": 0.95}}}, ["walk"]),
        ({"threshold": 0.95, "classes": {"walk": {"threshold": 0.6}}}, ["walk"]),
    ],
    ids=["section-thresholds", "walk-raised", "run-raised", "walk-lowered-under-a-high-default"],
)
def test_a_per_class_threshold_suppresses_or_allows_that_class_alone(
    tmp_path: Path, walk_clip: Path, weights: Path, events: dict[str, Any], expected: list[str]
) -> None:
    """walk peaks at 0.91 and run at 0.88: a 0.95 threshold is out of their reach."""
    config = write_config(tmp_path / "run.yaml", walk_clip, weights, events=events)

    assert main(["run", str(config)]) == 0

    assert labels_of_events(tmp_path / "events.jsonl") == expected


@pytest.mark.timeout(120)
def test_a_per_class_exit_threshold_ends_that_class_sooner(
    tmp_path: Path, walk_clip: Path, weights: Path
) -> None:
    """walk scores 0.64, 0.77, 0.85, 0.91, 0.64 over windows 2-6 and 0.08 at window 7: entering
    at 0.75, its event lasts to window 6 with the section's exit 0.4, to window 5 with 0.7."""
    ends = {}
    for exit_threshold in (None, 0.7):
        walk = {"threshold": 0.75, **({"exit_threshold": exit_threshold} if exit_threshold else {})}
        folder = tmp_path / f"exit-{exit_threshold}"
        config = write_config(
            folder / "run.yaml", walk_clip, weights, events={"classes": {"walk": walk}}
        )
        assert main(["run", str(config)]) == 0
        ends[exit_threshold] = [
            o["end_frame"]
            for o in event_lines(folder / "events.jsonl")
            if o["type"] == "end" and o["label"] == "walk"
        ]

    assert ends == {None: [8 * 6 + 11], 0.7: [8 * 5 + 11]}  # the last frame of the window's span


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("min_duration_s", "expected"),
    [(0.0, ["run", "walk", "run"]), (2.0, ["walk", "run"]), (3.0, ["walk"])],
)
def test_min_duration_s_drops_shorter_events_without_a_line(
    tmp_path: Path, walk_clip: Path, weights: Path, min_duration_s: float, expected: list[str]
) -> None:
    """The events last 1.5 s (run), 3.9 s (walk) and 2.3 s (run)."""
    config = write_config(
        tmp_path / "run.yaml", walk_clip, weights, events={"min_duration_s": min_duration_s}
    )

    assert main(["run", str(config)]) == 0

    lines = event_lines(tmp_path / "events.jsonl")
    assert [o["label"] for o in lines if o["type"] == "new"] == expected
    assert [
        o["label"] for o in lines if o["type"] == "end"
    ] == expected  # a dropped event has no line
    for o in lines:
        assert seconds(o["end_time"]) - seconds(o["start_time"]) >= min_duration_s - 0.001


def test_a_class_the_model_does_not_have_is_one_error_line_before_anything_is_written(
    tmp_path: Path, walk_clip: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "run.yaml", walk_clip, weights, events={"classes": {"jump": {"threshold": 0.5}}}
    )

    code = main(["run", str(config)])

    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    assert err.splitlines() == [
        "error: events.classes: unknown class(es) ['jump']; the model has ['none', 'walk', 'run']"
    ]
    assert not (tmp_path / "events.jsonl").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("background", "warned", "none_events"),
    [("none", False, False), ("idle", True, True)],
    ids=["a-class-of-the-model", "not-a-class-of-the-model"],
)
def test_a_background_the_model_lacks_is_a_warning_and_then_every_class_makes_events(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    caplog: pytest.LogCaptureFixture,
    background: str,
    warned: bool,
    none_events: bool,
) -> None:
    """ "none" scores 0.23-0.32 in five windows: over its own 0.2 threshold, unless it is the
    background."""
    config = write_config(
        tmp_path / "run.yaml",
        walk_clip,
        weights,
        events={
            "background": background,
            "classes": {"none": {"threshold": 0.2, "exit_threshold": 0.1}},
        },
    )

    with caplog.at_level(logging.WARNING, logger="streamdet"):
        assert main(["run", str(config)]) == 0

    warning = "events.background 'idle' is not a class of this model: every class can make events"
    assert (warning in caplog.messages) is warned
    assert ("none" in labels_of_events(tmp_path / "events.jsonl")) is none_events


# --- sources ------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_repeated_sources_with_the_same_file_name_get_distinct_names(
    tmp_path: Path, walk_clip: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a" / "walk.avi", tmp_path / "b" / "walk.avi"
    for copy in (first, second):
        copy.parent.mkdir()
        shutil.copyfile(walk_clip, copy)
    events = tmp_path / "events.jsonl"

    code = main(
        [
            "run",
            "--source",
            str(first),
            "--source",
            str(second),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--events",
            str(events),
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    statuses = [(o["source"], o["status"]) for o in log_lines(events) if o["type"] == "status"]
    assert sorted(statuses) == [
        ("walk", "offline"),
        ("walk", "online"),
        ("walk-2", "offline"),
        ("walk-2", "online"),
    ]
    for name in ("walk", "walk-2"):
        assert f"[summary] {name}: 100 frames read" in out


@pytest.mark.timeout(120)
def test_an_rtsp_source_given_on_the_command_line_is_named_after_its_host(
    tmp_path: Path, weights: Path, rtsp_server
) -> None:
    server = rtsp_server(pattern=True)
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamdet",
            "run",
            "--source",
            server.url,
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--events",
            str(events),
            "--max-seconds",
            "300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not (events.exists() and '"status":"online"' in events.read_text()):
            assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the stream was not online within 60 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, err[-2000:]
    names = {o["source"] for o in log_lines(events)}
    assert len(names) == 1, names
    (name,) = names
    assert name.startswith("127.0.0.1") and re.fullmatch(r"[A-Za-z0-9_.\-]+", name), name
    assert f"[summary] {name}: " in out


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("fps", "used", "rate"),
    [(None, 100, 10.0), (20.0, 50, 20.0)],
    ids=["the-files-10-fps", "options-fps-20"],
)
def test_options_fps_sets_the_rate_frames_are_sampled_and_stamped_at(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    capsys: pytest.CaptureFixture[str],
    fps: float | None,
    used: int,
    rate: float,
) -> None:
    """The model takes 10 fps: a source said to run at 20 fps gives it every second frame, and
    a replay's frames are stamped 1/20 s apart."""
    options = {"options": {"fps": fps}} if fps else {}
    config = write_config(tmp_path / "run.yaml", walk_clip, weights, source_keys=options)

    assert main(["run", str(config)]) == 0

    assert f"[summary] walk: 100 frames read, {used} used" in capsys.readouterr().out
    lines = event_lines(tmp_path / "events.jsonl")
    assert lines
    for o in lines:
        span = seconds(o["end_time"]) - seconds(o["start_time"])
        assert span == pytest.approx((o["end_frame"] - o["start_frame"]) / rate, abs=0.0015)


@pytest.mark.timeout(120)
def test_options_fps_paces_a_realtime_file(tmp_path: Path, walk_clip: Path, weights: Path) -> None:
    """24 frames paced at 4 fps take at least 6 s (at the file's 10 fps, 2.4 s). Only a lower
    bound: a busy machine can make the run slower, never faster."""
    clip = cut_clip(walk_clip, tmp_path / "short.avi", start_frame=0, n_frames=24)
    config = write_config(
        tmp_path / "run.yaml",
        clip,
        weights,
        source_keys={"realtime": True, "options": {"fps": 4.0}},
    )

    started = time.monotonic()
    assert main(["run", str(config)]) == 0
    elapsed = time.monotonic() - started

    assert elapsed >= 5.4, f"24 frames at 4 fps took only {elapsed:.2f} s"


# --- the model ----------------------------------------------------------------------------------


@pytest.fixture
def check_clips_asked(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor | None]:
    """The check_clips each build_engine call of a run got; the engine is built in fp32 on them
    (bf16 and int8 depend on the CPU)."""
    real_build = inference.build_engine
    asked: list[torch.Tensor | None] = []

    def build_recording(model, *args, **kwargs):
        asked.append(kwargs.get("check_clips"))
        return real_build(model, "cpu", "fp32", check_clips=kwargs.get("check_clips"))

    monkeypatch.setattr(inference, "build_engine", build_recording)
    return asked


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "calibration", [True, False], ids=["model-calibration", "first-file-source"]
)
def test_reduced_precision_is_checked_on_the_calibration_video_else_the_first_file_source(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    check_clips_asked: list[torch.Tensor | None],
    calibration: bool,
) -> None:
    (tmp_path / "conf").mkdir()
    calib = cut_clip(
        vtest_path(), tmp_path / "conf" / "calib.avi", start_frame=400, n_frames=90, size=(320, 240)
    )
    # a path relative to the config file's folder, run from another folder
    model = {"precision": "bf16", **({"calibration": "calib.avi"} if calibration else {})}
    config = write_config(tmp_path / "conf" / "run.yaml", walk_clip, weights, model=model)
    monkeypatch.chdir(tmp_path)

    assert main(["run", str(config)]) == 0

    contract = load_checkpoint(weights).contract
    expected = calibration_windows(calib if calibration else walk_clip, stride=8, contract=contract)
    other = calibration_windows(walk_clip if calibration else calib, stride=8, contract=contract)
    (clips,) = check_clips_asked
    assert clips is not None and torch.equal(clips, expected)
    assert not torch.equal(clips[:1], other[:1])


@pytest.mark.parametrize("content", [None, b"not a video" * 100], ids=["missing", "not-a-video"])
def test_a_calibration_video_that_cannot_be_read_is_one_error_line_before_the_model_is_built(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    content: bytes | None,
) -> None:
    calib = tmp_path / "calib.avi"
    if content is not None:
        calib.write_bytes(content)
    config = write_config(
        tmp_path / "run.yaml",
        walk_clip,
        weights,
        model={"precision": "bf16", "calibration": "calib.avi"},
    )

    with caplog.at_level("INFO"):
        code = main(["run", str(config)])

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (
        code == 2
        and len(errors) == 1
        and errors[0].startswith(f"error: model.calibration: {calib}")
    )
    assert not [
        r for r in caplog.records if r.name.startswith("streamdet.inference")
    ]  # no engine built


class SlowEngine:
    """A real engine that takes at least DELAY_S per call."""

    DELAY_S = 0.05

    def __init__(self, real) -> None:
        self.real = real
        self.device, self.precision, self.concurrent = real.device, real.precision, real.concurrent

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        time.sleep(self.DELAY_S)
        return self.real(clips)


@pytest.mark.timeout(120)
def test_event_lines_carry_the_weights_sha256_and_a_plausible_latency(
    tmp_path: Path, walk_clip: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """latency_ms runs from the capture of a window's newest frame to its line: at least the
    engine's 50 ms, at most the whole run."""
    real_build = inference.build_engine
    monkeypatch.setattr(inference, "build_engine", lambda *a, **k: SlowEngine(real_build(*a, **k)))
    config = write_config(tmp_path / "run.yaml", walk_clip, weights)

    started = time.monotonic()
    assert main(["run", str(config)]) == 0
    run_ms = (time.monotonic() - started) * 1000.0

    lines = event_lines(tmp_path / "events.jsonl")
    assert len(lines) >= 6
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    for o in lines:
        assert o["model"] == {"name": weights.name, "sha256": sha256}
        if o["type"] == "end" and o["end_reason"] != "score_drop":
            continue  # ended by the source ending, not by a window: no latency to report
        assert isinstance(o["latency_ms"], float), o
        assert SlowEngine.DELAY_S * 1000.0 <= o["latency_ms"] <= run_ms, o
