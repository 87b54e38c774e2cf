"""End-to-end tests of ``streamdet run``: replay determinism, annotated video, signals, errors.

Most runs call the CLI's ``main`` in this process (importing torch again per run would cost
seconds); the signal tests need a real subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from assets import frame_count, vtest_path
from tiny_model import CLIP_FRAMES, make_tiny_weights

from streamdet import inference
from streamdet.cli import main
from streamdet.config import load_config
from streamdet.errors import ConfigError
from streamdet.runner import inference_plan

REPO = Path(__file__).resolve().parent.parent
# From a signal to the process gone: the pipeline aims at 2 s (pipeline.JOIN_TIMEOUT_S for its
# threads, then the flush), and machines differ ~3x in speed: 2.06 s was seen on 2 busy cores.
STOP_DEADLINE_S = 6.0
VOLATILE = (
    "run_id",
    "start_time",
    "end_time",
    "time",
    "latency_ms",
)  # differ between runs by design


@pytest.fixture(scope="module")
def weights(assets_dir: Path, walk_clip: Path) -> Path:
    return make_tiny_weights(assets_dir, walk_clip)


def write_config(path: Path, source: Path, weights: Path, *, realtime: bool, **events: Any) -> Path:
    cfg = {
        "sources": [{"name": "walk", "url": str(source), "realtime": realtime}],
        # max_batch stays 8: a replay must repeat its events whatever the batch setting
        # (regression: which windows shared a batch depended on timing and moved scores ~1e-6).
        "model": {"weights": str(weights), "device": "cpu", "precision": "fp32", "max_batch": 8},
        "events": {
            "threshold": 0.6,
            "exit_threshold": 0.4,
            "smoothing": 1,
            "open_windows": 1,
            "update_min_delta": 0.0,
            "update_min_interval_s": 1.0,
            **events,
        },
        "progress_interval_s": 0.5,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_volatile(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lines without what differs between runs by design; event ids lose their run-id prefix."""
    out = []
    for obj in lines:
        kept = {k: v for k, v in obj.items() if k not in VOLATILE}
        if "id" in kept:
            assert kept["id"].startswith(obj["run_id"] + "-"), kept["id"]
            kept["id"] = kept["id"].removeprefix(obj["run_id"] + "-")
        out.append(kept)
    return out


@pytest.mark.timeout(90)
def test_a_replay_gives_identical_events_on_two_runs_and_annotates_every_frame(
    tmp_path: Path, walk_clip: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "replay.yaml", walk_clip, weights, realtime=False)
    runs = []
    for n in (1, 2):
        events, video = tmp_path / f"events{n}.jsonl", tmp_path / f"annotated{n}.avi"
        code = main(["run", str(cfg), "--events", str(events), "--output-video", str(video)])
        out = capsys.readouterr().out
        assert code == 0
        assert "[summary]" in out and f"{CLIP_FRAMES} frames read" in out
        assert f"[summary] annotated video: {video}\n" in out
        threads = torch.get_num_threads()
        if threads > 1:  # a replay gets a worker per torch thread, and the summary says so
            assert f"on cpu ({threads} inference workers on 1 torch thread each)" in out
        runs.append(log_lines(events))
        assert frame_count(video) == CLIP_FRAMES

    first, second = runs
    types = [o["type"] for o in first]
    assert {"new", "update", "end"} <= set(types), f"the tiny model should make events: {types}"
    assert types[0] == "status" and types[-1] == "status"
    assert without_volatile(first) == without_volatile(second)
    assert first[0]["run_id"] != second[0]["run_id"]
    assert [o["seq"] for o in first] == list(range(1, len(first) + 1))


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_a_live_run_refuses_a_second_run_on_its_log_and_a_signal_ends_its_events_promptly(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str], signum: int | None
) -> None:
    """Ctrl-C (SIGINT), SIGTERM and a closing terminal (SIGHUP) all stop a run gracefully.

    SIGINT was untested, though Ctrl-C is the README's first way to stop a run.
    """
    if signum is None:
        pytest.skip("no SIGHUP on this platform")
    # The whole vtest.avi paced at 10 fps (80 s) and thresholds 0: an event opens at the first
    # window and only the signal ends the run.
    cfg = write_config(
        tmp_path / "live.yaml",
        vtest_path(),
        weights,
        realtime=True,
        threshold=0.0,
        exit_threshold=0.0,
    )
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamdet",
            "run",
            str(cfg),
            "--events",
            str(events),
            "--output-video",
            str(tmp_path / "annotated.avi"),
            "--max-seconds",
            "80",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not (events.exists() and '"type":"new"' in events.read_text()):
            assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no event opened within 60 s"
            time.sleep(0.05)

        # A second run on the same log would take the live run's open events for a crash's.
        code = main(["run", str(cfg), "--events", str(events), "--max-seconds", "5"])
        assert code == 2
        assert f"error: {events}: in use by another running streamdet" in capsys.readouterr().err

        signalled = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, err[-2000:]
    assert elapsed < STOP_DEADLINE_S, f"exit took {elapsed:.2f} s after the signal"
    assert "[progress]" in out and "[summary]" in out
    lines = log_lines(events)
    news = {o["id"] for o in lines if o["type"] == "new"}
    assert news
    assert {o["id"]: o["end_reason"] for o in lines if o["type"] == "end"} == dict.fromkeys(
        news, "shutdown"
    )


