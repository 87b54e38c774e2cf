"""Shared fixtures: real test videos and a real RTSP server in a subprocess.

The RTSP server (``tests/rtsp_server.py``) runs under Debian's system python, which has the
GStreamer bindings that ``.ci/install-system.sh`` installs; the tests themselves use this
python's OpenCV as the client.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from assets import INSTALL_HINT, vtest_path
from tiny_model import random_checkpoint

from streamdet.inference import build_engine
from streamdet.models.weights import Checkpoint

# Every test runs in its own tmp dir, and the last one checks the checkout is unchanged.
pytest_plugins = ("checkout_guard",)

# OpenCV's FFmpeg backend reads this once, at the first open in the process, so it is set
# before any test runs. TCP avoids lost UDP packets; a short analyzeduration opens fast.
os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp|analyzeduration;500000")

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).resolve().parent / "rtsp_server.py"
READY_TIMEOUT_S = 15.0  # the first GStreamer start on a machine builds its plugin registry
STOP_TIMEOUT_S = 5.0
RTSP_SIZE = (320, 240)  # (width, height) of every served stream
RTSP_FPS = 10


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    """A seeded random tiny model (modules that need one that detects something override this)."""
    return random_checkpoint()


@pytest.fixture(scope="module")
def engine(checkpoint: Checkpoint):
    """The module's ``checkpoint`` on the plain fp32 CPU path (fast to build, exact)."""
    return build_engine(checkpoint.model, "cpu", "fp32")


@pytest.fixture
def vtest_video() -> Path:
    """OpenCV's ``vtest.avi``: 768x576, 10 fps, 795 frames (skips if not installed)."""
    return vtest_path()


