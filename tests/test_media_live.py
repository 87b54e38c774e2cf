"""A live camera's event media, from the real RTSP test camera (H.264, a keyframe every
``GOP`` frames, each frame's number burnt into its picture) through a real PacketRing that PyAV
fills in the test, as the capture backend does, into the media output.

Each frame's number is read back from the clip's decoded pictures, so "the clip starts at the
keyframe at or before start - pre_capture_s" is checked against what the camera sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RtspServer
from media_helpers import (
    FPS,
    GOP,
    FedPacket,
    MediaLines,
    RtspFeeder,
    event_change,
    inspect_clip,
    jpeg_counter,
    source_sps_and_idr,
)

from streamdet.config import MediaConfig
from streamdet.media.sink import MediaSink, MediaSource
from streamdet.sinks.base import (
    EventMessage,
    FrameMessage,
    ScoresMessage,
    SinkWorker,
    StatusMessage,
)
from streamdet.sources.packets import PacketRing

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class Rig:
    """A media output fed by the test camera, with the lines it recorded."""

    def __init__(
        self,
        url: str,
        folder: Path,
        media: dict[str, Any],
        *,
        ring_s: float = 30.0,
        retention_interval_s: float = 0.1,
    ) -> None:
        self.cfg = MediaConfig.model_validate({"dir": str(folder), **media})
        self.ring = PacketRing(max_seconds=ring_s, max_bytes=64 * 1024 * 1024)
        self.lines = MediaLines()
        self.stop = threading.Event()
        self.sink = MediaSink(
            self.cfg,
            sources={"cam": MediaSource("cam", ring=self.ring)},
            record_media=self.lines,
            stop_event=self.stop,
            retention_interval_s=retention_interval_s,
        )
        self.worker = SinkWorker(self.sink)
        self.worker.start()
        self.feeder = RtspFeeder(url, self.ring, on_frame=self._frame).start()

    def _frame(self, counter: int, picture: Any) -> None:
        self.worker.offer_frame(FrameMessage("cam", counter, picture, float(FPS)))

    def event(self, kind: str, start: FedPacket, end: FedPacket, **kw: Any) -> Any:
        change = event_change(kind, start, end, **kw)
        self.worker.offer_event(EventMessage(change, None, None))
        return change

    def close(self) -> None:
        self.feeder.stop.set()
        self.stop.set()
        assert self.worker.close(timeout=30.0)


@pytest.fixture
def rig(camera: RtspServer, tmp_path: Path) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(media: dict[str, Any], **kw: Any) -> Rig:
        rigs.append(Rig(camera.url, tmp_path / "media", media, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def last_keyframe_at_or_before(feeder: RtspFeeder, t: float) -> int:
    return max(p.counter for p in feeder.packets if p.keyframe and p.time <= t)


def first_at_or_after(feeder: RtspFeeder, t: float) -> int:
    return min(p.counter for p in feeder.packets if p.time >= t)


@pytest.mark.timeout(120)
def test_a_live_clip_covers_pre_and_post_roll_from_a_keyframe_and_is_the_cameras_own_encoding(
    rig: Any,
) -> None:
    r = rig({"clips": {"pre_capture_s": 2.0, "post_capture_s": 1.0}})
    start = r.feeder.wait_for(45)
    r.event("new", start, start)
    end = r.feeder.wait_for(70)
    change = r.event("end", start, end, end_reason="score_drop")
    r.feeder.wait_for(90)
    (line,) = r.lines.wait("clip")

    first = last_keyframe_at_or_before(r.feeder, change.start_time - 2.0)
    last = first_at_or_after(r.feeder, change.end_time + 1.0)
    clip = inspect_clip(Path(line["path"]))
    assert clip.counters == list(range(first, last + 1))
    assert first % GOP == 0 and first <= 25
    assert clip.probe_frames == line["frames"] == len(clip.counters)
    assert clip.probe_duration_s == pytest.approx(len(clip.counters) / FPS, abs=0.15)
    assert clip.decode_errors == ""
    # Not re-encoded: the camera's profile, size, parameter sets and keyframe bytes.
    sps, idr = source_sps_and_idr(r.feeder.info, r.feeder.by_counter()[first].data)
    assert (clip.codec, clip.profile, clip.width, clip.height) == (
        "h264",
        r.feeder.profile,
        320,
        240,
    )
    assert clip.sps == sps and clip.first_idr == idr
    assert line["pre_capture_s"] >= 2.0 and line["post_capture_s"] >= 1.0
    assert line["id"] == change.id and line["source"] == "cam" and not line["capped"]
    assert Path(line["path"]) == Path(r.cfg.dir) / "cam" / f"{change.id}.mp4"


@pytest.mark.timeout(120)
def test_a_clip_whose_pre_roll_was_not_there_says_how_much_it_got(rig: Any) -> None:
    """The camera just came online: the ring holds half a second before the event."""
    r = rig({"clips": {"pre_capture_s": 2.0, "post_capture_s": 0.5}})
    start = r.feeder.wait_for(5)
    r.event("new", start, start)
    end = r.feeder.wait_for(20)
    r.event("end", start, end, end_reason="score_drop")
    (line,) = r.lines.wait("clip")
    clip = inspect_clip(Path(line["path"]))
    assert clip.counters[0] == 0
    got = start.time - r.feeder.by_counter()[0].time
    assert line["pre_capture_s"] == pytest.approx(got, abs=0.01)
    assert line["pre_capture_s"] < 1.0


@pytest.mark.timeout(120)
def test_a_clip_longer_than_the_ring_keeps_is_written_as_its_packets_come(rig: Any) -> None:
    r = rig({"clips": {"pre_capture_s": 0.5, "post_capture_s": 0.5}}, ring_s=1.0)
    start = r.feeder.wait_for(15)
    r.event("new", start, start)
    end = r.feeder.wait_for(60)  # 4.5 s: more than four times what the ring keeps
    change = r.event("end", start, end, end_reason="score_drop")
    (line,) = r.lines.wait("clip")
    clip = inspect_clip(Path(line["path"]))
    first = last_keyframe_at_or_before(r.feeder, change.start_time - 0.5)
    assert clip.counters == list(range(first, first_at_or_after(r.feeder, end.time + 0.5) + 1))
    assert "lost_packets" not in line


@pytest.mark.timeout(120)
def test_a_clip_stops_at_max_clip_s_while_its_event_goes_on(rig: Any) -> None:
    r = rig({"clips": {"pre_capture_s": 0.0, "post_capture_s": 0.0, "max_clip_s": 2.0}})
    start = r.feeder.wait_for(20)
    r.event("new", start, start)
    (line,) = r.lines.wait("clip")  # before any end: the event is still open
    clip = inspect_clip(Path(line["path"]))
    assert line["capped"] and clip.counters[0] == 20
    assert clip.counters == list(range(20, 20 + len(clip.counters)))
    assert len(clip.counters) <= 2.0 * FPS + 1 and line["duration_s"] <= 2.0 + 1 / FPS


@pytest.mark.timeout(120)
def test_the_camera_lost_during_an_event_ends_its_clip_where_the_stream_ended(
    rig: Any, camera: RtspServer
) -> None:
    r = rig({"clips": {"pre_capture_s": 1.0, "post_capture_s": 5.0}})
    start = r.feeder.wait_for(25)
    r.event("new", start, start)
    r.feeder.wait_for(50)
    camera.kill()
    assert r.feeder.ended.wait(30)
    last = r.feeder.packets[-1]
    # What the capture reports, then the router: the source offline, its events stream_lost.
    r.worker.offer_status(StatusMessage("cam", "offline", "read failed", time.time()))
    r.event("end", start, last, end_reason="stream_lost")
    (line,) = r.lines.wait("clip", timeout=8.0)  # not after post_capture_s and a grace
    clip = inspect_clip(Path(line["path"]))
    first = last_keyframe_at_or_before(r.feeder, start.time - 1.0)
    assert clip.counters == list(range(first, last.counter + 1))
    assert clip.decode_errors == ""
    assert line["post_capture_s"] == pytest.approx(0.0, abs=0.01)


@pytest.mark.timeout(120)
def test_the_snapshot_is_the_best_windows_central_frame_and_exists_before_the_end_line(
    rig: Any,
) -> None:
    r = rig({"clips": {"enabled": False}, "snapshots": {"enabled": True}})
    start = r.feeder.wait_for(40)
    change = r.event("new", start, start, score=0.7)
    path = Path(r.sink.event_line_fields(event_change("end", start, start))["snapshot"])
    for first, score in ((40, 0.7), (48, 0.95), (56, 0.8)):
        r.feeder.wait_for(first + 15)
        r.worker.offer_scores(
            ScoresMessage("cam", first, first + 15, None, 1.0, 1.0, (("event", score),))
        )
    deadline = time.monotonic() + 30
    while not path.exists():  # written soon after `new`: the end line's path names a file
        assert time.monotonic() < deadline, "no snapshot before the end"
        time.sleep(0.05)
    end = r.feeder.wait_for(71)
    r.event("end", start, end, end_reason="score_drop")
    (line,) = r.lines.wait("snapshot")
    assert line["path"] == str(path) and line["id"] == change.id
    assert line["frame"] == 55 == jpeg_counter(path)  # the centre of window 48-63
    assert line["score"] == 0.95


@pytest.mark.timeout(120)
@pytest.mark.parametrize("retain", [{"days": 1e-6}, {"days": None, "max_gb": 1e-7}])
def test_retention_deletes_old_media_but_never_a_clip_being_written_or_an_open_snapshot(
    rig: Any, tmp_path: Path, retain: dict[str, Any]
) -> None:
    """Sweeps every 0.1 s delete anything finished (older than 0.09 s, or past 100 bytes) while
    a clip is written: its temp file and the open event's snapshot must survive them."""
    planted = tmp_path / "media" / "cam" / "old.mp4"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"x" * 1000)
    os.utime(planted, (0, 0))
    r = rig({"clips": {"pre_capture_s": 1.0, "post_capture_s": 0.5}, "retain": retain})
    start = r.feeder.wait_for(20)
    change = r.event("new", start, start)
    snapshot = Path(r.sink.event_line_fields(event_change("end", start, start))["snapshot"])
    end = r.feeder.wait_for(50)
    assert not planted.exists()
    assert snapshot.exists()  # the open event's snapshot is kept
    r.event("end", start, end, end_reason="score_drop")
    (line,) = r.lines.wait("clip")  # finishing renames the temp file: it was never deleted
    assert line["id"] == change.id and line["frames"] >= 30
    r.lines.wait("snapshot")