@pytest.mark.timeout(60)
def test_an_absent_camera_is_a_clear_error_and_exit_code_2(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code = main(
        [
            "run",
            "--source",
            "7",
            "--weights",
            str(weights),
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--events",
            str(tmp_path / "events.jsonl"),
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert time.monotonic() - started < 20
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert error_lines and "camera 7" in error_lines[-1] and "cannot open" in error_lines[-1]


@pytest.mark.timeout(60)
def test_a_missing_video_file_is_a_clear_error(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.mp4"
    code = main(
        [
            "run",
            "--source",
            str(missing),
            "--weights",
            str(weights),
            "--events",
            str(tmp_path / "e.jsonl"),
        ]
    )

    assert code == 2
    assert f"error: {missing}: video file not found" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_an_event_log_that_cannot_be_written_is_a_clear_error(
    tmp_path: Path, walk_clip: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    events = tmp_path / "a-file" / "events.jsonl"
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
            str(events),
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {events}: cannot write the event log" in err and "internal error" not in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("display", [None, ":99"], ids=["no-display-set", "display-unreachable"])
def test_display_without_a_usable_display_is_an_error_before_anything_is_built(
    walk_clip: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    display: str | None,
) -> None:
    # OpenCV's Qt backend would abort the whole process (exit 134) at the first window.
    from streamdet.sinks.overlay import display_problem

    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if display is None:
        monkeypatch.delenv("DISPLAY", raising=False)
    else:
        monkeypatch.setenv("DISPLAY", display)  # no X server answers there: the probe window fails
    display_problem.cache_clear()
    try:
        with caplog.at_level("INFO"):
            code = main(["run", "--source", str(walk_clip), "--display", "--max-seconds", "5"])
    finally:
        display_problem.cache_clear()

    err = capsys.readouterr().err
    assert code == 2
    assert "error: cannot show frames in a window: " in err and "--output-video" in err
    assert ("DISPLAY" in err) if display is None else ("OpenCV cannot open a window" in err)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("streamdet")] == []


def test_a_config_without_sources_is_an_error_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("sources: []\n")

    with caplog.at_level("INFO"):
        code = main(["run", str(cfg)])

    assert code == 2
    assert (
        "error: no sources: give --source URL or list sources in the config"
        in capsys.readouterr().err
    )
    assert [r.getMessage() for r in caplog.records if r.name.startswith("streamdet")] == []


@pytest.mark.timeout(60)
def test_a_run_that_wrote_no_line_says_there_is_nothing_to_score_against_the_truth(
    tmp_path: Path, weights: Path
) -> None:
    import socket

    # A camera that accepts the connection and never answers: the run stops while its open still
    # waits, before any status line.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    port = silent.getsockname()[1]
    truth = tmp_path / "truth.json"
    truth.write_text(
        json.dumps({"fps": 10, "events": [{"label": "walk", "start_frame": 8, "end_frame": 63}]})
    )
    cfg = tmp_path / "silent.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "cam",
                        "url": f"rtsp://127.0.0.1:{port}/x",
                        "options": {"open_timeout_s": 20.0},
                    }
                ],
                "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
                "sinks": {"events": {"path": str(tmp_path / "events.jsonl")}},
                "truth": str(truth),
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "streamdet", "run", str(cfg), "--max-seconds", "1"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=50,
        )
    finally:
        silent.close()

    assert done.returncode == 0, done.stderr[-2000:]
    assert "[summary] against the truth: nothing to score, this run wrote no line" in done.stdout
    never = f"[summary] never online: cam (rtsp://127.0.0.1:{port}/x: still opening when the run stopped)"
    assert never + "\n" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs where CUDA is present")
def test_fp16_without_cuda_is_one_error_line(
    walk_clip: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "run",
            "--source",
            str(walk_clip),
            "--weights",
            str(weights),
            "--precision",
            "fp16",
            "--events",
            str(tmp_path / "e.jsonl"),
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert (
        "error: precision fp16 needs CUDA, but the model runs on cpu" in err
        and "internal error" not in err
    )


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_max_seconds_must_be_a_positive_duration(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--max-seconds", value])

    assert code == 2
    assert f"invalid duration '{value}'" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_crashing_engine_exits_non_zero_with_a_clear_error(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_build = inference.build_engine

    def build_crashing(*args, **kwargs):
        engine = real_build(*args, **kwargs)

        class Crashing:
            device, precision, concurrent = engine.device, engine.precision, engine.concurrent

            def __call__(self, clips: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("CUDA error: device-side assert triggered")

        return Crashing()

    monkeypatch.setattr(inference, "build_engine", build_crashing)
    cfg = write_config(tmp_path / "replay.yaml", walk_clip, weights, realtime=False)
    started = time.monotonic()

    code = main(["run", str(cfg), "--events", str(tmp_path / "events.jsonl")])

    assert code != 0
    assert time.monotonic() - started < 20
    assert (
        "error: inference failed: RuntimeError: CUDA error: device-side assert triggered"
        in capsys.readouterr().err
    )


@pytest.mark.timeout(120)
def test_a_config_truth_scores_its_own_source_but_not_a_source_given_on_the_command_line(
    tmp_path: Path, walk_clip: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: with --source replacing the config's video, the summary still scored the new
    source against the config's truth (F1 0.111 on a held-out stream)."""
    truth = tmp_path / "truth.json"
    truth.write_text(
        json.dumps({"fps": 10, "events": [{"label": "walk", "start_frame": 8, "end_frame": 63}]})
    )
    cfg = write_config(tmp_path / "with_truth.yaml", walk_clip, weights, realtime=False)
    data = yaml.safe_load(cfg.read_text())
    data["truth"] = str(truth)
    cfg.write_text(yaml.safe_dump(data))
    other = tmp_path / "other.avi"
    other.write_bytes(walk_clip.read_bytes())

    assert main(["run", str(cfg), "--events", str(tmp_path / "a.jsonl")]) == 0
    assert f"against {truth}" in capsys.readouterr().out

    assert (
        main(["run", str(cfg), "--source", str(other), "--events", str(tmp_path / "b.jsonl")]) == 0
    )
    assert "against" not in capsys.readouterr().out

    code = main(
        [
            "run",
            str(cfg),
            "--source",
            str(other),
            "--truth",
            str(truth),
            "--events",
            str(tmp_path / "c.jsonl"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"against {truth}" in out and " F1 " in out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("cuda_graphs", "expected"), [(True, (1, 2, 4, 6)), (False, ())])
def test_cuda_graphs_in_the_config_ask_the_engine_for_graphs_up_to_max_batch(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    cuda_graphs: bool,
    expected: tuple[int, ...],
) -> None:
    real_build = inference.build_engine
    asked: list[tuple[int, ...]] = []

    def build_recording(*args, **kwargs):
        asked.append(tuple(kwargs["cuda_graph_sizes"]))
        return real_build(*args, **kwargs)  # on this CPU: logged and not used

    monkeypatch.setattr(inference, "build_engine", build_recording)
    cfg = write_config(tmp_path / "replay.yaml", walk_clip, weights, realtime=False)
    text = cfg.read_text().replace(
        "max_batch: 8", f"max_batch: 6\n  cuda_graphs: {str(cuda_graphs).lower()}"
    )
    cfg.write_text(text)

    assert main(["run", str(cfg), "--events", str(tmp_path / "events.jsonl")]) == 0
    assert asked == [expected]


REPLAY = {"name": "a", "url": "clip.mp4", "realtime": False}
CAMERAS = [{"name": f"cam{i}", "url": f"rtsp://127.0.0.1:8554/cam{i}"} for i in range(8)]


@pytest.mark.parametrize(
    ("sources", "model", "threads", "expected"),
    [
        ([REPLAY], {}, 2, (2, 1)),
        ([{"name": "a", "url": "clip.mp4"}], {}, 8, (8, 1)),  # realtime defaults to false for files
        ([{"name": "a", "url": "clip.mp4", "realtime": True}], {}, 2, (1, None)),
        (CAMERAS[:1], {}, 2, (1, None)),
        ([REPLAY], {}, 1, (1, None)),
        ([CAMERAS[0], REPLAY], {}, 4, (4, 1)),
        (CAMERAS[:3], {}, 8, (3, 2)),
        (CAMERAS, {}, 2, (2, 1)),
        ([REPLAY], {"workers": 2}, 8, (2, 4)),
        ([REPLAY], {"workers": 1}, 8, (1, 8)),
        (CAMERAS[:1], {"workers": 3}, 2, (3, 1)),
    ],
    ids=[
        "replay-2-cores",
        "replay-8-cores",
        "paced-file",
        "camera",
        "one-core",
        "camera-and-replay",
        "3-cameras-8-cores",
        "8-cameras-2-cores",
        "workers-2",
        "workers-1",
        "workers-over-threads",
    ],
)
def test_a_cpu_run_gets_a_worker_per_source_or_per_core_for_a_replay(
    sources: list[dict[str, Any]],
    model: dict[str, Any],
    threads: int,
    expected: tuple[int, int | None],
) -> None:
    cfg = load_config(None, {"sources": sources, "model": {"device": "cpu", **model}})
    assert inference_plan(cfg, torch.device("cpu"), True, threads) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [({}, (1, 1)), ({"threads": 2}, (1, None))],
    ids=["threads-unset", "threads-set"],
)
def test_a_replay_on_an_engine_that_runs_once_at_a_time_leaves_the_decoder_a_core(
    model: dict[str, Any], expected: tuple[int, int | None]
) -> None:
    cfg = load_config(None, {"sources": [REPLAY], "model": {"device": "cpu", **model}})
    assert inference_plan(cfg, torch.device("cpu"), False, 2) == expected


def test_more_workers_than_an_engine_allows_is_a_config_error() -> None:
    cfg = load_config(None, {"sources": [REPLAY], "model": {"device": "cpu", "workers": 2}})
    with pytest.raises(ConfigError, match="model.workers: 2 workers need an engine"):
        inference_plan(cfg, torch.device("cuda"), False, 2)


def test_a_cuda_run_has_one_worker_on_torchs_thread_count() -> None:
    cfg = load_config(None, {"sources": [REPLAY, *CAMERAS], "model": {"device": "auto"}})
    assert inference_plan(cfg, torch.device("cuda"), False, 16) == (1, None)


def test_a_replay_run_restores_the_callers_torch_thread_count(
    tmp_path: Path, weights: Path
) -> None:
    before = torch.get_num_threads()
    code = main(
        [
            "run",
            "--source",
            str(vtest_path()),
            "--weights",
            str(weights),
            "--max-seconds",
            "1",
            "--events",
            str(tmp_path / "events.jsonl"),
        ]
    )
    assert code == 0
    assert torch.get_num_threads() == before
