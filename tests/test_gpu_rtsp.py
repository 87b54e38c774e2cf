"""The NVDEC source's reliability against a real RTSP server, on a CPU: PyAV demuxes the
stream as for any source, and a CPU decoder stands in for NVDEC (tests/test_gpu_decode.py), so
the open, the read timeout, the watchdog, reconnects and redaction are those of the GPU path.

Regression guard: a source that dropped PyAV's read timeout would still recover (the watchdog
abandons its blocked read), but leak a thread per hang."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import torch
from test_gpu_decode import CpuStandIn
from threads import wait_until

from streamdet import kernels
from streamdet.device_buffer import DeviceRingBuffer
from streamdet.preprocess import PreprocessContract
from streamdet.preprocess_torch import preprocess_tensor
from streamdet.sources import Backoff, CaptureThread, Pacing, SourceKind, Status, StatusChange
from streamdet.sources.decoding import DeviceOpener, DevicePath
from streamdet.sources.nvdec import NvdecSource

CONTRACT = PreprocessContract(resize=(16, 16), crop=8, fps=10.0)
NVDEC_ON_CPU = DevicePath(torch.device("cpu"), nvdec=True)


def nvdec_capture(url: str, seen: list[StatusChange], **kwargs: Any) -> CaptureThread:
    kernels.get()
    opener = DeviceOpener(
        lambda: pytest.fail("the stream was not opened by the NVDEC source"),
        NVDEC_ON_CPU,
        url=url,
        open_timeout_s=2.0,
        read_timeout_s=1.0,
        decoder_factory=CpuStandIn,
    )
    ring = DeviceRingBuffer("cam", device="cpu", length=16, stride=8, frame_shape=(3, 8, 8))
    return CaptureThread(
        "cam",
        opener,
        ring,
        CONTRACT,
        threading.Event(),
        kind=SourceKind.STREAM,
        pacing=Pacing.LIVE,
        on_status=seen.append,
        backoff=Backoff(0.2, 1.0),
        read_timeout_s=1.0,
        stall_timeout_s=2.0,
        open_timeout_s=2.0,
        preprocess=preprocess_tensor,
        **kwargs,
    )


@pytest.mark.timeout(120)
def test_a_killed_then_hung_server_is_reconnected_each_time_on_the_nvdec_path(
    rtsp_server, caplog: pytest.LogCaptureFixture
) -> None:
    server = rtsp_server(pattern=True, user="admin", password="hunter2secret")
    seen: list[StatusChange] = []
    capture = nvdec_capture(server.url, seen)
    opened: list[Any] = []
    real_init = NvdecSource.__init__

    def counting_init(self: NvdecSource, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)

    with caplog.at_level(logging.DEBUG), pytest.MonkeyPatch.context() as patch:
        patch.setattr(NvdecSource, "__init__", counting_init)
        capture.start()
        try:
            wait_until(lambda: capture.ring.frames_written >= 20, 30, "frames from the server")
            server.kill()
            wait_until(lambda: Status.OFFLINE in [s.status for s in seen], 30, "offline")
            server.start()
            wait_until(lambda: [s.status for s in seen].count(Status.ONLINE) >= 2, 30, "back")
            written = capture.ring.frames_written
            wait_until(lambda: capture.ring.frames_written >= written + 20, 30, "frames again")
            server.pause()
            wait_until(lambda: capture.stats.stalls >= 1, 30, "a stall")
            server.resume()
            wait_until(lambda: [s.status for s in seen].count(Status.ONLINE) >= 3, 30, "back")
            written = capture.ring.frames_written
            wait_until(lambda: capture.ring.frames_written >= written + 20, 30, "frames again")
        finally:
            capture.stop_event.set()
            server.resume()
            capture.join(10)
    assert not capture.is_alive() and capture.error is None
    assert len(opened) >= 3 and capture.stats.reconnects >= 2
    assert capture.ring.gaps >= 2  # no window spans an outage
    # The hang ended at PyAV's read timeout, in the session's own thread: none was abandoned.
    stalled = [s.reason for s in seen if s.status is Status.OFFLINE][1]
    assert stalled.startswith("stalled: a read blocked") and capture.stats.abandoned == 0
    text = " ".join([s.reason for s in seen] + [r.getMessage() for r in caplog.records])
    assert "hunter2secret" not in text