@pytest.mark.timeout(120)
def test_retention_keeps_the_folder_under_max_gb_clip_by_clip_not_once_a_minute(
    rig: Any,
) -> None:
    """Regression: with the minute between sweeps, 4 cameras' clips took the soak's folder to
    22 MB over a 5 MB max_gb. Each finished clip now wakes the sweep."""
    r = rig(
        {"clips": {"pre_capture_s": 0.5, "post_capture_s": 0.5}, "retain": {"max_gb": 1e-7}},
        retention_interval_s=60.0,
    )
    start = r.feeder.wait_for(15)
    r.event("new", start, start)
    end = r.feeder.wait_for(30)
    r.event("end", start, end, end_reason="score_drop")
    (line,) = r.lines.wait("clip")
    deadline = time.monotonic() + 10.0
    while Path(line["path"]).exists():  # over the 100 bytes allowed: deleted, within seconds
        assert time.monotonic() < deadline, "the sweep waited for its minute"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_sigkill_while_a_clip_is_being_written_leaves_no_visible_partial_file(
    camera: RtspServer, tmp_path: Path
) -> None:
    folder = tmp_path / "media"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "media_helpers.py"), camera.url, str(folder)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITING "), line
        temp = Path(line.split(" ", 1)[1].strip())
        size = temp.stat().st_size
        deadline = time.monotonic() + 30
        while temp.stat().st_size == size:  # still growing: packets are written as they come
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    visible = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert visible == [] and temp.exists()
    # The next run's media output clears what the crash left, at its first message.
    stop = threading.Event()
    cfg = MediaConfig.model_validate({"dir": str(folder)})
    sink = MediaSink(cfg, sources={}, record_media=MediaLines(), stop_event=stop)
    worker = SinkWorker(sink)
    worker.start()
    worker.offer_status(StatusMessage("cam", "online", "opened", time.time()))
    stop.set()
    assert worker.close(timeout=30.0)
    assert not temp.exists()


def test_snapshots_want_the_models_frames_only(tmp_path: Path) -> None:
    """A snapshot is of the model's frame nearest its best window's centre: the frames the
    model skips (two in three at 30 fps) are not converted for it."""
    cfg = MediaConfig.model_validate({"dir": str(tmp_path / "media")})
    sink = MediaSink(cfg, sources={}, record_media=MediaLines(), stop_event=threading.Event())
    assert sink.wants_frame("cam", used=True) and not sink.wants_frame("cam", used=False)
