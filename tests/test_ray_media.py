"""Event media with ``streamdet run --backend ray``: clips and snapshots made on the node that
holds the source, their lines in the driver's one log with the driver's event ids.

A real two-node ``ray.cluster_utils.Cluster`` (every node a set of Ray processes on this
machine), the RTSP test camera burning each frame's number into its picture, a paced file of
the same video, and the tiny model fitted to fire on the video's negated frames
(tests/media_helpers.py). The cluster is shared by the tests of this module: it takes seconds
to start.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from conftest import RtspServer
from media_helpers import (
    EVENT_FRAMES,
    inspect_clip,
    jpeg_counter,
)
from ray.cluster_utils import Cluster

from streamdet.cli import main
from streamdet.config import RunConfig
from streamdet.distributed.engine import NodeEngine
from streamdet.distributed.records import EventRecord, MediaRecord, Record

STREAM_OPTIONS = {"open_timeout_s": 5.0, "read_timeout_s": 5.0, "backoff_initial_s": 0.2}


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def tail(tmp_path: Path, event_video: Path) -> Path:
    """Frames 0-119 of the event video: its event (frames 90-129) is open when it ends."""
    path = tmp_path / "tail.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(event_video), "-frames:v", "120",
         "-c", "copy", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


def write_config(folder: Path, sources: list[dict[str, Any]], weights: Path) -> Path:
    """A run of ``sources`` with clips and snapshots in ``media`` (a relative folder: the
    test's working folder is ``folder``)."""
    path = folder / "cfg.yaml"
    cfg = {
        "sources": sources,
        "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
        "events": {"threshold": 0.6, "exit_threshold": 0.4, "smoothing": 1, "open_windows": 1},
        "media": {"dir": "media", "clips": {"pre_capture_s": 2.0, "post_capture_s": 1.0}},
        "sinks": {"events": {"path": str(folder / "events.jsonl")}},
        "progress_interval_s": 2,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_media_lines(lines: list[dict[str, Any]], media_dir: Path) -> None:
    """seq strictly increasing; every clip and snapshot line carries the driver's id of an
    event of the log and the node of that event's lines; its file is in ``media_dir``."""
    seqs = [line["seq"] for line in lines]
    assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False)), seqs
    run_id = lines[0]["run_id"]
    node_of = {line["id"]: line["node"] for line in lines if line["type"] == "new"}
    media = [line for line in lines if line["type"] in ("clip", "snapshot")]
    assert media, lines
    for line in media:
        assert line["id"] in node_of, f"{line['type']} of an event not in the log: {line['id']}"
        assert line["id"].startswith(f"{run_id}-{line['source']}-"), line["id"]
        assert line["node"] == node_of[line["id"]], line
        assert line["run_id"] == run_id
        assert Path(line["path"]).is_relative_to(media_dir), line["path"]
        assert Path(line["path"]).is_file(), line["path"]


