"""Choosing the decode path, and the NVDEC source's glue (PyAV demux, Annex B, frame order)
with a CPU decoder standing in for NVDEC; NVDEC itself runs only in tests/test_gpu_cuda.py."""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from streamdet.cli import main
from streamdet.errors import SourceError
from streamdet.sources import decoding
from streamdet.sources.decoding import DeviceOpener, DevicePath, TensorFrames, resolve_decode
from streamdet.sources.nvdec import NvdecSource
from streamdet.sources.pyav import PyAVSource, UnsupportedSourceError

CPU = torch.device("cpu")


def write_video(path: Path, codec: str = "libx264", frames: int = 30, size=(160, 120)) -> Path:
    """A small video whose frames differ (a moving bar); H.264 with B-frames by default, so
    decode order differs from display order."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "bf": "2", "g": "10"}
        for i in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[:, (i * 5) % width : (i * 5) % width + 12] = 255
            image[..., 1] = i * 8
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class CpuStandIn:
    """Decodes the Annex B bytes NvdecSource hands a decoder with FFmpeg on the CPU: what
    NVDEC would be given, frames out as (H, W, 3) RGB tensors."""

    def __init__(self, codec: str, device: torch.device) -> None:
        self.context = av.CodecContext.create(codec, "r")
        self.calls: list[int | None] = []

    def decode(self, data: bytes | None) -> list[torch.Tensor]:
        self.calls.append(None if data is None else len(data))
        if data is not None:
            assert data.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")), "not Annex B"
        frames = self.context.decode(None if data is None else av.Packet(data))
        return [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in frames]


def test_cpu_decoding_is_the_host_path() -> None:
    assert resolve_decode("cpu") is None


def test_gpu_without_cuda_warns_once_and_decodes_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_decode("gpu") is None
    assert [r.getMessage() for r in caplog.records] == [
        "decode gpu: no CUDA device (torch.cuda.is_available() is false); decoding on the CPU "
        "instead"
    ]


def test_gpu_without_pynvvideocodec_names_the_missing_package(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(decoding.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert resolve_decode("gpu") is None
    assert len(caplog.records) == 1
    assert "PyNvVideoCodec is not installed" in caplog.records[0].getMessage()


def test_gpu_with_cuda_and_pynvvideocodec_takes_the_nvdec_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(decoding.importlib.util, "find_spec", lambda name: object())
    assert resolve_decode("gpu") == DevicePath(torch.device("cuda"), nvdec=True)


@pytest.mark.parametrize("value", ["tpu", "GPU", "true"])
def test_a_bad_decode_in_the_config_is_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"decode: {value}\nsources:\n  - name: a\n    url: a.mp4\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "decode" in err[0], err


def test_a_bad_decode_on_the_command_line_is_refused_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--decode", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --decode"), err


@pytest.mark.timeout(60)
def test_nvdec_source_hands_the_decoder_annex_b_and_gives_pyavs_frames_in_order(
    tmp_path: Path,
) -> None:
    """Regression guard: MP4 packets are length-prefixed; NVDEC needs them as Annex B, and
    B-frames come out in display order only once the decoder is flushed at the end."""
    video = write_video(tmp_path / "b-frames.mp4")
    made: list[CpuStandIn] = []

    def factory(codec: str, device: torch.device) -> CpuStandIn:
        made.append(CpuStandIn(codec, device))
        return made[-1]

    ours, reference = (
        NvdecSource(str(video), device=CPU, decoder_factory=factory),
        PyAVSource(str(video)),
    )
    count = 0
    with ours, reference:
        while (expected := reference.read()) is not None:
            frame = ours.read()
            assert frame is not None, f"frame {count} missing"
            assert np.array_equal(frame.numpy()[:, :, ::-1], expected), f"frame {count} differs"
            count += 1
        assert ours.read() is None
    assert count == 30
    assert made[0].calls[-1] is None  # flushed at the end


@pytest.mark.timeout(60)
def test_nvdec_source_skip_advances_one_frame_like_a_read(tmp_path: Path) -> None:
    video = write_video(tmp_path / "skip.mp4")
    source = NvdecSource(str(video), device=CPU, decoder_factory=CpuStandIn)
    reference = PyAVSource(str(video))
    with source, reference:
        for _ in range(3):
            assert source.skip() and reference.skip()
        frame = source.read()
        assert frame is not None
        assert np.array_equal(frame.numpy()[:, :, ::-1], reference.read())


@pytest.mark.timeout(60)
def test_a_codec_nvdec_cannot_decode_is_read_on_the_cpu_from_then_on_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    video = write_video(tmp_path / "ffv1.mkv", codec="ffv1", frames=5)
    with pytest.raises(UnsupportedSourceError, match="NVDEC does not decode ffv1"):
        NvdecSource(str(video), device=CPU, decoder_factory=CpuStandIn)
    opener = DeviceOpener(
        lambda: PyAVSource(str(video)), DevicePath(CPU, nvdec=True), url=str(video)
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            source = opener()
            assert isinstance(source, TensorFrames)
            frame = source.read()
            assert frame is not None and frame.shape == (120, 160, 3)
            source.release()
    assert len([r for r in caplog.records if "NVDEC does not decode" in r.getMessage()]) == 1


@pytest.mark.timeout(60)
def test_a_decoder_that_cannot_be_made_is_an_unsupported_source_without_the_password(
    tmp_path: Path,
) -> None:
    video = write_video(tmp_path / "clip.mp4", frames=3)

    def broken(codec: str, device: torch.device) -> CpuStandIn:
        raise RuntimeError("no NVDEC session left")

    with pytest.raises(UnsupportedSourceError, match="NVDEC cannot decode it"):
        NvdecSource(str(video), device=CPU, decoder_factory=broken)


@pytest.mark.timeout(60)
def test_an_unreachable_stream_is_a_source_error_that_does_not_quote_its_password() -> None:
    url = "rtsp://admin:hunter2secret@127.0.0.1:9/stream"
    with pytest.raises(SourceError) as exc:
        NvdecSource(url, device=CPU, decoder_factory=CpuStandIn, open_timeout_s=2.0)
    assert "hunter2secret" not in str(exc.value) and "127.0.0.1" in str(exc.value)


def test_a_camera_on_the_nvdec_path_is_read_by_its_own_opener() -> None:
    opened: list[str] = []

    class Camera:
        fps = 30.0

        def read(self) -> np.ndarray:
            return np.zeros((24, 32, 3), np.uint8)

        def release(self) -> None:
            opened.append("released")

    opener = DeviceOpener(
        lambda: opened.append("opened") or Camera(), DevicePath(CPU, nvdec=True), url="0"
    )
    source = opener()
    assert isinstance(source, TensorFrames) and source.fps == 30.0
    frame = source.read()
    assert frame is not None and frame.shape == (24, 32, 3)
    source.release()
    assert opened == ["opened", "released"]


class FakeNvc:
    """A stand-in for the PyNvVideoCodec module, as streamdet uses it: ``CreateDecoder`` with
    keyword arguments, ``PacketData`` carrying a pointer (``bsl_data``) and a size (``bsl``, 0
    to flush), frames exported through DLPack. It decodes with FFmpeg on the CPU."""

    class OutputColorType:
        RGB = "RGB"

    class cudaVideoCodec:  # noqa: N801 (the module's own name)
        H264 = "h264"

    class PacketData:
        bsl_data = 0
        bsl = 0

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    def CreateDecoder(self, **kwargs: Any) -> Any:  # noqa: N802 (the module's own name)
        self.created.append(kwargs)
        context = av.CodecContext.create(kwargs["codec"], "r")

        class Decoder:
            def Decode(self, packet: Any) -> list[np.ndarray]:  # noqa: N802
                data = ctypes.string_at(packet.bsl_data, packet.bsl) if packet.bsl else None
                frames = context.decode(av.Packet(data) if data else None)
                return [f.to_ndarray(format="rgb24") for f in frames]  # DLPack exporters

        return Decoder()


@pytest.mark.timeout(60)
def test_the_nvdec_factory_hands_packets_as_pointers_and_flushes_with_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The glue to PyNvVideoCodec itself (``nvdec_decoder``) against a fake of its API."""
    fake = FakeNvc()
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", fake)
    video = write_video(tmp_path / "clip.mp4")
    with NvdecSource(str(video), device=CPU) as ours, PyAVSource(str(video)) as reference:
        count = 0
        while (expected := reference.read()) is not None:
            frame = ours.read()
            assert frame is not None and np.array_equal(frame.numpy()[:, :, ::-1], expected)
            count += 1
        assert ours.read() is None and count == 30
    assert fake.created == [
        {
            "gpuid": 0,
            "codec": "h264",
            "cudacontext": 0,
            "cudastream": 0,
            "usedevicememory": True,
            "outputColorType": "RGB",
        }
    ]