@pytest.fixture(scope="session")
def rtsp_available() -> None:
    """Skip unless the system python has GstRtspServer and ffmpeg is on PATH."""
    if shutil.which("ffmpeg") is None:
        pytest.skip(f"ffmpeg is not installed; {INSTALL_HINT}")
    check = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
        "from gi.repository import Gst, GstRtspServer; Gst.init(None)"
    )
    try:
        result = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, timeout=60)
    except OSError as exc:
        pytest.skip(f"cannot run {SYSTEM_PYTHON} ({exc}); {INSTALL_HINT}")
    if result.returncode != 0:
        error = (result.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        pytest.skip(f"{SYSTEM_PYTHON} cannot import GstRtspServer ({error}); {INSTALL_HINT}")


@pytest.fixture(scope="session")
def rtsp_video(tmp_path_factory: pytest.TempPathFactory, rtsp_available: None) -> Path:
    """``vtest.avi`` encoded once per session as the stream serves it.

    H.264 at 320x240, 10 fps, no B-frames and a keyframe every 10 frames (B-frames made
    OpenCV take 14 s to open a stream).
    """
    src = vtest_path()
    dst = tmp_path_factory.mktemp("rtsp") / "vtest_320x240_10fps.mp4"
    width, height = RTSP_SIZE
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(src),
            "-vf",
            f"fps={RTSP_FPS},scale={width}:{height}",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-tune",
            "zerolatency",
            "-bf",
            "0",
            "-g",
            "10",
            "-pix_fmt",
            "yuv420p",
            "-an",
            str(dst),
        ],
        check=True,
        timeout=120,
    )
    return dst


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RtspServer:
    """One ``tests/rtsp_server.py`` subprocess, restartable on the same port.

    Attributes: ``url``, ``port``, ``proc`` (None while stopped), ``size`` (width, height)
    and ``fps`` of the stream, ``switch`` (``(frames, (width, height))``: each client's stream
    goes on at that size after that many frames, the file starting over; None: no switch).

    The server runs in its own process group so that signals reach its ffmpeg decoders too.
    """

    def __init__(
        self,
        source_args: list[str],
        port: int,
        log_path: Path,
        path: str = "/cam",
        user: str | None = None,
        password: str | None = None,
        size: tuple[int, int] = RTSP_SIZE,
        switch: tuple[int, tuple[int, int]] | None = None,
    ) -> None:
        self.port = port
        self.path = path
        self.user = user
        self.password = password
        self.log_path = log_path
        self.size = size
        self.switch = switch
        self.fps = RTSP_FPS
        self.proc: subprocess.Popen[bytes] | None = None
        self.source_args = source_args

    @property
    def command(self) -> list[str]:
        """The server's command line, for the current ``size`` and ``switch``."""
        command = [
            SYSTEM_PYTHON,
            str(SERVER_SCRIPT),
            "--port",
            str(self.port),
            "--path",
            self.path,
            "--size",
            "x".join(map(str, self.size)),
            "--fps",
            str(self.fps),
            *self.source_args,
        ]
        if self.switch is not None:
            frames, (width, height) = self.switch
            command += ["--switch", f"{frames}:{width}x{height}"]
        if self.user is not None:
            command += ["--user", self.user, "--password", self.password or ""]
        return command

    @property
    def url(self) -> str:
        """``rtsp://[user:password@]127.0.0.1:PORT/PATH`` with the real credentials."""
        credentials = f"{self.user}:{self.password}@" if self.user is not None else ""
        return f"rtsp://{credentials}127.0.0.1:{self.port}{self.path}"

    def url_with(self, user: str, password: str) -> str:
        """The URL with other credentials, e.g. a wrong password."""
        return f"rtsp://{user}:{password}@127.0.0.1:{self.port}{self.path}"

    def start(self) -> None:
        """Start the server and wait until it prints READY."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.proc.stdout], [], [], remaining)
            line = self.proc.stdout.readline() if readable else b""
            if line.strip() == b"READY":
                return
            if readable and not line:  # stdout closed: the server exited
                break
        self.kill()
        raise RuntimeError(
            f"RTSP server did not print READY within {READY_TIMEOUT_S} s; "
            f"log:\n{self.log_path.read_text(errors='replace')[-2000:]}"
        )

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        self.proc.wait(timeout=timeout)
        self.proc.stdout.close()
        self.proc = None

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crashed camera would drop off."""
        if self.proc is not None:
            self._signal(signal.SIGKILL)
            self._reap(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the server cleanly (SIGTERM), killing it if it does not exit in time."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)  # a paused server handles SIGTERM only once resumed
        try:
            self._reap(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, size: tuple[int, int] | None = None) -> None:
        """Stop the server (if running) and start a new one on the same port, serving ``size``
        (width, height) if given: a camera reconfigured, which drops its clients."""
        self.stop()
        if size is not None:
            self.size = size
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but no data flows."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        self._signal(signal.SIGCONT)


@pytest.fixture
def rtsp_server(
    request: pytest.FixtureRequest, tmp_path: Path, rtsp_available: None
) -> Iterator[Callable[..., RtspServer]]:
    """Factory starting real RTSP servers on free ports; all are stopped after the test.

    ``rtsp_server(video=None, *, pattern=False, user=None, password=None, path="/cam",
    size=(320, 240), switch=None)`` returns a started :class:`RtspServer` streaming H.264 of
    ``size`` at 10 fps, looping forever. ``video`` defaults to :func:`rtsp_video` (vtest.avi);
    ``pattern=True`` serves a moving test pattern instead. ``switch=(frames, (width, height))``
    (video only) changes each client's stream to that size after that many frames, in the same
    session.

    Example:
        server = rtsp_server(user="alice", password="s3cret")
        cap = cv2.VideoCapture(server.url, cv2.CAP_FFMPEG)
    """
    servers: list[RtspServer] = []

    def start(
        video: str | Path | None = None,
        *,
        pattern: bool = False,
        user: str | None = None,
        password: str | None = None,
        path: str = "/cam",
        size: tuple[int, int] = RTSP_SIZE,
        switch: tuple[int, tuple[int, int]] | None = None,
    ) -> RtspServer:
        if pattern:
            source_args = ["--pattern"]
        else:
            source_args = ["--video", str(video or request.getfixturevalue("rtsp_video"))]
        server = RtspServer(
            source_args,
            free_port(),
            tmp_path / f"rtsp_server_{len(servers)}.log",
            path=path,
            user=user,
            password=password,
            size=size,
            switch=switch,
        )
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
        if server.log_path.exists() and server.log_path.stat().st_size:
            sys.stderr.write(server.log_path.read_text(errors="replace")[-2000:])


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """``streamdet run`` installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the session's end-to-end tests for clips and tiny weights they make."""
    folder = tmp_path_factory.getbasetemp() / "streamdet-e2e"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def walk_clip(assets_dir: Path) -> Path:
    """The first 100 frames of vtest.avi at 320x240 (see tests/tiny_model.py)."""
    from tiny_model import make_walk_clip

    return make_walk_clip(assets_dir)


@pytest.fixture(scope="session")
def compiled_kernels():
    """streamdet.kernels' compiled functions; Numba is a dependency, so failing to load is a failure."""
    from streamdet import kernels

    loaded = kernels.get()
    assert loaded is not None, "Numba kernels failed to load (see the log)"
    return loaded


@pytest.fixture(params=["compiled", "opencv"])
def preprocess_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a preprocessing test through the compiled kernel and through the OpenCV route the
    package falls back to without Numba."""
    from streamdet import kernels

    if request.param == "compiled":
        request.getfixturevalue("compiled_kernels")
    else:
        monkeypatch.setattr(kernels, "get", lambda: None)
    return request.param


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Factory starting real Mosquitto brokers (tests/mosquitto.py) on free ports; all are
    killed after the test. Skips when /usr/sbin/mosquitto is not installed.

    ``mosquitto(users=None, persistence=False, port=None, tls=None)`` returns a started
    :class:`mosquitto.Mosquitto` (``.port``, ``.kill()``, ``.stop()``, ``.restart()``,
    ``.set_users()``, ``.save()``, ``.log_text()``).
    """
    from mosquitto import MOSQUITTO, Mosquitto

    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"{MOSQUITTO} is not installed; {INSTALL_HINT}")
    brokers: list[Mosquitto] = []

    def start(**kwargs: object) -> Mosquitto:
        folder = tmp_path / f"mosquitto{len(brokers)}"
        folder.mkdir()
        broker = Mosquitto(folder, **kwargs)
        brokers.append(broker)
        broker.start()
        return broker

    yield start
    for broker in brokers:
        broker.kill()


# -- event media: a video with one event, weights that detect it, the counter camera -------------


@pytest.fixture(scope="session")
def event_video(assets_dir: Path) -> Path:
    """A real clip with one event and a burnt-in frame counter (tests/media_helpers.py)."""
    from media_helpers import make_event_video

    return make_event_video(assets_dir, vtest_path())


@pytest.fixture(scope="session")
def event_weights(assets_dir: Path, event_video: Path) -> Path:
    """Tiny weights that detect ``event_video``'s event."""
    from media_helpers import make_event_weights

    return make_event_weights(assets_dir, event_video)


@pytest.fixture
def camera(rtsp_available: None, tmp_path: Path, event_video: Path) -> Iterator[RtspServer]:
    """The RTSP test camera playing ``event_video`` with its counter, a keyframe every GOP."""
    from media_helpers import GOP

    server = RtspServer(
        ["--video", str(event_video), "--counter", "--gop", str(GOP)],
        free_port(),
        tmp_path / "rtsp_server.log",
    )
    server.start()
    yield server
    server.stop()
