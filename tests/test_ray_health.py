"""The web output's ``/readyz`` and ``/healthz`` on the ray backend's driver: built from the
health each engine reports at its polls (the driver runs no capture of its own).

The first test feeds the coordinator engine reports by hand (no cluster) and asks a real web
server; the end-to-end test, with the RTSP test camera on a one-node cluster, lives in
tests/test_ray_backend.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from web_helpers import get, make_sink

from streamdet.config import RunConfig
from streamdet.distributed.backend import Coordinator, NodeState
from streamdet.distributed.merge import ClusterLog
from streamdet.distributed.records import EngineReport
from streamdet.sinks.base import SourceHealth


def report(frame_age: dict[str, float], *, inference_alive: bool = True) -> EngineReport:
    """An engine's poll answer: each source online, its newest frame ``frame_age`` s old."""
    now = time.time()
    return EngineReport(
        incarnation="e1",
        sources=tuple(frame_age),
        health={
            name: SourceHealth("online", 50, now - age, 5.0, capture_alive=True)
            for name, age in frame_age.items()
        },
        inference_alive=inference_alive,
    )


@pytest.mark.timeout(60)
def test_readyz_on_the_driver_follows_what_the_engines_report(walk_clip: Path) -> None:
    """Regression: on --backend ray the driver gave the web output no health, so /readyz was
    503 ("the run's health is unknown") for as long as the run lasted."""
    cfg = RunConfig.model_validate(
        {"sources": [{"name": n, "url": str(walk_clip)} for n in ("cam", "door")]}
    )
    coordinator = Coordinator(cfg, ClusterLog("run", None), print_fn=lambda _: None)
    first = NodeState("a" * 56, "aaaaaaaa", 1, sources=["cam"])
    second = NodeState("b" * 56, "bbbbbbbb", 1, sources=["door"])
    coordinator.nodes = {first.node_id: first, second.node_id: second}
    sink = make_sink(("cam", "door"), health=coordinator.health)
    port = sink.server.port
    try:
        r = get(port, "/readyz")
        assert r.status == 503 and r.json()["inference_alive"] is False  # no engine answered

        coordinator._take(first, report({"cam": 0.2}))
        coordinator._take(second, report({"door": 0.3}))
        r = get(port, "/readyz")
        assert r.status == 200, r.json()
        assert r.json()["sources"]["door"]["status"] == "online"
        assert get(port, "/healthz").status == 200

        coordinator._take(first, report({"cam": 30.0}))  # stall_timeout_s is 5
        r = get(port, "/readyz")
        assert r.status == 503 and "no frame for 30" in r.json()["sources"]["cam"]["why"]

        coordinator._take(first, report({"cam": 0.2}, inference_alive=False))
        assert get(port, "/healthz").status == 503

        coordinator._take(first, report({"cam": 0.2}))
        second.lost = True  # as _check_nodes marks a node that left
        coordinator._engine_lost(second, "node lost")
        r = get(port, "/readyz")
        assert r.status == 503 and r.json()["sources"]["door"]["why"] == "not started"
        assert r.json()["sources"]["cam"]["ready"] is True
        assert get(port, "/healthz").status == 200  # waiting for a node is not a dead thread
    finally:
        sink.close()
