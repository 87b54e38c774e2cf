"""The ray backend's pure parts, without Ray: where sources go, and how the driver merges the
nodes' lines into one log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from web_helpers import get, make_sink

from streamdet.distributed import merge
from streamdet.distributed.merge import ClusterLog
from streamdet.distributed.placement import spread
from streamdet.distributed.records import EventRecord, MediaRecord, Outbox, StatusRecord
from streamdet.events import EventChange
from streamdet.sinks.base import BaseSink, MediaMessage
from streamdet.sinks.jsonl import EventLog


def change(type_: str, node_id: str, source: str = "cam", reason: str | None = None):
    return EventChange(
        type=type_,  # type: ignore[arg-type]
        id=node_id,
        source=source,
        label="walk",
        class_index=1,
        score=0.9,
        peak_score=0.9,
        threshold=0.6,
        start_time=1.0,
        end_time=2.0,
        start_frame=0,
        end_frame=8,
        window_first_frame=0,
        window_last_frame=15,
        window_time=2.0,
        end_reason=reason,  # type: ignore[arg-type]
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("capacity", "load", "expected"),
    [
        ({"a": 100.0, "b": 100.0}, {}, {"a": ["s0", "s2"], "b": ["s1", "s3"]}),
        ({"a": 300.0, "b": 100.0}, {}, {"a": ["s0", "s1", "s2"], "b": ["s3"]}),
        ({"a": 100.0, "b": 100.0}, {"a": 2}, {"b": ["s0", "s1", "s3"], "a": ["s2"]}),
        ({"a": 100.0, "b": 0.0}, {}, {"a": ["s0", "s1", "s2", "s3"]}),
    ],
)
def test_sources_spread_in_proportion_to_measured_capacity(capacity, load, expected):
    assert spread([f"s{i}" for i in range(4)], capacity, load) == expected


def test_spread_with_no_node_to_take_sources_is_an_error():
    with pytest.raises(ValueError, match="no node with capacity"):
        spread(["s0"], {"a": 0.0})


def test_merged_log_numbers_every_node_and_ends_a_lost_nodes_events(tmp_path: Path):
    """Two nodes' lines reach one log with increasing seq and their node; events open on a lost
    node end stream_lost and its later lines are dropped; what is open at close ends shutdown."""
    path = tmp_path / "events.jsonl"
    merged = ClusterLog("run1", EventLog(path, {"name": "m", "sha256": "0"}, run_id="run1"))
    merged.start()
    merged.deliver("n1", [StatusRecord("a", "online", "opened", 1.0)])
    merged.deliver("n2", [StatusRecord("b", "online", "opened", 1.0)])
    merged.deliver("n1", [EventRecord(change("new", "x-a-walk-1", "a"), 5.0)])
    # Node n2's tracker numbers from 1 too: its event must not take n1's id.
    merged.deliver("n2", [EventRecord(change("new", "y-b-walk-1", "b"), 5.0)])
    merged.lose("n1", ["a"], "node lost")
    merged.deliver("n1", [EventRecord(change("end", "x-a-walk-1", "a", "score_drop"), 1.0)])
    merged.deliver("n3", [StatusRecord("a", "online", "opened", 2.0)])
    merged.close()

    got = lines(path)
    assert [g["seq"] for g in got] == list(range(1, len(got) + 1))
    brief = [
        (g["type"], g.get("id"), g.get("end_reason") or g.get("status"), g["node"]) for g in got
    ]
    assert brief == [
        ("status", None, "online", "n1"),
        ("status", None, "online", "n2"),
        ("new", "run1-a-walk-1", None, "n1"),
        ("new", "run1-b-walk-2", None, "n2"),
        ("end", "run1-a-walk-1", "stream_lost", "n1"),
        ("status", None, "offline", "n1"),
        ("status", None, "online", "n3"),
        ("end", "run1-b-walk-2", "shutdown", "n2"),
    ]


class MediaSeen(BaseSink):
    """Keeps the media messages an output is offered."""

    name = "seen"

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def on_media(self, msg: MediaMessage) -> None:
        self.lines.append(dict(msg.line))


def snapshot_fields(node_id: str, source: str = "a") -> dict:
    return {
        "type": "snapshot",
        "id": node_id,
        "source": source,
        "label": "walk",
        "path": f"/media/{source}/{node_id}.jpg",
        "frame": 4,
    }


def test_media_lines_carry_the_drivers_id_of_their_event_and_their_nodes_path(tmp_path: Path):
    """A node names its event (and its media files) with its own id; the driver renumbers the
    event, so the clip and snapshot lines, which come after the end, must get the driver's id
    too, keep the node's path, and reach the other outputs. The end line keeps the snapshot
    field the node's media output put on it."""
    path = tmp_path / "events.jsonl"
    seen = MediaSeen()
    merged = ClusterLog("run1", EventLog(path, {"name": "m", "sha256": "0"}, run_id="run1"), [seen])
    merged.start()
    outbox = Outbox()  # the node's end, as its pipeline's router and media output use it
    outbox.write_event(change("new", "x-a-walk-1", "a"), latency_ms=5.0)
    snap = {"snapshot": "/media/a/x-a-walk-1.jpg"}
    outbox.write_event(change("end", "x-a-walk-1", "a", "score_drop"), latency_ms=1.0, extra=snap)
    outbox.write_media(snapshot_fields("x-a-walk-1"))
    merged.deliver("n2", [EventRecord(change("new", "y-b-walk-1", "b"), 5.0)])
    merged.deliver("n1", outbox.drain())
    merged.deliver("n1", [MediaRecord({**snapshot_fields("x-a-walk-1"), "type": "clip"})])
    merged.close()

    got = lines(path)
    assert [g["seq"] for g in got] == list(range(1, len(got) + 1))
    brief = [(g["type"], g["id"], g["node"], g.get("path") or g.get("snapshot")) for g in got]
    assert brief == [
        ("new", "run1-b-walk-1", "n2", None),
        ("new", "run1-a-walk-2", "n1", None),
        ("end", "run1-a-walk-2", "n1", "/media/a/x-a-walk-1.jpg"),
        ("snapshot", "run1-a-walk-2", "n1", "/media/a/x-a-walk-1.jpg"),
        ("clip", "run1-a-walk-2", "n1", "/media/a/x-a-walk-1.jpg"),
        ("end", "run1-b-walk-1", "n2", None),
    ]
    assert got[3]["frame"] == 4 and got[3]["label"] == "walk"
    assert [(m["type"], m["id"], m["seq"]) for m in seen.lines] == [
        ("snapshot", "run1-a-walk-2", 4),
        ("clip", "run1-a-walk-2", 5),
    ]


