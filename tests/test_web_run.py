"""The web output during real runs: headless Chromium on the page of a `streamdet run` of the demo
and of the GStreamer RTSP test camera, /readyz following the camera, /metrics, and abuse that
must neither stop detection nor the server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import make_tiny_weights
from web_helpers import get

from streamdet.config import load_config
from streamdet.inference import build_engine
from streamdet.models.weights import load_checkpoint
from streamdet.pipeline import Pipeline
from streamdet.sinks.base import BaseSink, EventMessage, FrameMessage

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "streamdet" / "demo"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# From a signal to the process gone, as tests/test_run_cli.py allows (machines differ ~3x).
STOP_DEADLINE_S = 6.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout:g} s: {what}")


class Run:
    """`streamdet run CONFIG --web 127.0.0.1:0` in a subprocess; ``port`` from its printed URL."""

    def __init__(self, config: Path, cwd: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamdet", "run", str(config), "--web", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for r in self._readers:
            r.start()
        line = wait_for(self._url_line, 90, "the run printed its URL")
        self.port = int(line.rsplit(":", 1)[1].strip("/ \n"))

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def _url_line(self) -> str | None:
        assert self.proc.poll() is None, f"the run ended: {''.join(self.err)[-3000:]}"
        return next((x for x in self.out if x.startswith("[web] serving on http://")), None)

    def stop(self) -> float:
        """SIGINT; returns the seconds until the process was gone."""
        signalled = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        elapsed = time.monotonic() - signalled
        for r in self._readers:
            r.join(5)
        return elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def streamdet_run(config: Path, cwd: Path) -> Iterator[Run]:
    run = Run(config, cwd)
    try:
        yield run
    finally:
        run.kill()


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def new_page(b: Any) -> Any:
    """A page; the test's own waits are JavaScript the page's CSP (no eval) would refuse."""
    return b.new_context(viewport={"width": 1280, "height": 720}, bypass_csp=True).new_page()


def live_image(page, source: str) -> tuple[int, bytes]:
    """The tile's frame number and a screenshot of its picture."""
    img = page.locator(f"#live-{source}")
    return int(img.get_attribute("data-seq") or 0), img.screenshot()


def assert_live_image_changes(page, source: str) -> bytes:
    page.wait_for_selector(f"#live-{source}[data-seq]", state="visible", timeout=60_000)
    seq, first = live_image(page, source)
    page.wait_for_function(
        f"document.getElementById('live-{source}').dataset.seq > {seq + 3}", timeout=60_000
    )
    _, second = live_image(page, source)
    assert first != second, "the live picture did not change between two screenshots"
    assert page.locator(f".tile[data-source='{source}'] .none").is_hidden()
    return second


def test_the_page_of_a_demo_run_shows_live_video_and_new_events_without_reload(
    tmp_path: Path,
) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "demo", "url": str(DEMO / "demo.mp4"), "realtime": True}],
                "model": {"weights": str(DEMO / "c3d_bn_demo.safetensors"), "precision": "fp32"},
                "window": {"length": 16, "stride": 4},
                "events": {"threshold": 0.6, "exit_threshold": 0.4, "smoothing": 2},
                "sinks": {"events": {"path": str(tmp_path / "events.jsonl")}},
                "web": {"token": TOKEN, "mjpeg_fps": 5},
            }
        )
    )
    with streamdet_run(config, tmp_path) as run, browser() as b:
        page = new_page(b)
        page.goto(f"http://127.0.0.1:{run.port}/?token={TOKEN}")
        assert page.url.endswith(f"{run.port}/"), "the token stays in the address bar"
        page.evaluate("window.__sameDocument = true")
        assert_live_image_changes(page, "demo")
        shown = page.locator("#events tr").count()
        page.wait_for_function(
            f"document.querySelectorAll('#events tr').length > {shown}", timeout=90_000
        )
        assert page.evaluate("window.__sameDocument") is True  # no reload
        row = page.locator("#events tr").first
        assert row.get_attribute("data-event-id").startswith(tuple("0123456789abcdef"))
        assert page.locator(".tile .badge").first.inner_text() == "online"
        page.screenshot(path=str(tmp_path / "web.png"))
        elapsed = run.stop()  # with the page's live stream still open
    assert run.proc.returncode == 0, "".join(run.err)[-3000:]
    assert elapsed < STOP_DEADLINE_S, f"exit took {elapsed:.2f} s after the signal"