def check_event_media(lines: list[dict[str, Any]], end: dict[str, Any]) -> tuple[Any, Any]:
    """The clip and snapshot of the event that ``end`` ends: the snapshot the end line names
    exists and is the snapshot line's; the clip plays whole (ffprobe, ffmpeg) and holds the
    frame of the snapshot. Returns (clip info, the snapshot's frame number on the video)."""
    clips = [line for line in lines if line["type"] == "clip" and line["id"] == end["id"]]
    snaps = [line for line in lines if line["type"] == "snapshot" and line["id"] == end["id"]]
    assert len(clips) == 1 and len(snaps) == 1, (end, clips, snaps)
    clip, snap = clips[0], snaps[0]
    assert end["snapshot"] == snap["path"] and Path(end["snapshot"]).is_file()
    seq = {id(line): line["seq"] for line in lines}
    assert seq[id(end)] < seq[id(clip)] and seq[id(end)] < seq[id(snap)]

    info = inspect_clip(Path(clip["path"]))
    assert info.decode_errors == "" and info.codec == "h264", info.decode_errors
    assert info.probe_frames == clip["frames"] == len(info.counters) > 0
    assert info.counters == list(range(info.counters[0], info.counters[-1] + 1))
    shown = jpeg_counter(Path(snap["path"]))
    assert info.counters[0] <= shown <= info.counters[-1], (shown, info.counters)
    return info, shown


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_clips_and_snapshots_are_made_on_the_nodes_and_logged_with_the_drivers_ids(
    tmp_path: Path,
    two_nodes: Cluster,
    camera: RtspServer,
    event_video: Path,
    event_weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """The RTSP test camera and a paced file of its video, on two nodes: each source's event
    (its negated frames) gets a clip that plays and a snapshot of one of its frames, made on
    the node that reads it, in the relative ``media.dir`` of the driver's working folder; the
    clip and snapshot lines carry the driver's id of their event, the end line names the
    snapshot, seq strictly increases."""
    monkeypatch.chdir(tmp_path)  # media.dir "media": here, not in the Ray workers' folder
    sources = [
        {"name": "file", "url": str(event_video), "realtime": True},
        {"name": "cam", "url": camera.url, "options": STREAM_OPTIONS},
    ]
    config = write_config(tmp_path, sources, event_weights)

    # Each source's first event is its frames 90-129 (9-13 s in); its clip ~2 s later.
    code = main(["run", str(config), "--backend", "ray", "--address", two_nodes.address]
                + ["--max-seconds", "40"])  # fmt: skip

    out = capsys.readouterr().out
    assert code == 0, out
    lines = read_log(tmp_path / "events.jsonl")
    check_media_lines(lines, tmp_path / "media")
    made = [sum(line["type"] == kind for line in lines) for kind in ("clip", "snapshot")]
    assert f"[summary] media: {made[0]} clips, {made[1]} snapshots in {tmp_path / 'media'}" in out
    first, last = EVENT_FRAMES
    for source in ("file", "cam"):
        ends = [
            line
            for line in lines
            if line["type"] == "end" and line["source"] == source
            and line["end_reason"] == "score_drop"
        ]  # fmt: skip
        assert ends, (source, [line for line in lines if line["source"] == source], out)
        info, shown = check_event_media(lines, ends[0])
        # The video's own frame numbers: the snapshot is one of the negated frames, and the
        # clip runs from before the event (its pre-roll) past its end.
        assert first <= shown < last, (source, shown)
        assert info.counters[0] < first and info.counters[-1] >= last - 8, info.counters


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_run_waits_for_the_media_of_the_event_open_when_its_file_ended(
    tmp_path: Path,
    two_nodes: Cluster,
    tail: Path,
    event_weights: Path,
    capsys: pytest.CaptureFixture[str],
):
    """A file that ends in the middle of its event: the event ends stream_ended, and its clip
    and snapshot are cut from the file only then. The run stops by itself (every source
    ended) only after the node has made them, so both lines reach the log."""
    config = write_config(tmp_path, [{"name": "tail", "url": str(tail)}], event_weights)

    code = main(["run", str(config), "--backend", "ray", "--address", two_nodes.address]
                + ["--max-seconds", "120"])  # fmt: skip

    out = capsys.readouterr().out
    assert code == 0, out
    lines = read_log(tmp_path / "events.jsonl")
    ends = [line for line in lines if line["type"] == "end"]
    assert [e["end_reason"] for e in ends] == ["stream_ended"], (lines, out)
    check_media_lines(lines, tmp_path / "media")
    check_event_media(lines, ends[0])


@pytest.mark.timeout(120)
def test_a_node_reports_its_pipeline_alive_until_the_media_of_its_ended_file_are_out(
    tmp_path: Path, tail: Path, event_weights: Path
):
    """What the driver waits on before it stops a run whose sources all ended: a node engine
    (here without Ray) counts a pipeline alive until its media output is done, so the first
    poll that says none is alive has handed over the clip and snapshot of the event that the
    file's end ended (cut from the file after that end); nothing comes after it."""
    cfg = RunConfig.model_validate(
        {
            "sources": [{"name": "tail", "url": str(tail)}],
            "model": {"weights": str(event_weights), "device": "cpu", "precision": "fp32"},
            "events": {"threshold": 0.6, "exit_threshold": 0.4, "smoothing": 1},
            "media": {"dir": str(tmp_path / "media")},
        }
    )
    engine = NodeEngine(cfg, threads=1)
    engine.start(["tail"])
    records: list[Record] = []
    deadline = time.monotonic() + 90.0
    while True:
        report = engine.poll(0.5)
        records += report.records
        assert not report.errors, report.errors
        if not report.pipelines_alive:
            break
        assert time.monotonic() < deadline, records
    assert engine.poll().records == ()

    ends = [r for r in records if isinstance(r, EventRecord) and r.change.type == "end"]
    assert [e.change.end_reason for e in ends] == ["stream_ended"], records
    media = {r.fields["type"]: r.fields for r in records if isinstance(r, MediaRecord)}
    assert set(media) == {"clip", "snapshot"}, records
    assert {m["id"] for m in media.values()} == {ends[0].change.id}
    assert ends[0].extra["snapshot"] == media["snapshot"]["path"]
    assert Path(media["clip"]["path"]).is_file() and Path(media["snapshot"]["path"]).is_file()


def cam_clips(records: list[Record]) -> list[Any]:
    return [
        r.fields
        for r in records
        if isinstance(r, MediaRecord) and r.fields["type"] == "clip" and r.fields["source"] == "cam"
    ]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_pipeline_started_mid_run_leaves_the_clips_other_pipelines_are_writing(
    tmp_path: Path, camera: RtspServer, event_video: Path, event_weights: Path
):
    """Regression: a pipeline starting on a media folder deletes the temporary files a crashed
    run left, and it took a live clip being written in the same folder by another pipeline
    (a source moved there mid-run, or another node of the cluster on shared storage) for one:
    that clip was lost ("cannot finish the clip ... No such file")."""
    media = tmp_path / "media"
    cfg = RunConfig.model_validate(
        {
            "sources": [
                {"name": "cam", "url": camera.url, "options": STREAM_OPTIONS},
                {"name": "file", "url": str(event_video), "realtime": True},
            ],
            "model": {"weights": str(event_weights), "device": "cpu", "precision": "fp32"},
            "events": {"threshold": 0.6, "exit_threshold": 0.4, "smoothing": 1},
            "media": {"dir": str(media), "clips": {"pre_capture_s": 2.0, "post_capture_s": 1.0}},
        }
    )
    engine = NodeEngine(cfg, threads=1)
    records: list[Record] = []
    try:
        engine.start(["cam"])
        deadline = time.monotonic() + 60.0
        while not list(media.rglob(".*.mp4.part")):  # the camera's event's clip, being written
            records += engine.poll(0.1).records
            assert time.monotonic() < deadline, records
        engine.start(["file"])  # its media output starts on the same folder
        deadline = time.monotonic() + 60.0
        while not cam_clips(records):
            report = engine.poll(0.5)
            records += report.records
            assert not report.errors, report.errors
            assert time.monotonic() < deadline, records
    finally:
        engine.stop()
    (clip,) = cam_clips(records)
    opened = [r.change.id for r in records if isinstance(r, EventRecord) and r.change.type == "new"]
    assert clip["id"] == opened[0], "the clip of the first event was lost"
    assert Path(clip["path"]).is_file()
    assert inspect_clip(Path(clip["path"])).decode_errors == ""
