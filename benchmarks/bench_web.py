"""Do viewers of the web page slow detection? Event latency with 0 and then 20 viewers, one run.

One in-process run of the bundled demo model on two copies of the demo video paced like cameras
(10 fps, ``realtime: true``), with the web output on. For ``--seconds`` it has no viewer, then
for as long it has ``--viewers`` (half MJPEG streams of one camera each, half the page's
``/api/live`` stream of every camera and event), each read as fast as it comes. Per phase:
window latency (newest frame -> its event lines written: what every event line's
``latency_ms`` says) p50/p99/max, inference time, the process's CPU and the bytes sent.

    python benchmarks/bench_web.py                       # 22 s + 22 s, 20 viewers
    python benchmarks/bench_web.py --screenshot docs/web.png

``--screenshot`` opens the page in headless Chromium at the end (one more viewer) and saves it;
a stand-in for the event-media output writes each event's snapshot so the page shows thumbnails.
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import machine  # noqa: E402

from streamdet.config import load_config  # noqa: E402
from streamdet.inference import build_engine  # noqa: E402
from streamdet.models.weights import load_checkpoint  # noqa: E402
from streamdet.pipeline import Pipeline  # noqa: E402
from streamdet.runner import inference_plan  # noqa: E402
from streamdet.sinks.base import BaseSink, EventMessage, FrameMessage  # noqa: E402

DEMO = REPO / "streamdet" / "demo"
SOURCES = ("demo", "yard")


class Viewer(threading.Thread):
    """Reads one stream as fast as it comes, counting bytes, until stopped."""

    def __init__(self, port: int, path: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.stop = port, path, stop
        self.bytes = 0
        self.status = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", self.path)
            r = conn.getresponse()
            self.status = r.status
            while not self.stop.is_set():
                chunk = r.read1(65536)
                if not chunk:
                    break
                self.bytes += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()


class SnapshotStandIn(BaseSink):
    """Writes a JPEG of the newest frame for each new event and announces it as the media output
    does (only for the screenshot: thumbnails on the page)."""

    name = "snapshots"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.record_media: Any = None
        self.frames: dict[str, Any] = {}

    def frame_sources(self) -> tuple[str, ...]:
        return SOURCES

    def on_frame(self, msg: FrameMessage) -> None:
        self.frames[msg.source] = msg.frame

    def on_event(self, msg: EventMessage) -> None:
        c = msg.change
        if c.type == "new" and c.source in self.frames and self.record_media is not None:
            path = self.folder / f"{c.id}.jpg"
            cv2.imwrite(str(path), self.frames[c.source])
            self.record_media(
                {"type": "snapshot", "id": c.id, "source": c.source, "path": str(path)}
            )


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)
    )


def build(tmp: Path, screenshot: bool) -> tuple[Pipeline, Any]:
    cfg = load_config(
        DEMO / "demo.yaml",
        {
            "sources": [
                {"name": name, "url": str(DEMO / "demo.mp4"), "realtime": True} for name in SOURCES
            ],
            "model": {"device": "cpu", "precision": "fp32"},
            "sinks": {"events": {"path": str(tmp / "events.jsonl")}, "overlay": {"video": None}},
            "web": {"port": 0, "max_clients": 30},
            "truth": None,
            "progress_interval_s": 3600,
        },
    )
    checkpoint = load_checkpoint(DEMO / "c3d_bn_demo.safetensors")
    engine = build_engine(checkpoint.model, "cpu", "fp32")
    workers, per_worker = inference_plan(
        cfg, engine.device, engine.concurrent, torch.get_num_threads()
    )
    extra = (SnapshotStandIn(tmp),) if screenshot else ()
    pipeline = Pipeline(
        cfg,
        checkpoint,
        engine,
        print_fn=lambda line: None,
        workers=workers,
        threads_per_worker=per_worker,
        sinks=extra,
    )
    for s in extra:
        s.record_media = pipeline.router.record_media
    web = next(w.sink for w in pipeline.router.workers if w.sink.name == "web")
    return pipeline, web


def phase(pipeline: Pipeline, web: Any, seconds: float, viewers: int) -> dict[str, Any]:
    stop = threading.Event()
    paths = [
        f"/api/sources/{SOURCES[i % 2]}/stream.mjpeg" if i % 2 == 0 else "/api/live"
        for i in range(viewers)
    ]
    threads = [Viewer(web.server.port, p, stop) for p in paths]
    for t in threads:
        t.start()
    before = len(pipeline.router.latencies())
    inf_before = len(pipeline.inference.inference_ms)
    cpu0, t0, enc0 = cpu_seconds(), time.monotonic(), web.frames_encoded
    time.sleep(seconds)
    cpu1, t1, enc1 = cpu_seconds(), time.monotonic(), web.frames_encoded
    lat = pipeline.router.latencies()[before:]
    inf = pipeline.inference.inference_ms[inf_before:]
    sent = sum(t.bytes for t in threads)
    stop.set()
    for t in threads:
        t.join(5)
    refused = sum(1 for t in threads if t.status != 200)
    return {
        "viewers": viewers,
        "windows": len(lat),
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "max": max(lat) if lat else float("nan"),
        "inf_p50": pct(inf, 50),
        "cpu": 100.0 * (cpu1 - cpu0) / (t1 - t0),
        "mb_s": sent / 1e6 / (t1 - t0),
        "encoded_fps": (enc1 - enc0) / (t1 - t0),
        "refused": refused,
    }


def take_screenshot(url: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(url)
        page.wait_for_selector("img[data-seq]", state="visible", timeout=30_000)
        time.sleep(3)  # a few live frames, the thumbnails loaded
        page.screenshot(path=str(path))
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=22.0, help="per phase (the video is 60 s)")
    ap.add_argument("--viewers", type=int, default=20)
    ap.add_argument("--screenshot", type=Path, help="save the page (1280x720 PNG) at the end")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        pipeline, web = build(Path(tmp), args.screenshot is not None)
        runner = threading.Thread(target=pipeline.run, daemon=True)
        runner.start()
        try:
            time.sleep(3.0)  # the first windows: model warm-up
            rows = [phase(pipeline, web, args.seconds, 0)]
            rows.append(phase(pipeline, web, args.seconds, args.viewers))
            if args.screenshot is not None:
                take_screenshot(web.url, Path(cwd) / args.screenshot)
            # Viewers still connected when the run stops: how long the stop takes.
            stop = threading.Event()
            attached = [Viewer(web.server.port, "/api/live", stop) for _ in range(args.viewers)]
            for t in attached:
                t.start()
            time.sleep(2.0)
            streaming = sum(1 for t in attached if t.status == 200 and t.bytes > 0)
        finally:
            started = time.monotonic()
            pipeline.stop("benchmark over")
            runner.join(30)
            stop_s = time.monotonic() - started
    print(f"CPU: {machine()}; torch threads {torch.get_num_threads()}; {len(SOURCES)} sources of")
    print(f"demo.mp4 paced at 10 fps (window stride 4), web mjpeg_fps {web.cfg.mjpeg_fps:g}")
    print()
    print(
        "| viewers | windows | latency ms p50 | p99 | max | inference ms p50 | process CPU % "
        "| encoded frames/s | MB/s to viewers |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['viewers']} | {r['windows']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} "
            f"| {r['inf_p50']:.1f} | {r['cpu']:.0f} | {r['encoded_fps']:.1f} | {r['mb_s']:.2f} |"
        )
    refused = rows[1]["refused"]
    print(
        f"\nstop with {streaming} of {args.viewers} viewers streaming: the run ended "
        f"{stop_s:.2f} s after pipeline.stop(); viewers refused during the 20-viewer phase: "
        f"{refused}"
    )


if __name__ == "__main__":
    main()
