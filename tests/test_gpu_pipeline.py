"""The GPU path end to end on a CPU: frames as torch tensors (decoded by PyAV), torch
preprocessing, device rings and device batches on torch's ``cpu`` device. Everything but NVDEC
and CUDA runs here; the capture's reliability rules hold for its sources as for host ones."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
import torch
from test_capture import CONTRACT, FRAME_SHAPE, FakeSource, Reader, frames, spans, wait_until

from streamdet import demo, kernels
from streamdet.buffer import RingBuffer
from streamdet.cli import main
from streamdet.config import load_config
from streamdet.device_buffer import DeviceRingBuffer
from streamdet.errors import SourceError
from streamdet.inference import build_engine
from streamdet.models.weights import load_checkpoint
from streamdet.pipeline import Pipeline
from streamdet.preprocess_torch import preprocess_tensor
from streamdet.report import RunSummary
from streamdet.sources import Backoff, CaptureThread, Pacing, SourceKind, Status, StatusChange
from streamdet.sources.decoding import DevicePath, TensorFrames

CPU_PATH = DevicePath(torch.device("cpu"), nvdec=False)
SEAMS = ["host", "device"]


def seam_capture(seam: str, opener: Callable[[], Any], **kwargs: Any) -> CaptureThread:
    """A live stream's capture of fake sources, on the host path or the device path."""
    kernels.get()  # as Pipeline.run does, before any short stall timeout starts counting
    options: dict[str, Any] = dict(length=16, stride=8, frame_shape=FRAME_SHAPE)
    extra: dict[str, Any] = {}
    if seam == "host":
        ring: RingBuffer = RingBuffer("src", **options)
    else:
        ring = DeviceRingBuffer("src", device="cpu", **options)
        extra["preprocess"] = preprocess_tensor
        plain = opener

        def opener() -> Any:
            return TensorFrames(plain(), torch.device("cpu"))

    return CaptureThread(
        "src",
        opener,
        ring,
        CONTRACT,
        threading.Event(),
        kind=SourceKind.STREAM,
        pacing=Pacing.LIVE,
        backoff=Backoff(0.01, 0.02),
        **extra,
        **kwargs,
    )


