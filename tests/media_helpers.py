"""Helpers of the media tests: the burnt-in frame counter, a stream with events in it, a real
PacketRing fed from the RTSP test camera with PyAV, and MP4 inspection.

The RTSP test server burns each frame's number into the picture (``tests/rtsp_server.py
--counter``); :func:`read_counter` reads it back from a decoded frame. :func:`make_event_video`
makes a looping video whose frames ``EVENT_FRAMES`` of every ``PERIOD`` are colour-negated (the
"event"), and :func:`make_event_weights` a tiny model fitted to score exactly those windows high.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from streamdet.sources.packets import EncodedPacket, PacketRing, StreamInfo

# The layout of the counter tests/rtsp_server.py burns in (it runs under the system python, with
# GStreamer, and cannot be imported here): keep the two in step.
COUNTER_BITS = 16
COUNTER_BLOCK = 12
COUNTER_X = 4
COUNTER_Y = 4

FPS = 10
GOP = 10  # the test camera's keyframe interval, in frames
PERIOD = 160  # frames of the event video, looped by the server
EVENT_FRAMES = (90, 130)  # [first, last) negated frames in each period: the event


def read_counter(frame_bgr: np.ndarray) -> int:
    """The frame number the test camera burnt into ``frame_bgr`` (see ``rtsp_server.py``)."""
    gray = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
    number = 0
    margin = COUNTER_BLOCK // 4
    for bit in range(COUNTER_BITS):
        x = COUNTER_X + bit * COUNTER_BLOCK
        block = gray[
            COUNTER_Y + margin : COUNTER_Y + COUNTER_BLOCK - margin,
            x + margin : x + COUNTER_BLOCK - margin,
        ]
        number = number << 1 | int(block.mean() > 128)
    return number


def burn_counter(frame_bgr: np.ndarray, number: int) -> None:
    """Burn ``number`` into a frame as the test camera does (``rtsp_server.py --counter``)."""
    for bit in range(COUNTER_BITS):
        value = 235 if number >> (COUNTER_BITS - 1 - bit) & 1 else 16
        x = COUNTER_X + bit * COUNTER_BLOCK
        frame_bgr[COUNTER_Y : COUNTER_Y + COUNTER_BLOCK, x : x + COUNTER_BLOCK] = value


def make_event_video(folder: Path, source: Path) -> Path:
    """``PERIOD`` frames of ``source`` at 320x240, 10 fps, H.264 with a keyframe every ``GOP``
    frames, colour-negated in ``EVENT_FRAMES``, each frame's number burnt in (cached)."""
    path = folder / "event_video.mp4"
    if path.exists():
        return path
    cap = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG)
    encoder = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24",
         "-s", "320x240", "-r", str(FPS), "-i", "pipe:0", "-c:v", "libx264", "-preset",
         "veryfast", "-bf", "0", "-g", str(GOP), "-pix_fmt", "yuv420p", str(path)],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert encoder.stdin is not None
    first, last = EVENT_FRAMES
    for n in range(PERIOD):
        ok, frame = cap.read()
        assert ok, f"{source} has fewer than {PERIOD} frames"
        frame = cv2.resize(frame, (320, 240), interpolation=cv2.INTER_AREA)
        if first <= n < last:
            frame = 255 - frame
        burn_counter(frame, n)
        encoder.stdin.write(frame.tobytes())
    cap.release()
    encoder.stdin.close()
    assert encoder.wait(120) == 0
    return path


def make_event_weights(folder: Path, video: Path) -> Path:
    """A 2-class ("none", "event") tiny C3D_BN whose "event" logit is fitted (ridge regression
    on fc8's input) to follow the share of negated frames in a window, at every phase."""
    import torch

    from streamdet.models.c3d import C3D_BN
    from streamdet.models.weights import save_checkpoint
    from streamdet.preprocess import DEFAULT_CONTRACT, preprocess_frame

    path = folder / "event_model.safetensors"
    if path.exists():
        return path
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    frames = []
    while (result := cap.read())[0]:
        frames.append(preprocess_frame(result[1], DEFAULT_CONTRACT))
    cap.release()
    frames += frames[:16]  # the loop: windows across its seam too
    x = np.stack(frames, 1)  # T x (3, 112, 112) -> (3, T, 112, 112)
    first, last = EVENT_FRAMES
    starts = list(range(0, PERIOD, 2))
    windows = torch.from_numpy(np.stack([x[:, s : s + 16] for s in starts]))  # (N, 3, 16, H, W)
    share = torch.tensor(
        [sum(first <= (s + i) % PERIOD < last for i in range(16)) / 16 for s in starts]
    )
    target = 10.0 * share - 5.0
    torch.manual_seed(0)
    model = C3D_BN(num_classes=2, width=0.0625)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None
    with torch.no_grad():
        model.train()
        model(windows)
        model.eval()
        h = model.relu(model.fc7(model.relu(model.fc6(model.features(windows).flatten(1)))))
        mean = h.mean(0)
        centred = h - mean
        gram = centred @ centred.T
        ridge = 1e-3 * gram.trace() / len(starts)
        coef = torch.linalg.solve(gram + ridge * torch.eye(len(starts)), target - target.mean())
        weight = centred.T @ coef
        bias = target.mean() - mean @ weight
        model.fc8.weight.copy_(torch.stack([torch.zeros_like(weight), weight]))
        model.fc8.bias.copy_(torch.stack([torch.zeros_like(bias), bias]))
    save_checkpoint(path, model, class_names=("none", "event"))
    return path


