"""Event media: reading the packet ring as a clip goes on, retention, bad media config, and a
replayed file's clip and snapshot end to end (``streamdet run``).

Live cameras' clips are in ``test_media_live.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from assets import vtest_path
from media_helpers import (
    EVENT_FRAMES,
    FPS,
    GOP,
    inspect_clip,
    jpeg_counter,
)

from streamdet.media.clips import temp_path
from streamdet.media.retention import sweep
from streamdet.sources.packets import EncodedPacket, PacketRing, StreamInfo

REPO = Path(__file__).resolve().parent.parent
INFO = StreamInfo("h264", 64, 48, Fraction(1, 90000), Fraction(30), b"\x01")
RATE = 30


def feed(ring: PacketRing, frames: range, *, gop: int = 30) -> None:
    for i in frames:
        ring.append(EncodedPacket(b"x" * 100, i * 3000, i * 3000, 3000, i % gop == 0, i / RATE, i))


# -- the packet ring, read as a clip goes on ---------------------------------------------------


def test_a_follower_takes_packets_as_they_come_for_longer_than_the_ring_keeps() -> None:
    ring = PacketRing(max_seconds=1.0, max_bytes=10_000_000)
    ring.start_segment(INFO)
    feed(ring, range(0, 60))  # 2 s: the ring keeps about the last second
    follower = ring.follow(start_time=1.5)
    assert follower is not None
    taken = []
    for step in range(60, 300, 20):  # 8 s more, taken as it comes
        got = follower.take(until=9.0)
        taken += [p.frame_index for p in got.packets]
        assert got.lost == 0 and not got.ended
        feed(ring, range(step, step + 20))
    got = follower.take(until=9.0, through=True)
    taken += [p.frame_index for p in got.packets]
    assert got.reached
    assert taken == list(range(30, 271))  # from the keyframe at 1.0 s through the frame at 9.0 s


def test_a_follower_that_fell_behind_reports_the_loss_and_resumes_at_a_keyframe() -> None:
    """The writer must never join packets across a hole: after one it waits for a keyframe."""
    ring = PacketRing(max_seconds=60.0, max_bytes=100 * 45)  # 45 packets, whatever keyframes
    ring.start_segment(INFO)
    feed(ring, range(0, 30))
    follower = ring.follow(start_time=0.0)
    assert follower is not None
    assert [p.frame_index for p in follower.take(until=100.0).packets] == list(range(30))
    feed(ring, range(30, 200))  # the follower took nothing: the ring kept 155-199 only
    got = follower.take(until=100.0)
    assert [p.frame_index for p in got.packets] == list(range(180, 200))  # the next keyframe on
    assert got.lost == 150 and follower.lost == 150  # 30-154 dropped, 155-179 skipped


def test_a_follower_ends_with_its_segment_on_a_reconnect_or_when_the_ring_closes() -> None:
    ring = PacketRing(max_seconds=10.0, max_bytes=10_000_000)
    ring.start_segment(INFO)
    feed(ring, range(0, 40))
    follower = ring.follow(start_time=0.5)
    assert follower is not None
    assert not follower.take(until=100.0).ended
    ring.start_segment(INFO)  # the camera reconnected: a new session
    feed(ring, range(0, 10))
    got = follower.take(until=100.0)
    assert got.ended and got.packets == ()
    second = ring.follow(start_time=0.0)
    assert second is not None and not second.take(until=100.0).ended
    ring.close()
    assert second.take(until=100.0).ended


def test_a_follower_waits_for_packets_with_a_timeout() -> None:
    ring = PacketRing(max_seconds=10.0, max_bytes=10_000_000)
    ring.start_segment(INFO)
    feed(ring, range(0, 5))
    follower = ring.follow(start_time=0.0)
    assert follower is not None
    follower.take(until=100.0)
    got = follower.take(until=100.0, timeout=0.05)  # nothing new: returns after the timeout
    assert got.packets == () and not got.reached and not got.ended


# -- retention ---------------------------------------------------------------------------------


def _file(path: Path, size: int, age_s: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_retention_deletes_by_age_then_by_size_oldest_first_never_a_file_being_written(
    tmp_path: Path,
) -> None:
    now = 1_000_000.0
    day = 86400.0
    old = _file(tmp_path / "cam" / "a.mp4", 100, 10 * day, now)
    writing = _file(temp_path(tmp_path / "cam" / "b.mp4"), 100, 10 * day, now)  # being written
    open_snapshot = _file(tmp_path / "cam" / "c.jpg", 100, 10 * day, now)  # its event is open
    older = _file(tmp_path / "cam" / "d.mp4", 100, 3 * day, now)
    newer = _file(tmp_path / "cam2" / "e.mp4", 100, 2 * day, now)
    newest = _file(tmp_path / "cam2" / "f.jpg", 100, 1 * day, now)

    gone = sweep(tmp_path, max_age_s=7 * day, max_bytes=None, busy={open_snapshot}, now=now)
    assert gone == [old]
    # 500 bytes left; 250 allowed: the oldest that may go, go (temp and busy files still count).
    gone = sweep(tmp_path, max_age_s=7 * day, max_bytes=250, busy={open_snapshot}, now=now)
    assert gone == [older, newer, newest]
    assert writing.exists() and open_snapshot.exists()
    assert sweep(tmp_path, max_age_s=None, max_bytes=None, busy=set(), now=now) == []


# -- bad config ----------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "streamdet", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("media", "expected"),
    [
        ({"clips": {"pre_capture_s": -1}}, "media.clips.pre_capture_s"),
        ({"retain": {"max_gb": 0}}, "media.retain.max_gb"),
        ({"dir": "{tmp}/a_file/media"}, "cannot write media files there"),
    ],
    ids=["negative pre-roll", "zero max_gb", "unwritable dir"],
)
def test_bad_media_config_is_one_error_line_and_exit_2_before_the_model_is_built(
    tmp_path: Path, media: dict[str, Any], expected: str
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    media = json.loads(json.dumps(media).replace("{tmp}", str(tmp_path)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "cam", "url": str(vtest_path())}],
                # Missing weights: an error about them would mean the model was built first.
                "model": {"weights": str(tmp_path / "missing.safetensors")},
                "media": media,
            }
        )
    )
    done = _run(["run", str(cfg)], tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


# -- a replayed file, end to end -----------------------------------------------------------------


def media_config(path: Path, url: str, weights: Path, media_dir: Path, **clips: float) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "cam", "url": url}],
                "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
                "events": {
                    "threshold": 0.6,
                    "exit_threshold": 0.4,
                    "smoothing": 1,
                    "open_windows": 1,
                },
                "media": {
                    "dir": str(media_dir),
                    "clips": {"pre_capture_s": 2.0, "post_capture_s": 1.0, **clips},
                    "snapshots": {"overlay": False},
                },
                "progress_interval_s": 1.0,
            }
        )
    )
    return path


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(180)
def test_a_replayed_file_gets_a_clip_cut_from_it_with_pre_and_post_roll_and_a_snapshot(
    tmp_path: Path, event_video: Path, event_weights: Path
) -> None:
    media = tmp_path / "media"
    cfg = media_config(tmp_path / "cfg.yaml", str(event_video), event_weights, media)
    events = tmp_path / "events.jsonl"
    done = _run(["run", str(cfg), "--events", str(events)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = read_log(events)
    by_type = {t: [o for o in lines if o["type"] == t] for t in ("end", "clip", "snapshot")}
    assert [len(v) for v in by_type.values()] == [1, 1, 1], (lines, done.stderr[-3000:])
    (end,), (clip,), (snap,) = by_type.values()
    assert end["end_reason"] == "score_drop"
    assert abs(end["start_frame"] - EVENT_FRAMES[0]) <= 8, end  # the model sees the event
    assert clip["id"] == snap["id"] == end["id"]

    # The clip: from the keyframe at or before start - 2 s, through end + 1 s, stream-copied.
    info = inspect_clip(Path(clip["path"]))
    wanted_first = end["start_frame"] - 2 * FPS
    assert info.counters[0] == wanted_first - wanted_first % GOP
    assert info.counters[-1] == end["end_frame"] + 1 * FPS
    assert info.counters == list(range(info.counters[0], info.counters[-1] + 1))
    assert info.probe_frames == clip["frames"] == len(info.counters)
    assert info.probe_duration_s == pytest.approx(len(info.counters) / FPS, abs=0.05)
    assert info.decode_errors == ""
    assert clip["pre_capture_s"] >= 2.0 and clip["post_capture_s"] >= 1.0
    assert not any(p.name.endswith(".part") for p in media.rglob("*"))

    # The snapshot: named by the end line, written before the snapshot line, of the best frame.
    assert end["snapshot"] == snap["path"]
    assert jpeg_counter(Path(snap["path"])) == snap["frame"]
    assert end["start_frame"] <= snap["frame"] <= end["end_frame"]
    assert snap["score"] == end["peak_score"]
    assert lines.index(end) < lines.index(snap)


def test_a_snapshot_is_resized_to_its_height_and_gets_its_caption_drawn() -> None:
    import numpy as np

    from streamdet.media.snapshots import render

    frame = np.full((240, 320, 3), 128, np.uint8)
    plain = render(frame, height=120, caption=None)
    assert plain.shape == (120, 160, 3) and (plain == 128).all()
    drawn = render(frame, height=120, caption="event 0.95")
    assert drawn.shape == (120, 160, 3) and (drawn != 128).any()
    assert (frame == 128).all()  # the caller's frame is left alone
    assert render(frame, height=480, caption=None).shape == (240, 320, 3)  # never enlarged


@pytest.mark.parametrize("form", ["mp4", "annexb"])
def test_a_clip_file_takes_mp4s_length_prefixed_packets_and_raw_annexb_without_timestamps(
    tmp_path: Path, event_video: Path, form: str
) -> None:
    """Packets as an MP4 demuxer gives them (avcC extradata) or as a raw H.264 stream (in-band
    parameter sets, no timestamps): both make a clip that plays, frame for frame."""
    import av

    from streamdet.media.clips import ClipFile

    source = event_video
    if form == "annexb":
        source = tmp_path / "event.h264"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-i", str(event_video), "-c", "copy",
             "-bsf:v", "h264_mp4toannexb", "-f", "h264", str(source)],
            check=True, timeout=60,
        )  # fmt: skip
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        info = StreamInfo(
            "h264", 320, 240, stream.time_base or Fraction(1, 90000), Fraction(FPS),
            stream.codec_context.extradata or b"",
        )  # fmt: skip
        packets = [
            EncodedPacket(bytes(p), p.pts, p.dts, p.duration, p.is_keyframe, i / FPS, i)
            for i, p in enumerate(q for q in container.demux(stream) if q.size)
        ]
    assert (info.extradata[:1] == b"\x01") == (form == "mp4")
    assert form == "mp4" or packets[0].pts is None
    clip = ClipFile(tmp_path / "clip.mp4", info, packets[30])
    for packet in packets[31:80]:
        clip.write(packet)
    stats = clip.finish()
    got = inspect_clip(stats.path)
    assert got.counters == list(range(30, 80)) and got.decode_errors == ""
    assert got.probe_duration_s == pytest.approx(5.0, abs=0.05)
