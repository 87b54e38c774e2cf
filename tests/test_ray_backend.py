"""``streamdet run --backend ray`` on real Ray clusters (``ray.cluster_utils.Cluster``: every
node a set of real Ray processes on this machine), real clips paced like cameras and the tiny
fitted model (tests/tiny_model.py: each 100-frame clip makes walk and run events).

Ray clusters take seconds to start: the tests are few and each checks several things.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from assets import cut_clip, vtest_path
from conftest import free_port
from ray.cluster_utils import Cluster
from tiny_model import make_tiny_weights

from streamdet import demo
from streamdet.cli import main

REPO = Path(__file__).resolve().parent.parent
BACK_ONLINE_S = 30.0  # a lost node's sources are online elsewhere within this (issue 21)
STREAM_OPTIONS = {  # a camera reconnects fast on its new node
    "open_timeout_s": 5.0,
    "read_timeout_s": 5.0,
    "backoff_initial_s": 0.2,
    "backoff_max_s": 1.0,
}
CAMERA_PASSWORD = "ray-s3cret-pw"  # must reach the node that opens the camera, and no line


@pytest.fixture(scope="module")
def weights(assets_dir: Path, walk_clip: Path) -> Path:
    return make_tiny_weights(assets_dir, walk_clip)


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Start a cluster of N one-CPU nodes: ``cluster(3)``; shut down after the test."""
    started: list[Cluster] = []

    def start(nodes: int) -> Cluster:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        started.append(c)
        return c

    yield start
    if ray.is_initialized():
        ray.shutdown()
    for c in started:
        c.shutdown()


def write_config(
    path: Path,
    sources: dict[str, Path],
    weights: Path,
    streams: dict[str, str] | None = None,
    web: dict[str, Any] | None = None,
    **source_keys: Any,
) -> Path:
    """A run of ``sources`` (files, with ``source_keys``) and ``streams`` (RTSP URLs), with the
    web output when ``web`` is given."""
    cfg = {
        "sources": [{"name": name, "url": str(url), **source_keys} for name, url in sources.items()]
        + [
            {"name": name, "url": url, "options": STREAM_OPTIONS}
            for name, url in (streams or {}).items()
        ],
        "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
        "window": {"stride": 8},
        "events": {"threshold": 0.6, "exit_threshold": 0.4, "smoothing": 1, "open_windows": 1},
        "sinks": {"events": {"path": str(path.parent / "events.jsonl")}},
        "progress_interval_s": 2,
    }
    if web is not None:
        cfg["web"] = web
    path.write_text(yaml.safe_dump(cfg))
    return path


def vtest_cut(assets_dir: Path, frames: int) -> Path:
    """The first ``frames`` frames of vtest.avi at 320x240, cut once into the shared assets."""
    clip = assets_dir / f"walk{frames}.avi"
    if not clip.exists():
        cut_clip(vtest_path(), clip, start_frame=0, n_frames=frames, size=(320, 240))
    return clip


def start_ray_run(config: Path, address: str, *, max_seconds: int) -> subprocess.Popen[str]:
    """``streamdet run CONFIG --backend ray`` on the cluster at ``address``, this checkout's
    package first on the path; stdout and stderr together, as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "streamdet", "run", str(config), "--backend", "ray"]
        + ["--address", address, "--max-seconds", str(max_seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every whole line of the log (each must parse: a malformed line fails the test)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def wait_for(condition, timeout: float, proc: subprocess.Popen[str], what: str) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout`` or if ``proc`` exited."""
    started = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() - started < timeout, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.2)
    return time.monotonic() - started