@dataclass
class FedPacket:
    """What the test saw of a packet: its number on the camera (from its decoded frame)."""

    counter: int
    time: float
    keyframe: bool
    data: bytes


@dataclass
class RtspFeeder:
    """Demuxes the test camera with PyAV in a thread, filling ``ring`` as the capture backend
    will, and remembers every packet's burnt-in counter and time."""

    url: str
    ring: PacketRing
    on_frame: Callable[[int, np.ndarray], None] | None = None
    packets: list[FedPacket] = field(default_factory=list)
    info: StreamInfo | None = None
    profile: str = ""
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> RtspFeeder:
        threading.Thread(target=self._run, name="test-feeder", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            self._demux()
        except Exception as exc:  # the camera went away: the test looks at what came
            self.error = exc
        finally:
            self.ended.set()

    def _demux(self) -> None:
        options = {"rtsp_transport": "tcp", "analyzeduration": "500000"}
        with av.open(self.url, options=options, timeout=(10.0, 3.0)) as container:
            stream = container.streams.video[0]
            ctx = stream.codec_context
            self.info = StreamInfo(
                ctx.name,
                ctx.width,
                ctx.height,
                stream.time_base,
                stream.average_rate or Fraction(FPS),
                ctx.extradata or b"",
            )
            self.profile = ctx.profile or ""
            self.ring.start_segment(self.info)
            for packet in container.demux(stream):
                if self.stop.is_set():
                    return
                if packet.size == 0:
                    continue
                frames = packet.decode()
                if not frames:
                    continue
                picture = frames[0].to_ndarray(format="bgr24")
                counter = read_counter(picture)
                now = time.time()
                data = bytes(packet)
                self.ring.append(
                    EncodedPacket(
                        data,
                        packet.pts,
                        packet.dts,
                        packet.duration,
                        packet.is_keyframe,
                        now,
                        counter,
                    )
                )
                with self.lock:
                    self.packets.append(FedPacket(counter, now, packet.is_keyframe, data))
                if self.on_frame is not None:
                    self.on_frame(counter, picture)

    def wait_for(self, counter: int, timeout: float = 60.0) -> FedPacket:
        """The packet of frame ``counter`` once it came (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for p in reversed(self.packets):
                    if p.counter == counter:
                        return p
            if self.ended.is_set():
                break
            time.sleep(0.05)
        raise AssertionError(f"frame {counter} never came (error: {self.error})")

    def by_counter(self) -> dict[int, FedPacket]:
        with self.lock:
            return {p.counter: p for p in self.packets}


@dataclass(frozen=True)
class ClipInfo:
    """What a clip holds, read back with PyAV and ffprobe."""

    counters: list[int]
    profile: str
    width: int
    height: int
    codec: str
    sps: bytes
    first_idr: bytes
    probe_duration_s: float
    probe_frames: int
    decode_errors: str


def nal_units(data: bytes, *, length_prefixed: bool) -> list[bytes]:
    """H.264 NAL units of an Annex-B or a length-prefixed (MP4) buffer."""
    units = []
    if length_prefixed:
        i = 0
        while i + 4 <= len(data):
            size = int.from_bytes(data[i : i + 4], "big")
            units.append(data[i + 4 : i + 4 + size])
            i += 4 + size
        return units
    for part in data.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01").split(b"\x00\x00\x01"):
        if part:
            units.append(part.rstrip(b"\x00"))
    return units


def sps_of_avcc(avcc: bytes) -> bytes:
    """The first SPS of an ``avcC`` record (MP4's H.264 extradata)."""
    size = int.from_bytes(avcc[6:8], "big")
    return avcc[8 : 8 + size]


def inspect_clip(path: Path) -> ClipInfo:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        extradata = ctx.extradata or b""
        first_idr = b""
        counters = []
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if not first_idr:
                units = nal_units(bytes(packet), length_prefixed=True)
                first_idr = next((u for u in units if u[0] & 0x1F == 5), b"")
            for frame in packet.decode():
                counters.append(read_counter(frame.to_ndarray(format="bgr24")))
        info = (ctx.profile or "", ctx.width, ctx.height, ctx.name)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format",
         "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    data = json.loads(probe.stdout)
    decode = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return ClipInfo(
        counters=counters,
        profile=info[0],
        width=info[1],
        height=info[2],
        codec=info[3],
        sps=sps_of_avcc(extradata) if extradata[:1] == b"\x01" else b"",
        first_idr=first_idr,
        probe_duration_s=float(data["format"]["duration"]),
        probe_frames=int(data["streams"][0]["nb_read_frames"]),
        decode_errors=probe.stderr + decode.stderr,
    )


def source_sps_and_idr(info: StreamInfo, keyframe: bytes) -> tuple[bytes, bytes]:
    """The camera's SPS (from its extradata, else in-band) and a keyframe's IDR slice."""
    units = nal_units(info.extradata + keyframe, length_prefixed=False)
    sps = next(u for u in units if u[0] & 0x1F == 7)
    idr = next(u for u in units if u[0] & 0x1F == 5)
    return sps, idr


def jpeg_counter(path: Path) -> int:
    return read_counter(cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR))


# -- a media output fed from the test camera ------------------------------------------------------


def event_change(
    kind: str,
    start: FedPacket,
    end: FedPacket,
    *,
    event_id: str = "run1-cam-event-1",
    score: float = 0.9,
    end_reason: str | None = None,
) -> Any:
    """An :class:`~streamdet.events.EventChange` of source ``cam`` from ``start`` to ``end``."""
    from streamdet.events import EventChange

    return EventChange(
        kind,  # type: ignore[arg-type]
        event_id,
        "cam",
        "event",
        1,
        score,
        score,
        0.6,
        start.time,
        end.time,
        start.counter,
        end.counter,
        max(start.counter, end.counter - 15),
        end.counter,
        end.time,
        end_reason,  # type: ignore[arg-type]
    )


class MediaLines:
    """The media lines an output recorded (its ``record_media``), waited on by tests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.lines: list[dict[str, Any]] = []

    def __call__(self, fields: Any) -> Any:
        with self._cond:
            self.lines.append(dict(fields))
            self._cond.notify_all()
        return fields

    def wait(self, kind: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len([o for o in self.lines if o["type"] == kind]) >= count, timeout
            )
            assert ok, f"no {kind} line in {timeout} s: {self.lines}"
            return [o for o in self.lines if o["type"] == kind]


def main(argv: list[str]) -> int:
    """``python media_helpers.py URL MEDIA_DIR``: record a clip of an event that never ends from
    the test camera, print ``WRITING <temp file>`` once it is being written, then wait (for the
    test to SIGKILL this process)."""
    from streamdet.config import MediaConfig
    from streamdet.media.clips import temp_path
    from streamdet.media.sink import MediaSink, MediaSource
    from streamdet.sinks.base import EventMessage, SinkWorker

    url, folder = argv
    ring = PacketRing(max_seconds=20.0, max_bytes=64 * 1024 * 1024)
    feeder = RtspFeeder(url, ring).start()
    cfg = MediaConfig.model_validate(
        {"dir": folder, "clips": {"pre_capture_s": 1.0}, "snapshots": {"enabled": False}}
    )
    stop = threading.Event()
    sink = MediaSink(
        cfg, sources={"cam": MediaSource("cam", ring=ring)}, record_media=MediaLines(),
        stop_event=stop,
    )  # fmt: skip
    worker = SinkWorker(sink)
    worker.start()
    start = feeder.wait_for(15)
    change = event_change("new", start, start)
    worker.offer_event(EventMessage(change, None, None))
    temp = temp_path(Path(folder) / "cam" / f"{change.id}.mp4")
    deadline = time.monotonic() + 60
    while not (temp.exists() and temp.stat().st_size > 0):
        assert time.monotonic() < deadline, "the clip was never started"
        time.sleep(0.05)
    print(f"WRITING {temp}", flush=True)
    stop.wait()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