def test_media_of_an_event_the_driver_ended_or_forgot(tmp_path: Path, monkeypatch):
    """Media of an event ended by the driver (its node taken for lost) still get the driver's
    id; the driver keeps only the newest ended ids, and a media line of an event it no longer
    knows is written all the same, with the node's id (a line is never dropped)."""
    monkeypatch.setattr(merge, "MAX_ENDED_IDS", 2)
    path = tmp_path / "events.jsonl"
    merged = ClusterLog("run1", EventLog(path, {"name": "m", "sha256": "0"}, run_id="run1"))
    merged.start()
    for n in (1, 2, 3):
        merged.deliver("n1", [EventRecord(change("new", f"x-a-walk-{n}", "a"), 5.0)])
    merged.lose("n1", ["a"], "node lost")  # ends all three, oldest first
    for n in (1, 2, 3):
        merged.deliver("n1", [MediaRecord(snapshot_fields(f"x-a-walk-{n}"))])
    merged.close()

    media = [(g["id"], g["path"]) for g in lines(path) if g["type"] == "snapshot"]
    assert media == [
        ("x-a-walk-1", "/media/a/x-a-walk-1.jpg"),
        ("run1-a-walk-2", "/media/a/x-a-walk-2.jpg"),
        ("run1-a-walk-3", "/media/a/x-a-walk-3.jpg"),
    ]
    assert merged.driver_id("x-a-walk-3") == "run1-a-walk-3"
    assert merged.driver_id("x-a-walk-1") is None


@pytest.mark.timeout(60)
def test_the_drivers_web_page_serves_a_nodes_media_under_the_drivers_event_id(tmp_path: Path):
    """The web output (in the driver) gets the media lines: ``/api/events/<driver's id>/...``
    serves the files the node named with its own id (on one machine, or shared storage)."""
    media = tmp_path / "media"
    (media / "a").mkdir(parents=True)
    jpeg, mp4 = media / "a" / "x-a-walk-1.jpg", media / "a" / "x-a-walk-1.mp4"
    jpeg.write_bytes(b"\xff\xd8 a snapshot")
    mp4.write_bytes(b"an mp4")
    web = make_sink(("a",), media={"dir": str(media)})
    merged = ClusterLog(
        "run1", EventLog(tmp_path / "events.jsonl", {"name": "m", "sha256": "0"}, run_id="run1"),
        [web],
    )  # fmt: skip
    merged.start()
    try:
        merged.deliver("n1", [EventRecord(change("new", "x-a-walk-1", "a"), 5.0)])
        end = change("end", "x-a-walk-1", "a", "score_drop")
        merged.deliver("n1", [EventRecord(end, 1.0, {"snapshot": str(jpeg)})])
        merged.deliver("n1", [MediaRecord({**snapshot_fields("x-a-walk-1"), "path": str(jpeg)})])
        merged.deliver("n1", [MediaRecord({"type": "clip", "id": "x-a-walk-1", "path": str(mp4)})])
        base = "/api/events/run1-a-walk-1"
        deadline = time.monotonic() + 20.0
        while get(web.server.port, f"{base}/clip.mp4").status != 200:
            assert time.monotonic() < deadline, get(web.server.port, base).body
            time.sleep(0.05)
        assert get(web.server.port, f"{base}/clip.mp4").body == b"an mp4"
        assert get(web.server.port, f"{base}/snapshot.jpg").body == jpeg.read_bytes()
    finally:
        merged.close()


def test_ray_is_imported_only_by_the_ray_backend():
    """A single-machine run, and the backend's Ray-free parts, never load Ray (~1 s, 100 MB)."""
    code = (
        "import sys, streamdet.cli, streamdet.runner, streamdet.pipeline, "
        "streamdet.distributed.engine, streamdet.distributed.merge; "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