def camera_ready(port: int) -> bool:
    """The driver's /readyz says the source ``rtsp`` is ready (a fresh frame on its node)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        details = json.loads(conn.getresponse().read())
    except (OSError, ValueError):
        return False
    finally:
        conn.close()
    return bool(details.get("sources", {}).get("rtsp", {}).get("ready"))


def check_log(lines: list[dict[str, Any]]) -> None:
    """seq strictly increasing, every line names its node, every event ends once, nothing
    after its end."""
    seqs = [line["seq"] for line in lines]
    assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False)), seqs
    assert all(line.get("node") for line in lines)
    ended: set[str] = set()
    opened: set[str] = set()
    for line in lines:
        if line["type"] in ("new", "update", "end"):
            assert line["id"] not in ended, f"a line after the end of {line['id']}"
            if line["type"] == "new":
                opened.add(line["id"])
            assert line["id"] in opened, f"{line['id']}: no new line before this one"
            if line["type"] == "end":
                ended.add(line["id"])
    assert opened == ended, f"events never ended: {opened - ended}"


def test_unreachable_address_is_one_error_line_and_exit_2(
    tmp_path: Path, walk_clip: Path, weights: Path, capsys: pytest.CaptureFixture[str]
):
    config = write_config(tmp_path / "c.yaml", {"cam": walk_clip}, weights)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()

    code = main(["run", str(config), "--backend", "ray", "--address", address])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: cannot reach the Ray cluster at"), err
    assert time.monotonic() - started < 10.0
    assert not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_lost_nodes_sources_come_back_online_elsewhere_and_every_line_reaches_the_log(
    tmp_path: Path, assets_dir: Path, weights: Path, cluster: Any, rtsp_server: Any
):
    """Five paced files and the RTSP test camera (with a password) on three one-CPU nodes: every
    source's events reach the one log, the camera's too (its node opens it with the password,
    which no line or output shows), and the driver's /readyz shows the camera ready from its
    node's report; a node removed mid-run has its sources online on the others within 30 s (its
    open events end stream_lost); SIGTERM stops the run within 5 s, open events ending
    shutdown."""
    clip = vtest_cut(assets_dir, 300)  # 30 s paced: the first 100 frames make the tiny events
    camera = rtsp_server(clip, user="viewer", password=CAMERA_PASSWORD)  # each client: frame 0
    files = {f"cam{i}": clip for i in range(5)}
    sources = {**files, "rtsp": camera.url}
    port = free_port()
    config = write_config(
        tmp_path / "c.yaml",
        files,
        weights,
        streams={"rtsp": camera.url},
        web={"port": port},
        realtime=True,
    )
    c = cluster(3)
    log_path = tmp_path / "events.jsonl"
    proc = start_ray_run(config, c.address, max_seconds=300)
    try:

        def each_source_has(kind: str) -> bool:
            seen = {line["source"] for line in read_log(log_path) if line["type"] == kind}
            return seen >= set(sources)

        wait_for(lambda: each_source_has("new"), 180, proc, "every source's first event")
        wait_for(lambda: camera_ready(port), 30, proc, "/readyz showing the camera ready")
        head = c.head_node.node_id[:8]
        where = {}
        for line in read_log(log_path):
            if line["type"] == "status" and line["status"] == "online":
                where[line["source"]] = line["node"]
        victim = next(
            n
            for n in c.list_all_nodes()
            if n.node_id[:8] != head and n.node_id[:8] in where.values()
        )
        moved = sorted(s for s, n in where.items() if n == victim.node_id[:8])
        c.remove_node(victim)

        def back_online() -> bool:
            lines = read_log(log_path)
            lost_at = max(i for i, line in enumerate(lines) if line["node"] == victim.node_id[:8])
            again = {
                line["source"]
                for line in lines[lost_at:]
                if line["type"] == "status" and line["status"] == "online"
            }
            return again >= set(moved)

        seconds = wait_for(back_online, BACK_ONLINE_S, proc, f"{moved} back online")
        print(f"sources {moved} back online {seconds:.1f} s after their node was removed")
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        stopped = time.monotonic() - stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert stopped < 5.0 + 2.0, f"stopped in {stopped:.1f} s"  # + the interpreter's exit
    lines = read_log(log_path)
    check_log(lines)
    victim_name = victim.node_id[:8]
    for source in moved:
        mine = [line for line in lines if line["source"] == source]
        offline = next(
            i
            for i, line in enumerate(mine)
            if line["type"] == "status" and line["status"] == "offline"
        )
        assert mine[offline]["node"] == victim_name and mine[offline]["reason"] == "node lost"
        assert all(
            line["end_reason"] == "stream_lost"
            for line in mine[:offline]
            if line["type"] == "end"
            and line["node"] == victim_name
            and line["end_reason"] not in ("score_drop",)
        )
        after = mine[offline + 1 :]
        assert after[0]["type"] == "status" and after[0]["status"] == "online"
        assert after[0]["node"] != victim_name
    reasons = {line["end_reason"] for line in lines if line["type"] == "end"}
    assert reasons <= {"score_drop", "stream_lost", "shutdown"}, reasons
    assert "shutdown" in reasons or not any(line["type"] == "new" for line in lines[-5:]), (
        "events open at the stop end shutdown"
    )
    assert "[summary] run" in out
    assert any(line["source"] == "rtsp" and line["type"] == "new" for line in lines)
    for text in (out, log_path.read_text()):
        assert CAMERA_PASSWORD not in text


def test_the_demo_on_a_one_node_cluster_gives_the_single_machine_events(
    tmp_path: Path, cluster: Any, capsys: pytest.CaptureFixture[str]
):
    """The bundled demo replayed through the ray backend writes the same new and end lines as
    the single-machine run (ids, times and latencies aside), and prints the same event F1
    against the demo's truth (regression: the ray run printed no truth line)."""
    cfg = yaml.safe_load((Path(demo.__file__).parent / "demo.yaml").read_text())
    folder = Path(demo.__file__).parent
    cfg["sources"][0]["url"] = str(folder / cfg["sources"][0]["url"])
    cfg["model"]["weights"] = str(folder / cfg["model"]["weights"])
    cfg["model"]["precision"] = "fp32"
    cfg["sinks"] = {"overlay": {"video": None}}
    cfg["truth"] = str(folder / cfg["truth"])
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    single, on_ray = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    c = cluster(1)

    def truth_lines() -> list[str]:
        out = capsys.readouterr().out
        return [line for line in out.splitlines() if line.startswith("[summary] against")]

    assert main(["run", str(config), "--events", str(single)]) == 0
    single_truth = truth_lines()
    assert (
        main(
            ["run", str(config), "--events", str(on_ray), "--backend", "ray"]
            + ["--address", c.address]
        )
        == 0
    )
    ray_truth = truth_lines()

    def brief(path: Path) -> list[tuple[Any, ...]]:
        keys = ("type", "source", "label", "start_frame", "end_frame", "score", "end_reason")
        return [
            tuple(line[k] for k in keys)
            for line in read_log(path)
            if line["type"] in ("new", "end")
        ]

    assert len(brief(single)) >= 20
    assert brief(on_ray) == brief(single)
    check_log(read_log(on_ray))
    assert len(single_truth) == 1 and "F1" in single_truth[0], single_truth
    assert ray_truth == single_truth
