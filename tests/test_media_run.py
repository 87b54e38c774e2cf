"""Event media end to end: ``streamdet run`` on the real RTSP test camera (the PyAV capture
backend keeps each camera's packets), with the tiny model that fires on the camera's negated
frames, or with threshold 0 (an event from the first window until the stream or the run ends).

The camera burns each frame's number into its picture; the capture numbers frames from its own
first one, so a test finds the offset between the two from the snapshot (whose line names the
capture's frame and whose picture shows the camera's number).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import pytest
import yaml
from conftest import RtspServer
from media_helpers import (
    EVENT_FRAMES,
    FPS,
    GOP,
    inspect_clip,
    jpeg_counter,
)

REPO = Path(__file__).resolve().parent.parent


def write_config(
    folder: Path, url: str, weights: Path, *, threshold: float = 0.6, **media: Any
) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "cam",
                        "url": url,
                        "options": {
                            "read_timeout_s": 2.0,
                            "backoff_initial_s": 30.0,
                            "backoff_max_s": 30.0,
                        },
                    }
                ],
                "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
                "events": {
                    "threshold": threshold,
                    "exit_threshold": min(threshold, 0.4),
                    "smoothing": 1,
                    "open_windows": 1,
                },
                "media": {
                    "dir": str(folder / "media"),
                    "clips": {"pre_capture_s": 2.0, "post_capture_s": 1.0},
                    **media,
                },
                "progress_interval_s": 1.0,
            }
        )
    )
    return path


def command(cfg: Path, events: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamdet", "run", str(cfg), "--events", str(events), *extra]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_line(events: Path, kind: str, proc: subprocess.Popen[Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [o for o in read_log(events) if o["type"] == kind]
        if found:
            return found[0]
        assert proc.poll() is None, f"streamdet ended (rc {proc.returncode}) with no {kind} line"
        time.sleep(0.1)
    raise AssertionError(f"no {kind} line in {timeout} s: {read_log(events)}")


def camera_profile(url: str) -> str:
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=(10.0, 5.0)) as container:
        return container.streams.video[0].codec_context.profile or ""


@pytest.mark.timeout(180)
def test_streamdet_run_writes_a_live_cameras_clip_and_snapshot_for_its_event(
    camera: RtspServer, tmp_path: Path, event_weights: Path
) -> None:
    cfg = write_config(tmp_path, camera.url, event_weights)
    events = tmp_path / "events.jsonl"
    # The camera's first event is its frames 90-129 (9-13 s in); its clip is ready ~2 s later.
    done = subprocess.run(
        command(cfg, events, "--max-seconds", "24"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = read_log(events)
    ends = [o for o in lines if o["type"] == "end"]
    clips = {o["id"]: o for o in lines if o["type"] == "clip"}
    snaps = {o["id"]: o for o in lines if o["type"] == "snapshot"}
    assert ends and ends[0]["end_reason"] == "score_drop", (lines, done.stderr[-3000:])
    end = ends[0]
    clip, snap = clips[end["id"]], snaps[end["id"]]

    # The snapshot, named by the end line, shows the camera's number of the frame it names.
    assert end["snapshot"] == snap["path"]
    offset = jpeg_counter(Path(snap["path"])) - snap["frame"]
    start, stop = end["start_frame"] + offset, end["end_frame"] + offset
    assert abs(start - EVENT_FRAMES[0]) <= 8 and abs(stop - EVENT_FRAMES[1]) <= 8, (start, stop)
    assert start <= snap["frame"] + offset <= stop

    # The clip: the keyframe at or before start - 2 s, through end + 1 s, the camera's encoding.
    info = inspect_clip(Path(clip["path"]))
    first, last = info.counters[0], info.counters[-1]
    assert first % GOP == 0 and start - 2 * FPS - GOP - 2 < first <= start - 2 * FPS + 1, first
    assert stop + 1 * FPS - 2 <= last <= stop + 1 * FPS + 3, (last, stop)
    assert info.counters == list(range(first, last + 1))
    assert info.probe_frames == clip["frames"] == len(info.counters)
    assert info.probe_duration_s == pytest.approx(len(info.counters) / FPS, abs=0.15)
    assert info.decode_errors == ""
    assert (info.codec, info.width, info.height) == ("h264", 320, 240)
    assert info.profile == camera_profile(camera.url)
    assert clip["pre_capture_s"] >= 2.0 and clip["post_capture_s"] >= 1.0 - 0.05


@pytest.mark.timeout(180)
def test_streamdet_run_ends_a_clip_where_the_stream_ended_when_the_camera_is_lost(
    camera: RtspServer, tmp_path: Path, event_weights: Path
) -> None:
    """Threshold 0: an event opens at the first window, with the pre-roll the camera had."""
    cfg = write_config(tmp_path, camera.url, event_weights, threshold=0.0)
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        command(cfg, events), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for_line(events, "new", proc, timeout=90)
        time.sleep(3.0)  # some seconds of event
        camera.kill()
        clip = wait_for_line(events, "clip", proc, timeout=60)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    lines = read_log(events)
    (end,) = [o for o in lines if o["type"] == "end"]
    assert end["end_reason"] == "stream_lost"
    info = inspect_clip(Path(clip["path"]))
    assert info.counters == list(range(info.counters[0], info.counters[-1] + 1))
    assert info.counters[0] == 0 and info.decode_errors == ""
    assert clip["pre_capture_s"] < 2.0  # the camera had just come online
    # It ends where the stream ended: after the event's end (its latest window's, up to a window
    # before the last frame read) and before the capture reported the outage.
    (offline,) = [o for o in lines if o["type"] == "status" and o["status"] == "offline"]
    assert end["end_time"] <= clip["end_time"] <= offline["time"]
    assert 0.0 <= clip["post_capture_s"] < 16 / FPS
    # ...and is finished at once, not after waiting for post-roll that cannot come.
    lost_at = dt.datetime.fromisoformat(offline["time"].replace("Z", "+00:00")).timestamp()
    assert Path(clip["path"]).stat().st_mtime - lost_at < 5.0


@pytest.mark.timeout(180)
def test_sigkill_of_streamdet_run_while_a_clip_is_written_leaves_no_partial_clip(
    camera: RtspServer, tmp_path: Path, event_weights: Path
) -> None:
    cfg = write_config(tmp_path, camera.url, event_weights, threshold=0.0)
    events = tmp_path / "events.jsonl"
    media = tmp_path / "media"
    proc = subprocess.Popen(
        command(cfg, events), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_line(events, "new", proc, timeout=90)
        deadline = time.monotonic() + 30
        while not list(media.rglob(".*.mp4.part")):
            assert time.monotonic() < deadline, "no clip being written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    partial = list(media.rglob(".*.mp4.part"))
    assert partial and not list(media.rglob("*.mp4"))  # hidden, never a clip that looks whole
    done = subprocess.run(
        command(cfg, tmp_path / "events2.jsonl", "--max-seconds", "3"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(p.exists() for p in partial)  # the next run cleared it