class SnapshotMaker(BaseSink):
    """Stands in for the event-media output: a JPEG of the newest frame of each new event's
    source, announced through the router like the real one (record_media)."""

    name = "snapshots"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.record_media = None
        self.frames: dict[str, Any] = {}
        self.made = 0

    def frame_sources(self) -> list[str]:
        return ["cam"]

    def on_frame(self, msg: FrameMessage) -> None:
        self.frames[msg.source] = msg.frame

    def on_event(self, msg: EventMessage) -> None:
        c = msg.change
        if c.type != "new" or c.source not in self.frames or self.record_media is None:
            return
        path = self.folder / f"{c.id}.jpg"
        cv2.imwrite(str(path), self.frames[c.source])
        self.record_media({"type": "snapshot", "id": c.id, "source": c.source, "path": str(path)})
        self.made += 1


def test_the_page_of_an_rtsp_camera_shows_live_video_event_snapshots_and_no_password(
    tmp_path: Path, rtsp_server, assets_dir: Path, walk_clip: Path
) -> None:
    server = rtsp_server(user="alice", password="pw-s3cret")
    checkpoint = load_checkpoint(make_tiny_weights(assets_dir, walk_clip))
    cfg = load_config(
        None,
        {
            "sources": [{"name": "cam", "url": server.url}],
            "model": {"device": "cpu", "precision": "fp32"},
            "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
            "sinks": {"events": {"path": str(tmp_path / "events.jsonl")}},
            "web": {"port": 0},
        },
    )
    snapshots = SnapshotMaker(tmp_path)
    pipeline = Pipeline(
        cfg,
        checkpoint,
        build_engine(checkpoint.model, "cpu", "fp32"),
        print_fn=lambda line: None,
        sinks=(snapshots,),
    )
    snapshots.record_media = pipeline.router.record_media
    web = next(w.sink for w in pipeline.router.workers if w.sink.name == "web")
    runner = threading.Thread(target=pipeline.run, daemon=True)
    runner.start()
    try:
        with browser() as b:
            page = new_page(b)
            page.goto(web.url)
            assert_live_image_changes(page, "cam")
            thumb = page.locator("#events img.thumb").first
            thumb.wait_for(state="visible", timeout=60_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#events img.thumb')]"
                ".some(i => i.complete && i.naturalWidth === 320)",
                timeout=30_000,
            )
            assert snapshots.made >= 1
            shown = [page.content().encode()] + [
                get(web.server.port, path).body
                for path in ("/api/sources", "/api/stats", "/metrics", "/readyz", "/api/events")
            ]
            assert b"alice:***@127.0.0.1" in shown[1]  # the camera URL, redacted
            assert not [body for body in shown if b"pw-s3cret" in body]
    finally:
        pipeline.stop("test over")
        runner.join(30)
    assert not runner.is_alive()


def metric_values(port: int) -> dict[tuple[str, str], float]:
    r = get(port, "/metrics")
    assert r.status == 200, r.body[:200]
    return {
        (s.name, s.labels.get("source", "")): s.value
        for family in text_string_to_metric_families(r.body.decode())
        for s in family.samples
    }


def windows(port: int) -> int:
    return int(get(port, "/api/stats", AUTH).json()["sources"]["cam"]["windows"])


