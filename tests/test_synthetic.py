"""Synthetic event generator: determinism, class signals, streams and their truth."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from streamdet.data import synthetic
from streamdet.data.synthetic import CLASSES, make_clip, make_stream


def test_clip_is_a_pure_function_of_seed_and_index():
    a, la = make_clip(seed=3, index=5)
    b, lb = make_clip(seed=3, index=5)
    c, _ = make_clip(seed=3, index=6)
    assert la == lb and np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_clip_has_sixteen_bgr_frames_of_the_canvas():
    clip, label = make_clip(seed=0, index=0, label="run")
    assert clip.shape == (16, synthetic.HEIGHT, synthetic.WIDTH, 3)
    assert clip.dtype == np.uint8
    assert CLASSES[label] == "run"


@pytest.mark.parametrize("label", ["light_on", "light_off"])
def test_light_events_change_brightness_in_their_direction(label):
    for index in range(4):
        clip, _ = make_clip(seed=1, index=index, label=label, difficulty=0.5)
        first, last = clip[0].mean(), clip[-1].mean()
        if label == "light_on":
            assert last > 1.5 * first
        else:
            assert first > 1.5 * last


def test_motion_classes_move_more_than_background():
    def motion(label):
        values = []
        for index in range(6):
            clip, _ = make_clip(seed=2, index=index, label=label, difficulty=0.0)
            # the strongest change between two consecutive frames
            values.append(np.abs(np.diff(clip.astype(np.int16), axis=0)).mean(axis=(1, 2, 3)).max())
        return float(np.mean(values))

    still = motion("none")
    for label in ("enter", "exit", "run", "fall", "camera_tamper"):
        assert motion(label) > 2 * still, label


def test_unknown_label_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="label must be one of"):
        make_clip(seed=0, index=0, label="explode")


def test_make_stream_writes_video_and_truth_that_agree(tmp_path):
    video, truth = tmp_path / "s.mp4", tmp_path / "s.json"
    doc = make_stream(video, truth, seed=4, duration_s=20)
    assert json.loads(truth.read_text()) == doc
    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == doc["frame_count"] == 200
    events = doc["events"]
    assert events, "a 20 s stream has events"
    previous_end = -1
    for ev in events:
        assert ev["label"] in CLASSES and ev["label"] != "none"
        assert previous_end < ev["start_frame"] <= ev["end_frame"] < n
        assert ev["end_time"] == pytest.approx((ev["end_frame"] + 1) / doc["fps"])
        previous_end = ev["end_frame"]


def test_stream_truth_is_the_same_for_the_same_seed(tmp_path):
    a = make_stream(tmp_path / "a.mp4", tmp_path / "a.json", seed=9, duration_s=12)
    b = make_stream(tmp_path / "b.mp4", tmp_path / "b.json", seed=9, duration_s=12)
    c = make_stream(tmp_path / "c.mp4", tmp_path / "c.json", seed=10, duration_s=12)
    assert a["events"] == b["events"]
    assert a["events"] != c["events"]


def test_stream_scenes_change_only_behind_a_camera_tamper(monkeypatch):
    produced = []  # frames yielded so far, at each new_scene call
    real_new_scene = synthetic.new_scene

    def recording_new_scene(*args, **kwargs):
        produced.append(len(frames))
        return real_new_scene(*args, **kwargs)

    monkeypatch.setattr(synthetic, "new_scene", recording_new_scene)
    frames, truth = [], []
    for frame, event in synthetic.iter_stream(5, duration_s=40.0, new_scene_every=2):
        frames.append(frame)
        if event is not None:
            truth.append(event)
    changes = produced[1:]  # the first call makes the opening scene
    assert len(changes) >= 2
    tampers = [(e.start_frame, e.end_frame) for e in truth if e.label == "camera_tamper"]
    for at in changes:
        assert any(start < at <= end for start, end in tampers), (at, tampers)


def events_of(seed: int, **kwargs) -> list[synthetic.TruthEvent]:
    stream = synthetic.iter_stream(seed, duration_s=60.0, **kwargs)
    return [event for _, event in stream if event is not None]


def test_a_bursty_stream_has_its_events_back_to_back_and_its_quiet_gaps_between_bursts():
    """bench_gating's 80%-quiet synthetic twin of the real-footage stream: activity now and then."""
    gaps = (120, 150)
    events = events_of(3, gap_frames=gaps, burst=3, burst_gap_frames=(0, 2))
    assert len(events) >= 6
    for i in range(1, len(events)):
        gap = events[i].start_frame - events[i - 1].end_frame - 1
        if i % 3:
            assert 0 <= gap <= 2, (i, gap)
        else:
            assert gaps[0] <= gap <= gaps[1], (i, gap)
    assert events[0].start_frame >= gaps[0]


def test_without_bursts_every_event_has_a_quiet_gap_before_it():
    gaps = (22, 45)
    events = events_of(4, gap_frames=gaps, burst_gap_frames=(0, 2))
    starts = [e.start_frame for e in events]
    ends = [-1] + [e.end_frame for e in events[:-1]]
    assert len(events) >= 10
    assert all(gaps[0] <= s - e - 1 <= gaps[1] for s, e in zip(starts, ends, strict=True))
    with pytest.raises(ValueError, match="burst must be >= 1"):
        events_of(4, burst=0)