def read_to_the_end(capture: CaptureThread) -> Reader:
    """Run ``capture`` until its source is done, a reader taking every window of its ring."""
    reader = Reader(capture.ring)
    reader.start()
    capture.start()
    capture.join(10)
    capture.ring.close()
    reader.join(10)
    return reader


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seam", SEAMS)
def test_a_lost_stream_reconnects_and_no_window_spans_the_outage_on_either_path(seam: str) -> None:
    sessions = [FakeSource(frames(30)), FakeSource(frames(30, start=30))]
    statuses: list[StatusChange] = []
    captures: list[CaptureThread] = []

    def opener() -> FakeSource:
        if sessions:
            return sessions.pop(0)
        captures[0].stop_event.set()
        raise SourceError("gone")

    capture = seam_capture(seam, opener, on_status=statuses.append)
    capture.ring.lossless = True  # read every window: the spans are exact
    captures.append(capture)
    reader = read_to_the_end(capture)
    assert capture.stats.reconnects == 1
    assert [s.status for s in statuses] == [Status.ONLINE, Status.OFFLINE] * 2
    assert spans(reader.windows) == [(0, 15), (8, 23), (30, 45), (38, 53)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seam", SEAMS)
def test_a_resolution_change_and_a_bad_frame_each_mark_a_gap_on_either_path(seam: str) -> None:
    bad = [np.zeros((24, 32, 2), np.uint8)]  # no image has 2 channels: skipped, a gap
    source = FakeSource(frames(20) + bad + frames(20, start=21) + frames(20, (40, 30), start=41))
    capture = seam_capture(seam, lambda: source, reconnect=False)
    capture.ring.lossless = True
    reader = read_to_the_end(capture)
    assert capture.error is None and capture.stats.frames_skipped == 1
    assert spans(reader.windows) == [(0, 15), (21, 36), (41, 56)]


class StuckSource(FakeSource):
    """``n`` frames, then a read that blocks until ``release_reads`` is set."""

    def __init__(self, n: int) -> None:
        super().__init__(frames(n))
        self.release_reads = threading.Event()
        self.released_event = threading.Event()

    def read(self) -> np.ndarray | None:
        frame = super().read()
        if frame is None:
            self.release_reads.wait()
            return np.zeros((24, 32, 3), np.uint8)
        return frame

    def release(self) -> None:
        self.released_event.set()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seam", SEAMS)
def test_a_stuck_read_is_abandoned_and_its_late_frame_dropped_on_either_path(seam: str) -> None:
    sources: list[StuckSource] = []
    seen: list[StatusChange] = []

    def opener() -> StuckSource:
        sources.append(StuckSource(20 if not sources else 0))
        return sources[-1]

    capture = seam_capture(seam, opener, on_status=seen.append, stall_timeout_s=0.3)
    capture.start()
    try:
        wait_until(lambda: capture.stats.stalls >= 2, timeout=10, what="two stalls")
        sources[0].release_reads.set()
        assert sources[0].released_event.wait(10), "the abandoned session never ended"
    finally:
        capture.stop_event.set()
        capture.join(5)
        for source in sources:
            source.release_reads.set()
    assert not capture.is_alive() and capture.error is None
    assert seen[1].reason.startswith("stalled: no frame for")
    assert capture.ring.frames_written == 20


def run_demo(
    folder: Path, name: str, path: DevicePath | None, **overrides: Any
) -> tuple[list[dict[str, Any]], RunSummary]:
    """The bundled demo replayed on the host path (``path`` None) or a device path: its event
    log's lines and the run's summary."""
    checkpoint = load_checkpoint(demo.config_path().parent / "c3d_bn_demo.safetensors")
    engine = build_engine(checkpoint.model, "cpu", "fp32")
    events = folder / f"{name}.jsonl"
    overrides = {
        "sinks": {"events": {"path": str(events)}, "overlay": {"video": None}},
        "model": {"device": "cpu", "precision": "fp32"},
        "truth": None,
        **overrides,
    }
    cfg = load_config(demo.config_path(), overrides)
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None, device_path=path)
    assert isinstance(pipeline.rings[0], DeviceRingBuffer) == (path is not None)
    summary = pipeline.run()
    return [json.loads(line) for line in events.read_text().splitlines()], summary


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The bundled demo replayed on the host path and on the device path (torch on cpu)."""
    folder = tmp_path_factory.mktemp("demo-runs")
    return {
        name: run_demo(folder, name, path)[0]
        for name, path in (("host", None), ("device", CPU_PATH))
    }


@pytest.mark.timeout(300)
def test_the_demo_on_the_device_path_logs_the_events_of_the_host_path(demo_runs) -> None:
    """The demo's 320x240 frames take the one-resize route, the least exact (a mean of about
    0.04 normalised units apart): events still start and end on the same windows, and their
    scores differ by under 0.01 (0.0017 when written)."""
    keep = ("type", "label", "start_frame", "end_frame", "window", "end_reason")

    def lines(name: str) -> list[dict[str, Any]]:
        return [
            {k: o.get(k) for k in keep}
            for o in demo_runs[name]
            if o["type"] in ("new", "update", "end")
        ]

    assert len(lines("host")) >= 20 and lines("device") == lines("host")
    for key in ("score", "peak_score"):
        host = [o[key] for o in demo_runs["host"] if key in o]
        device = [o[key] for o in demo_runs["device"] if key in o]
        assert len(device) == len(host) and np.allclose(device, host, atol=0.01)


@pytest.mark.timeout(120)
def test_decode_gpu_without_a_gpu_warns_once_and_runs_on_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: decode gpu would run")
    video = demo.config_path().parent / "demo.mp4"
    events = tmp_path / "events.jsonl"
    with caplog.at_level(logging.WARNING):
        code = main(
            ["run", "--source", str(video), "--decode", "gpu", "--events", str(events)]
            + ["--max-seconds", "3"]
        )
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if "decode gpu" in r.getMessage()]
    assert warnings == [
        "decode gpu: no CUDA device (torch.cuda.is_available() is false); decoding on the CPU "
        "instead"
    ]
    assert any(json.loads(line)["type"] == "status" for line in events.read_text().splitlines())


@pytest.mark.timeout(300)
def test_motion_gating_on_the_device_path_gates_as_on_the_host_path(tmp_path: Path) -> None:
    """The device ring's frames are measured on a host copy: the same windows are gated."""
    gating = {"window": {"length": 16, "stride": 4, "gating": {"enabled": True}}}
    host_log, host = run_demo(tmp_path, "host", None, **gating)
    device_log, device = run_demo(tmp_path, "device", CPU_PATH, **gating)
    assert host.windows_gated and device.windows == host.windows
    assert abs(device.windows_gated - host.windows_gated) <= max(2, host.windows_gated // 50)
    labels = [(o["label"], o["start_frame"]) for o in host_log if o["type"] == "new"]
    assert (
        labels
        and [(o["label"], o["start_frame"]) for o in device_log if o["type"] == "new"] == labels
    )


@pytest.mark.timeout(120)
def test_a_paced_source_on_the_device_path_is_drawn_in_its_own_colours(tmp_path: Path) -> None:
    """The overlay draws host BGR frames: a device frame (RGB tensor) is converted for it."""
    video = tmp_path / "orange.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        rgb = np.zeros((120, 160, 3), np.uint8)
        rgb[...] = (220, 120, 0)  # orange: red high, blue none
        for _ in range(45):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    checkpoint = load_checkpoint(demo.config_path().parent / "c3d_bn_demo.safetensors")
    engine = build_engine(checkpoint.model, "cpu", "fp32")
    drawn = tmp_path / "drawn.avi"
    cfg = load_config(
        None,
        {
            "sources": [{"name": "cam", "url": str(video), "realtime": True}],
            "model": {"device": "cpu", "precision": "fp32"},
            "sinks": {"events": {"path": None}, "overlay": {"video": str(drawn)}},
        },
    )
    Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None, device_path=CPU_PATH).run()
    capture = cv2.VideoCapture(str(drawn))
    ok, frame = capture.read()
    capture.release()
    assert ok, "no frame drawn"
    b, g, r = frame[-10:, -10:].reshape(-1, 3).mean(axis=0)  # a corner the overlay leaves
    assert r > 180 and b < 60, (b, g, r)


@pytest.mark.parametrize(
    ("path", "rings"),
    [(None, ["cam"]), (CPU_PATH, ["cam"]), (DevicePath(torch.device("cpu"), nvdec=True), [])],
    ids=["host", "device-pyav", "device-nvdec"],
)
def test_a_stream_decoded_by_nvdec_keeps_no_packets_for_clips(
    tmp_path: Path, path: DevicePath | None, rings: list[str]
) -> None:
    """Its frames do not say which packet each came from: the media output says once that the
    source has no clips (snapshots only) instead of waiting on an empty packet ring."""
    checkpoint = load_checkpoint(demo.config_path().parent / "c3d_bn_demo.safetensors")
    cfg = load_config(
        None,
        {
            "sources": [{"name": "cam", "url": "rtsp://127.0.0.1:9/cam"}],
            "model": {"device": "cpu", "precision": "fp32"},
            "sinks": {"events": {"path": None}},
            "media": {"dir": str(tmp_path / "media")},
        },
    )
    engine = build_engine(checkpoint.model, "cpu", "fp32")
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None, device_path=path)
    assert sorted(pipeline.packet_rings) == rings