class Abuse:
    """200 connections at once (half sending a request a byte at a time, half idle), viewers
    that never read, a slow reader, traversal attempts, wrong tokens and a huge request line."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._slow_reader, daemon=True),
            threading.Thread(target=self._junk, daemon=True),
        ]

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sockets.append(s)
        return s

    def start(self) -> None:
        for i in range(200):
            s = self._connect()
            if i % 2:
                s.sendall(b"GET /api/ev")  # a request that never ends
        for _ in range(3):  # viewers that never read
            s = self._connect()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(
                f"GET /api/sources/cam/stream.mjpeg?token={TOKEN} HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\n\r\n".encode()
            )
        for t in self.threads:
            t.start()

    def _slow_reader(self) -> None:
        s = self._connect()
        s.sendall(f"GET /api/live?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        with contextlib.suppress(OSError):
            while not self.stop.wait(0.5):
                s.recv(512)

    def _junk(self) -> None:
        traversal = [
            "/api/events/..%2F..%2F..%2Fetc%2Fpasswd",
            "/api/sources/..%2F..%2Fetc/latest.jpg",
            "/../../../../etc/passwd",
        ]
        while not self.stop.is_set():
            for path in traversal:
                r = get(self.port, path, AUTH)
                if r.status != 404 or b"root:" in r.body:
                    self.errors.append(f"{path}: {r.status}")
            for path, headers in (
                ("/api/events?token=wrong", {}),
                ("/api/events", {"Authorization": "Bearer wrong"}),
            ):
                if get(self.port, path, headers).status != 401:
                    self.errors.append(f"a wrong token was let in: {path} {headers}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=10) as s,
            ):
                s.sendall(b"GET /" + b"x" * 100_000 + b" HTTP/1.1\r\n\r\n")
                if b" 414 " not in s.recv(100):
                    self.errors.append("a huge request line was not refused with 414")
            self.stop.wait(0.2)

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def test_readyz_follows_the_rtsp_camera_and_abuse_stops_neither_detection_nor_the_server(
    tmp_path: Path, rtsp_server
) -> None:
    server = rtsp_server()
    config = tmp_path / "cam.yaml"
    options = {"stall_timeout_s": 3, "read_timeout_s": 2, "backoff_initial_s": 0.5}
    options["backoff_max_s"] = 1
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "cam", "url": server.url, "options": options}],
                "model": {"device": "cpu", "precision": "fp32", "width": 0.0625},
                "sinks": {"events": {"path": str(tmp_path / "events.jsonl")}},
                "web": {"token": TOKEN, "public": ["healthz", "readyz", "metrics"]},
            }
        )
    )
    with streamdet_run(config, tmp_path) as run:
        port = run.port
        wait_for(lambda: get(port, "/readyz").status == 200, 60, "/readyz 200")
        m = metric_values(port)
        assert m[("streamdet_source_up", "cam")] == 1
        assert m[("streamdet_frames_total", "cam")] > 0
        assert m[("streamdet_last_frame_timestamp_seconds", "cam")] > time.time() - 30

        abuse = Abuse(port)
        abuse.start()
        try:
            before = windows(port)
            started = time.monotonic()
            wait_for(lambda: windows(port) >= before + 10, 60, "10 more windows under abuse")
            took = time.monotonic() - started
            assert get(port, "/healthz").status == 200
            assert get(port, "/api/events", AUTH).status == 200
        finally:
            abuse.end()
        assert not abuse.errors, abuse.errors[:5]
        print(f"10 windows took {took:.1f} s under abuse")

        server.kill()
        r = wait_for(
            lambda: (r := get(port, "/readyz")).status == 503 and r, 60, "/readyz 503 when killed"
        )
        assert r.json()["sources"]["cam"]["ready"] is False and r.json()["sources"]["cam"]["why"]
        wait_for(
            lambda: metric_values(port)[("streamdet_source_up", "cam")] == 0,
            30,
            "streamdet_source_up 0 once the camera is found gone",
        )
        server.start()
        wait_for(lambda: get(port, "/readyz").status == 200, 90, "/readyz 200 once it is back")
        wait_for(  # from the run's figures, which the output gets twice a second
            lambda: metric_values(port)[("streamdet_reconnects_total", "cam")] >= 1,
            10,
            "the reconnect counted",
        )
        elapsed = run.stop()
    assert run.proc.returncode == 0, "".join(run.err)[-3000:]
    assert elapsed < STOP_DEADLINE_S, f"exit took {elapsed:.2f} s after the signal"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--web", "0.0.0.0:0"], "error: web.host 0.0.0.0 is not a loopback address"),
        (["--web", "[::]:0"], "error: web.host :: is not a loopback address"),
    ],
)
def test_a_network_bind_without_a_token_is_one_error_line_before_the_model_is_built(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from streamdet import runner
    from streamdet.cli import main

    monkeypatch.setattr(runner, "load_model", lambda cfg: pytest.fail("the model was built"))
    assert main(["run", *args, "--max-seconds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_a_port_in_use_is_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from streamdet.cli import main

    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["run", "--web", str(port), "--max-seconds", "1"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert code == 2
    assert err == [f"error: web: cannot listen on 127.0.0.1:{port} (Address already in use)"]


@pytest.mark.parametrize("value", ["http", "99999", "host:", ":80x", "1.2.3.4:-1"])
def test_a_bad_web_address_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from streamdet.cli import main

    assert main(["run", "--web", value]) == 2
    assert "[HOST:]PORT" in capsys.readouterr().err
