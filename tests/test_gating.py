"""Motion gating: the activity measure ignores noise and lighting drift, sees objects and global
changes; gated windows reach the tracker as background, in order, with a keep-alive."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from streamdet import demo
from streamdet.buffer import FrameMeta, RingBuffer, Window
from streamdet.cli import main
from streamdet.data.synthetic import iter_stream
from streamdet.events import EventTracker, TrackerSettings
from streamdet.gating import WARMUP_FRAMES, ActivityMeter, Gate, GateSettings, keepalive_phase
from streamdet.inference import InferenceThread, WindowResult
from streamdet.preprocess import DEFAULT_CONTRACT, preprocess_frame

DEMO = demo.config_path().parent
VTEST = Path(__file__).resolve().parent / ".assets" / "vtest.avi"
QUIET_FRAMES = 200


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A real still frame (the hall of vtest.avi), 320x240 BGR."""
    cap = cv2.VideoCapture(str(VTEST))
    ok, frame = cap.read()
    cap.release()
    assert ok
    return cv2.resize(frame, (320, 240), interpolation=cv2.INTER_AREA)


def activities(frames: list[np.ndarray]) -> np.ndarray:
    """Each frame's activity, after the meter's warm-up, through the model's preprocessing."""
    meter = ActivityMeter()
    values = [meter.update(preprocess_frame(f, DEFAULT_CONTRACT)) for f in frames]
    return np.array(values[WARMUP_FRAMES:])


def noisy(frame: np.ndarray, rng: np.random.Generator, sigma: float = 6.0) -> np.ndarray:
    return np.clip(frame + rng.normal(0, sigma, frame.shape), 0, 255).astype(np.uint8)


def jpeg(frame: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def quiet_stream(scene: np.ndarray, kind: str, n: int = QUIET_FRAMES) -> list[np.ndarray]:
    """A still scene with one nuisance the gate must not take for activity."""
    rng = np.random.default_rng(1)
    frames = []
    for i in range(n):
        f = noisy(scene, rng)
        if kind == "jpeg":  # blocking that moves with the noise, at a varying quality
            f = jpeg(f, 30 + 20 * (i % 3))
        elif kind == "flicker":  # mains flicker / auto exposure: +-4% brightness, frame to frame
            f = np.clip(f * (1.0 + 0.04 * (-1) ** i), 0, 255).astype(np.uint8)
        elif kind == "ramp":  # dusk: 25% darker over the stream
            f = np.clip(f * (1.0 - 0.25 * i / n), 0, 255).astype(np.uint8)
        frames.append(f)
    return frames


@pytest.mark.parametrize("kind", ["noise", "jpeg", "flicker", "ramp"])
def test_noise_compression_flicker_and_a_slow_ramp_do_not_open_the_gate(
    scene: np.ndarray, kind: str
) -> None:
    values = activities(quiet_stream(scene, kind))
    assert (values > 1.0).mean() < 0.01, f"{kind}: {np.sort(values)[-5:]}"


def test_h264_artefacts_do_not_open_the_gate(scene: np.ndarray, tmp_path: Path) -> None:
    """A still scene with sensor noise, through a low-bitrate H.264 file (I/P-frame pumping)."""
    path = tmp_path / "still.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"avc1"), 10.0, (320, 240))
    if not writer.isOpened():
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (320, 240))
    for f in quiet_stream(scene, "noise"):
        writer.write(f)
    writer.release()
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (ok_frame := cap.read())[0]:
        frames.append(ok_frame[1])
    cap.release()
    assert len(frames) >= QUIET_FRAMES - 2
    values = activities(frames)
    assert (values > 1.0).mean() < 0.01, np.sort(values)[-5:]


def crossing(scene: np.ndarray, size: tuple[int, int], start: int) -> list[np.ndarray]:
    """The quiet noisy scene, then a small dark object crossing it, 6 px per frame."""
    frames = quiet_stream(scene, "noise")
    rng = np.random.default_rng(2)
    for i in range(40):
        f = scene.copy()
        x = 20 + 6 * i
        cv2.rectangle(f, (x, start), (x + size[0], start + size[1]), (40, 50, 60), -1)
        frames.append(noisy(f, rng))
    return frames


def test_a_small_object_crossing_opens_the_gate(scene: np.ndarray) -> None:
    """A 12x24 px object in a 320x240 view (about 6x12 px of the model's 112x112)."""
    values = activities(crossing(scene, (12, 24), start=150))
    quiet, moving = values[: QUIET_FRAMES - WARMUP_FRAMES], values[-40:]
    assert (quiet > 1.0).mean() < 0.01
    assert (moving > 1.0).mean() > 0.8, moving


