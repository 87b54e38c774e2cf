"""The RTSP test server, seen through OpenCV's FFmpeg backend as the detector will see it."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np
import pytest

OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 3000


@contextmanager
def open_stream(url: str, read_timeout_ms: int = READ_TIMEOUT_MS) -> Iterator[cv2.VideoCapture]:
    """An FFmpeg capture of ``url`` with open and read timeouts, released on exit."""
    cap = cv2.VideoCapture(
        url,
        cv2.CAP_FFMPEG,
        [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            OPEN_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            read_timeout_ms,
        ],
    )
    try:
        yield cap
    finally:
        cap.release()


def read_frames(cap: cv2.VideoCapture, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Read ``n`` frames of ``size`` (width, height), failing the test on a failed read."""
    frames = []
    for index in range(n):
        ok, frame = cap.read()
        assert ok, f"read() failed at frame {index} of {n}"
        assert frame.shape == (size[1], size[0], 3), f"expected {size} frames, got {frame.shape}"
        frames.append(frame)
    return frames


def first_frame(path: object) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    try:
        ok, frame = cap.read()
        assert ok, f"cannot read {path}"
        return frame
    finally:
        cap.release()


@pytest.mark.timeout(15)
def test_opencv_reads_served_video_in_real_time(rtsp_server, rtsp_video):
    server = rtsp_server()
    with open_stream(server.url) as cap:
        assert cap.isOpened()
        started = time.monotonic()
        frames = read_frames(cap, 30, server.size)
        elapsed = time.monotonic() - started

    # Real time is 3 s for 30 frames; a few frames may arrive buffered at once after opening.
    # The upper bound only says the reader keeps up (3x, for a busy machine).
    assert 2.0 <= elapsed <= 9.0, f"30 frames took {elapsed:.2f} s at {server.fps} fps"
    # Each client starts at the video's first frame: the stream is the real video, not noise.
    difference = cv2.absdiff(frames[0], first_frame(rtsp_video)).mean()
    assert difference < 10, f"first frame differs from the video's by {difference:.1f} on average"


@pytest.mark.timeout(15)
def test_opencv_reads_test_pattern(rtsp_server):
    server = rtsp_server(pattern=True)
    with open_stream(server.url) as cap:
        read_frames(cap, 20, server.size)


@pytest.mark.timeout(30)
def test_read_fails_soon_after_server_is_killed(rtsp_server):
    """The closed connection ends the read, long before the (here 10 s) read timeout would."""
    server = rtsp_server()
    with open_stream(server.url, read_timeout_ms=10_000) as cap:
        read_frames(cap, 5, server.size)
        server.kill()
        killed = time.monotonic()
        buffered = 0
        while cap.read()[0]:
            buffered += 1
            assert buffered <= 20, "read() kept returning frames after the server died"
        elapsed = time.monotonic() - killed

    assert elapsed < 5.0, f"read() took {elapsed:.2f} s to fail after the kill"


@pytest.mark.timeout(15)
def test_read_blocks_for_the_read_timeout_while_server_is_paused(rtsp_server):
    """A hung camera blocks read() for the read timeout, and may still return True.

    After the timeout FFmpeg drains the decoder, so with frame threading read() can return
    True with an old frame after each 3 s wait (twice on 2 cores) before it returns False:
    a stalled stream must be detected by how long read() takes, not only by its result.
    """
    server = rtsp_server()
    with open_stream(server.url) as cap:
        read_frames(cap, 5, server.size)
        server.pause()
        for _ in range(20):  # frames already in flight come back at once; then read() blocks
            started = time.monotonic()
            cap.read()
            elapsed = time.monotonic() - started
            if elapsed > 0.5:
                break
    timeout_s = READ_TIMEOUT_MS / 1000
    assert timeout_s - 0.5 <= elapsed <= timeout_s + 2.0, f"read() blocked {elapsed:.2f} s"

    server.resume()
    with open_stream(server.url) as cap:
        read_frames(cap, 5, server.size)


@pytest.mark.timeout(15)
def test_restarted_server_serves_on_the_same_port(rtsp_server):
    server = rtsp_server()
    url, port = server.url, server.port
    server.kill()
    with open_stream(url) as cap:
        assert not cap.isOpened()

    server.restart()
    assert (server.url, server.port) == (url, port)
    with open_stream(server.url) as cap:
        read_frames(cap, 5, server.size)


@pytest.mark.timeout(15)
@pytest.mark.parametrize(("password", "opens"), [("s3cret", True), ("wrong", False)])
def test_basic_auth_admits_only_the_right_password(rtsp_server, password, opens):
    server = rtsp_server(pattern=True, user="alice", password="s3cret")
    assert server.url == f"rtsp://alice:s3cret@127.0.0.1:{server.port}/cam"
    with open_stream(server.url_with("alice", password)) as cap:
        assert cap.isOpened() == opens
        if opens:
            read_frames(cap, 5, server.size)


@pytest.mark.timeout(15)
def test_server_without_credentials_in_url_is_refused(rtsp_server):
    server = rtsp_server(pattern=True, user="alice", password="s3cret")
    with open_stream(f"rtsp://127.0.0.1:{server.port}/cam") as cap:
        assert not cap.isOpened()


@pytest.mark.timeout(15)
def test_server_exits_cleanly_on_sigterm(rtsp_server):
    server = rtsp_server()
    with open_stream(server.url) as cap:
        read_frames(cap, 2, server.size)
        proc = server.proc
        server.stop()
    assert proc.returncode == 0


def frame_sizes(url: str, count: int) -> list[tuple[int, int]]:
    """(width, height) of the first ``count`` frames of ``url`` as FFmpeg itself decodes them."""
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-rtsp_transport",
            "tcp",
            "-select_streams",
            "v:0",
            "-show_entries",
            "frame=width,height",
            "-read_intervals",
            f"%+#{count}",
            "-of",
            "csv=p=0",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [(int(w), int(h)) for w, h in re.findall(r"^(\d+),(\d+)", result.stdout, re.MULTILINE)]


@pytest.mark.timeout(45)
def test_switch_changes_the_size_mid_session(rtsp_server):
    server = rtsp_server(switch=(20, (480, 360)))
    assert frame_sizes(server.url, 30) == [(320, 240)] * 20 + [(480, 360)] * 10


@pytest.mark.timeout(30)
def test_restart_with_a_size_serves_that_size_on_the_same_port(rtsp_server):
    server = rtsp_server(pattern=True)
    url = server.url
    server.restart(size=(480, 360))
    assert server.url == url
    with open_stream(server.url) as cap:
        read_frames(cap, 5, (480, 360))