def test_a_small_object_crossing_under_flicker_opens_the_gate(scene: np.ndarray) -> None:
    """Flicker is taken out by the gain fit, so it does not raise the floor of the local
    measure above a small object."""
    frames = crossing(scene, (12, 24), start=150)
    frames = [
        np.clip(f * (1.0 + 0.04 * (-1) ** i), 0, 255).astype(np.uint8) for i, f in enumerate(frames)
    ]
    moving = activities(frames)[-40:]
    assert (moving > 1.0).mean() > 0.8, moving


def test_a_busy_scene_does_not_raise_the_floor_above_a_small_object(scene: np.ndarray) -> None:
    """The floor learns from quiet frames (and few active ones): after a stretch where a large
    object walks about half the time, a small object crossing still counts."""
    rng = np.random.default_rng(4)
    frames = quiet_stream(scene, "noise", 40)
    for i in range(320):
        f = scene.copy()
        if (i // 20) % 2 == 0:  # a large object pacing back and forth, every other 2 s
            x = 40 + 8 * (i % 20)
            cv2.rectangle(f, (x, 60), (x + 60, 200), (200, 200, 230), -1)
        frames.append(noisy(f, rng))
    frames += crossing(scene, (12, 24), start=150)[-40:]
    moving = activities(frames)[-40:]
    assert (moving > 1.0).mean() > 0.8, moving


@pytest.mark.parametrize("change", ["lights_off", "covered", "moved"])
def test_a_global_change_opens_the_gate(scene: np.ndarray, change: str) -> None:
    frames = quiet_stream(scene, "noise")
    rng = np.random.default_rng(3)
    if change == "lights_off":
        after = (scene * 0.3).astype(np.uint8)
    elif change == "covered":
        after = np.full_like(scene, 90)
    else:  # the camera turned: the view shifted by 40 px
        after = np.roll(scene, 40, axis=1)
    frames += [noisy(after, rng) for _ in range(4)]
    assert activities(frames)[-4] > 1.0


def window(source: str, t: float, activity: float) -> Window:
    """A window ending at frame (and seq) t, its new frames' activity ``activity`` (newest)."""
    newest_active = int(t) if activity > 1.0 else -1
    return Window(source, int(t), int(t) + 15, np.full(16, t), 0.0, int(t), activity, newest_active)


def test_the_gate_scores_active_windows_and_a_quiet_source_at_the_keepalive_rate() -> None:
    gate = Gate({"cam": GateSettings(keepalive_s=10.0)}, np.array([1.0, 0.0]))
    quiet = [gate.should_score(window("cam", t, 0.2)) for t in range(0, 40, 2)]
    # one every 10 s of frame time from the first window, the first of them keepalive_phase
    # ("cam") (0.672) of a period early: at 3.28 s, so at the window ending at 4
    assert keepalive_phase("cam") == pytest.approx(0.672)
    assert [t for t, s in zip(range(0, 40, 2), quiet, strict=True) if s] == [4, 14, 24, 34]
    assert gate.should_score(window("cam", 35, 1.5))  # active: scored at once
    assert gate.should_score(window("other", 35, 0.2))  # not gated at all
    assert (gate.scored["cam"], gate.gated["cam"]) == (5, 16)


def keepalive_decisions(
    scene: np.ndarray, keepalive_max_s: float
) -> tuple[list[tuple[int, bool]], list[float]]:
    """A real still scene at 10 fps through the meter, a ring (stride 8) and a gate (keep-alive
    10 s): 60 s still, then 40 s in which a dark object fades in (too slowly for the activity
    measure), then 20 s still again. Returns (last frame, scored) per window, and the
    windows' activities during the fade."""
    gate = Gate(
        {"cam": GateSettings(keepalive_s=10.0, keepalive_max_s=keepalive_max_s)}, np.ones(2)
    )
    ring = RingBuffer("cam", length=16, stride=8, capacity=64, lossless=True, meter=ActivityMeter())
    rng = np.random.default_rng(3)
    dark = scene.copy()
    dark[100:150, 140:190] = 30
    decisions, fading = [], []
    for i in range(1200):
        alpha = min(max((i - 600) / 400, 0.0), 1.0)
        frame = noisy(cv2.addWeighted(scene, 1 - alpha, dark, alpha, 0), rng)
        ring.write_frame(preprocess_frame(frame, DEFAULT_CONTRACT), FrameMeta(i, i / 10, 0.0))
        for w in iter(ring.take_window, None):
            decisions.append((w.last_frame, gate.should_score(w)))
            if 600 <= w.last_frame < 1000:
                fading.append(w.activity)
    return decisions, fading


def test_a_keepalive_scores_a_scene_that_drifted_and_not_one_that_stayed_the_same(
    scene: np.ndarray,
) -> None:
    """A keep-alive of an unchanged scene repeated what the model had said of it; one whose
    scene drifted, too slowly for the activity measure, is what the keep-alive is for."""
    decisions, fading = keepalive_decisions(scene, keepalive_max_s=1000.0)
    assert max(fading) < 1.0  # the fade never opened the gate: only keep-alives see it
    scored = [f for f, s in decisions if s]
    assert len([f for f in scored if f < 600]) == 1  # the first keep-alive; then unchanged
    assert len([f for f in scored if 600 <= f < 1100]) >= 3  # drifting: every 10 s or so
    assert not [f for f in scored if f >= 1100]  # the scene stands still again
    # keepalive_max_s = keepalive_s: every keep-alive is scored, changed or not
    every, _ = keepalive_decisions(scene, keepalive_max_s=10.0)
    assert len([f for f, s in every if s and f < 600]) >= 5


def test_cameras_started_together_spread_their_keepalive_windows() -> None:
    """Regression: quiet cameras started together scored their keep-alive windows in the same
    instant, every keepalive_s: a burst of one window per camera that skipped windows on a
    machine that held them all otherwise."""
    names = [f"cam{i}" for i in range(10)]
    gate = Gate({n: GateSettings(keepalive_s=30.0) for n in names}, np.array([1.0, 0.0]))
    ends = np.arange(0.0, 120.0, 0.8)  # a window every 0.8 s (stride 8 at 10 fps)
    times = {n: [t for t in ends if gate.should_score(window(n, t, 0.2))] for n in names}
    keepalives = {round(ts[0], 1) for ts in times.values()}
    assert len(keepalives) >= 8  # the first keep-alive of 10 cameras: (nearly) all apart
    for ts in times.values():  # and still one at least every keepalive_s from the start
        assert max(np.diff([0.0, *ts])) <= 30.0 + 0.8


def test_windows_are_scored_until_the_last_active_frame_is_hangover_frames_old() -> None:
    gate = Gate({"cam": GateSettings(keepalive_s=1000.0, hangover_frames=8)}, np.ones(2))
    ends = range(0, 40, 4)  # stride 4: windows ending at frames 0, 4, ..., 36
    activity = [0.1, 2.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    scored = [gate.should_score(window("cam", t, a)) for t, a in zip(ends, activity, strict=True)]
    # the active one ending at 4, then those ending at 8 and 12
    assert scored == [False, True, True, True, False, False, False, False, False, False]


class ScriptedMeter:
    """A frame meter whose activity of frame seq n is ``activity(n)``."""

    def __init__(self, activity: Callable[[int], float]) -> None:
        self.activity = activity
        self.seq = 0

    def update(self, frame: np.ndarray) -> float:
        self.seq += 1
        return self.activity(self.seq - 1)

    def reset(self) -> None:
        pass

    def scene(self) -> None:
        return None


def test_a_window_is_judged_by_the_frames_new_to_it_not_all_of_its_frames() -> None:
    """Regression: a window's activity was the largest of all its 16 frames, so every window
    that still held an active frame was scored (15 frames' worth of windows after each active
    stretch, most of the windows of an 80%-still stream). Only the frames the previous window
    taken did not hold count now; the gate's hangover covers the tail."""
    ring = RingBuffer(
        "cam",
        length=16,
        stride=4,
        capacity=200,
        lossless=True,
        meter=ScriptedMeter(lambda n: 2.0 if 40 <= n < 48 else 0.1),
    )
    for i in range(80):
        ring.write_frame(np.zeros((3, 112, 112), np.float32), FrameMeta(i, i / 10, 0.0))
    windows = list(iter(ring.take_window, None))
    assert [w.seq for w in windows] == list(range(15, 80, 4))
    active = {w.seq: w.newest_active for w in windows if w.activity > 1.0}
    assert active == {43: 43, 47: 47}  # the windows whose 4 new frames hold frames 40-47
    assert windows[0].activity == 0.1  # the first window: all 16 frames are new


def test_a_meters_warm_up_neither_has_its_window_scored_nor_starts_a_hangover() -> None:
    """Regression: the warm-up's unmeasured frames counted as active, so every source's first
    two windows were scored, then its first: cameras started together made a burst as long as
    their count at every start (windows skipped on a machine that held them in steady state).
    The window after the warm-up is measured."""
    gate = Gate({"cam": GateSettings(keepalive_s=1000.0)}, np.ones(2))
    meter = ScriptedMeter(lambda n: math.inf if n < 16 else 0.1)
    ring = RingBuffer("cam", length=16, stride=8, capacity=100, lossless=True, meter=meter)
    for i in range(48):
        ring.write_frame(np.zeros((3, 112, 112), np.float32), FrameMeta(i, i / 10, 0.0))
    decisions = [gate.should_score(w) for w in iter(ring.take_window, None)]
    assert decisions == [False, False, False, False, False]


def test_a_still_camera_stream_has_the_same_events_and_a_quiet_empty_scene() -> None:
    """The generator's ``still_camera`` option (the gating benchmark's fixed camera): the same
    events at the same frames, and its empty scene does not open the gate, where the default
    stream's swaying objects and jitter do."""

    def stream(still: bool) -> tuple[list[tuple[str, int, int]], float]:
        meter, quiet = ActivityMeter(), []
        frames = list(iter_stream(7001, duration_s=30, gap_frames=(50, 80), still_camera=still))
        events = [(e.label, e.start_frame, e.end_frame) for _, e in frames if e is not None]
        for i, (frame, _) in enumerate(frames):
            activity = meter.update(preprocess_frame(frame, DEFAULT_CONTRACT))
            near_event = any(start - 4 <= i <= end + 8 for _, start, end in events)
            if i >= WARMUP_FRAMES and not near_event:
                quiet.append(activity)
        return events, float(np.mean(np.array(quiet) > 1.0))

    swaying, still = stream(False), stream(True)
    assert still[0] == swaying[0] and len(still[0]) >= 3
    assert still[1] <= 0.02 < 0.1 <= swaying[1]


def test_gated_windows_end_an_open_event_as_background_windows_would() -> None:
    """A gated window is scored as pure background: the event opened by scored windows ends
    after the same windows as when the model itself had said background."""
    settings = TrackerSettings(class_names=("none", "fall"), smoothing=2, background="none")
    fall, background = np.array([0.05, 0.95]), np.array([1.0, 0.0])

    def lines(probs_after: np.ndarray) -> list[tuple[str, int]]:
        tracker = EventTracker(settings)
        out = []
        for k in range(8):
            probs = fall if k < 3 else probs_after
            for c in tracker.update("cam", 8 * k, 8 * k + 15, k, k + 1.5, probs):
                out.append((c.type, k))
        return out

    gate = Gate({"cam": GateSettings()}, background)
    assert lines(gate.background_probs) == lines(background)
    assert ("end", 4) in lines(gate.background_probs)


def write_frames(ring: RingBuffer, count: int, active: bool, start: int) -> None:
    """Frames of fresh noise (active), or of a still scene with faint noise."""
    rng = np.random.default_rng(start)
    still = np.random.default_rng(0).normal(0, 1, (3, 112, 112)).astype(np.float32)
    for i in range(start, start + count):
        noise = rng.normal(0, 1 if active else 0.01, (3, 112, 112)).astype(np.float32)
        frame = noise if active else still + noise
        assert ring.write_frame(frame, FrameMeta(i, i / 10, time.monotonic()), timeout=30)


QUIET = ((0, 40), (80, 240))  # frame ranges of the still scene; active noise elsewhere


@pytest.mark.timeout(120)
def test_the_scheduler_hands_on_gated_windows_in_order_without_a_forward_pass() -> None:
    """Still stretches between active ones: their windows come back gated (background probs,
    no engine call), every window in the order it was taken."""
    ring = RingBuffer("cam", length=16, stride=8, capacity=400, meter=ActivityMeter())
    gate = Gate({"cam": GateSettings(keepalive_s=1000.0)}, np.array([1.0, 0.0], np.float32))
    calls: list[int] = []
    results: list[WindowResult] = []
    done = threading.Event()

    def engine(clips: torch.Tensor) -> torch.Tensor:
        calls.append(len(clips))
        return torch.tensor([[0.0, 5.0]] * len(clips))

    stop = threading.Event()
    thread = InferenceThread(
        [ring],
        engine,
        results.extend,
        stop,
        max_batch=4,
        gate=gate,
        on_source_done=lambda source: done.set(),
    )
    write_frames(ring, 40, False, 0)
    write_frames(ring, 40, True, 40)
    write_frames(ring, 160, False, 80)
    write_frames(ring, 40, True, 240)
    ring.close()
    thread.start()
    try:
        assert done.wait(60)
    finally:
        stop.set()
        thread.join(10)
    firsts = [r.window.first_frame for r in results]
    assert firsts == sorted(firsts) and len(firsts) == (280 - 16) // 8 + 1
    gated = [r for r in results if r.gated]
    assert len(gated) >= 15  # the windows wholly inside the long still stretch, at least
    for r in gated:
        w = r.window
        assert any(a <= w.first_frame and w.last_frame < b for a, b in QUIET), (w.first_frame,)
    assert all(np.array_equal(r.probs, [1.0, 0.0]) and r.batch_size == 0 for r in gated)
    assert sum(calls) == len(results) - len(gated)  # no forward pass for a gated window
    assert gate.gated["cam"] == len(gated)


def mostly_still_demo_clip(dst: Path, still: int = 150) -> Path:
    """The demo video's first 60 frames (an ``enter``, truth frames 24-45), between ``still``
    frames of its first and last frame held, with fresh sensor noise each: a quiet camera."""
    cap = cv2.VideoCapture(str(DEMO / "demo.mp4"))
    clip = [cap.read()[1] for _ in range(60)]
    cap.release()
    rng = np.random.default_rng(5)
    frames = [noisy(clip[0], rng, 3.0) for _ in range(still)]
    frames += clip + [noisy(clip[-1], rng, 3.0) for _ in range(still)]
    h, w = clip[0].shape[:2]
    writer = cv2.VideoWriter(str(dst), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()
    return dst


@pytest.mark.timeout(300)
def test_streamdet_run_gates_a_mostly_still_video_and_still_finds_its_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's model and settings, gating on, a still camera with one person entering: most
    windows are gated, the summary and progress lines count them, the event is found and ends."""
    video = mostly_still_demo_clip(tmp_path / "still.avi")
    config = yaml.safe_load((DEMO / "demo.yaml").read_text())
    config["sources"] = [{"name": "hall", "url": str(video)}]
    config["model"]["weights"] = str(DEMO / "c3d_bn_demo.safetensors")
    config["window"]["gating"] = {"enabled": True}
    config["sinks"] = {"events": {"path": str(tmp_path / "events.jsonl")}}
    config["progress_interval_s"] = 0.05  # a line every pass of the run loop
    del config["truth"]
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["run", str(path)]) == 0

    out = capsys.readouterr().out
    run = re.search(r"\[summary\] run \w+: [0-9.]+ s, (\d+) windows scored, (\d+) gated", out)
    assert run, out
    scored, gated = int(run.group(1)), int(run.group(2))
    assert scored + gated == (360 - 16) // 4 + 1
    assert gated >= 40, out  # of 87 windows, ~70 lie wholly in the still stretches
    assert (
        f"hall: 360 frames read, 360 used, 0 skipped, {scored} windows scored, {gated} gated" in out
    )
    assert re.search(r"\[progress\] hall: .*, \d+ windows gated", out)
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    events = [line for line in lines if line["type"] in ("new", "end")]
    assert [(e["type"], e["label"]) for e in events] == [("new", "enter"), ("end", "enter")]
    assert events[1]["end_reason"] != "stream_ended"  # ended by the still windows after it


def test_a_source_gating_replaces_the_window_one_and_gating_needs_a_background() -> None:
    from streamdet.config import load_config
    from streamdet.errors import ConfigError
    from streamdet.pipeline import build_gate

    cfg = load_config(
        None,
        {
            "sources": [
                {"name": "a", "url": "a.mp4"},
                {"name": "b", "url": "b.mp4", "gating": {"enabled": False}},
            ],
            "window": {"gating": {"enabled": True, "keepalive_s": 45, "hangover_frames": 12}},
        },
    )
    gate = build_gate(cfg, ("none", "fall"))
    assert gate is not None and set(gate.settings) == {"a"}
    assert (gate.settings["a"].keepalive_s, gate.settings["a"].hangover_frames) == (45.0, 12)
    assert list(gate.background_probs) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="events.background is null"):
        load_config(
            None,
            {
                "sources": [{"name": "a", "url": "a.mp4"}],
                "window": {"gating": {"enabled": True}},
                "events": {"background": None},
            },
        )
    with pytest.raises(ConfigError, match="not one of"):
        build_gate(cfg, ("class_0", "class_1"))
