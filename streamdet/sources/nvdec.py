"""Files and network streams decoded on the GPU with NVDEC (PyNvVideoCodec), demuxed by PyAV.

:class:`NvdecSource` is a :class:`~streamdet.sources.pyav.PyAVSource` whose packets go to the
GPU's video decoder instead of FFmpeg's: the opening, the timeouts of the open and of each
packet read, the redaction of every message and the end-of-stream handling are PyAVSource's
(PyNvVideoCodec's own demuxer has no read timeout, and crashed on rtsp:// URLs in one
published test), and each frame comes out as an (H, W, 3) uint8 RGB tensor on the GPU, never
copied to the host.

PyNvVideoCodec (``pip install 'streamdet[gpu]'``) was chosen over torchcodec's CUDA decoder:
its wheel on PyPI carries NVDEC support and needs only the driver (libnvcuvid), where
torchcodec's CUDA builds come from PyTorch's own index, for one CUDA version each.

NVDEC takes H.264 and HEVC as Annex B byte streams: packets from MP4 or MKV (length-prefixed,
parameter sets in the container) pass FFmpeg's ``*_mp4toannexb`` bitstream filter first;
packets that are Annex B already (RTSP, MPEG-TS) pass through it unchanged.

Not kept: encoded packets for event clips (``keep_packets``): a frame out of NVDEC does not say
which packet it came from, so a live source decoded here gives no clips.

Example:
    >>> with NvdecSource("clip.mp4", device=torch.device("cuda")) as source:  # doctest: +SKIP
    ...     frame = source.read()  # (H, W, 3) uint8 RGB tensor on the GPU, or None at the end
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import av
import numpy as np
import torch

from streamdet.redaction import redact_url
from streamdet.sources.pyav import PyAVSource, UnsupportedSourceError, _reason

__all__ = ["FrameDecoder", "NvdecSource", "nvdec_decoder"]

log = logging.getLogger(__name__)

# FFmpeg's codec name -> PyNvVideoCodec's cudaVideoCodec member
NVDEC_CODECS = {
    "h264": "H264",
    "hevc": "HEVC",
    "av1": "AV1",
    "vp9": "VP9",
    "vp8": "VP8",
    "mpeg4": "MPEG4",
    "mpeg2video": "MPEG2",
    "mjpeg": "JPEG",
}
# Codecs whose MP4/MKV packets need converting to an Annex B byte stream for NVDEC.
ANNEX_B_FILTERS = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}


class FrameDecoder(Protocol):
    """Decodes one source's packets on a device (NVDEC, or a stand-in in tests)."""

    def decode(self, data: bytes | None) -> list[torch.Tensor]:
        """Frames completed by one Annex B packet's bytes, in display order, each (H, W, 3)
        uint8 RGB on the device; ``None`` flushes (the stream ended): the frames held back."""
        ...


DecoderFactory = Callable[[str, torch.device], FrameDecoder]


class _Nvdec:
    """A PyNvVideoCodec decoder on ``device``, writing RGB frames on torch's current stream
    there, so a frame's preprocessing (queued on that stream next) sees it decoded."""

    def __init__(self, codec: str, device: torch.device) -> None:
        nvc: Any = importlib.import_module("PyNvVideoCodec")
        self._nvc = nvc
        self._device = device
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        self._decoder = nvc.CreateDecoder(
            gpuid=device.index or 0,
            codec=getattr(nvc.cudaVideoCodec, NVDEC_CODECS[codec]),
            cudacontext=0,
            cudastream=stream,
            usedevicememory=True,
            outputColorType=nvc.OutputColorType.RGB,
        )

    def decode(self, data: bytes | None) -> list[torch.Tensor]:
        packet = self._nvc.PacketData()
        buffer = np.frombuffer(data, np.uint8) if data else np.zeros(0, np.uint8)
        packet.bsl_data = buffer.ctypes.data if data else 0
        packet.bsl = buffer.size  # 0: end of stream, the decoder flushes
        # Each frame is a view of a decoder surface, valid until the next decode call: capture
        # reads (preprocesses) every frame of one call before it demuxes the next packet.
        return [_as_hwc(frame, self._device) for frame in self._decoder.Decode(packet)]


def _as_hwc(frame: Any, device: torch.device) -> torch.Tensor:
    """A decoded frame as an (H, W, 3) tensor view, without a copy: through DLPack, else the
    CUDA array interface; a planar (3, H, W) frame is viewed as (H, W, 3)."""
    try:
        tensor = torch.from_dlpack(frame)
    except (AttributeError, TypeError, BufferError, RuntimeError):
        tensor = torch.as_tensor(frame, device=device)
    if tensor.ndim == 3 and tensor.shape[0] == 3 and tensor.shape[2] != 3:
        tensor = tensor.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return tensor


def nvdec_decoder(codec: str, device: torch.device) -> FrameDecoder:
    """The NVDEC decoder of ``codec`` (FFmpeg's name) on ``device``."""
    return _Nvdec(codec, device)


class NvdecSource(PyAVSource):
    """A file or network stream demuxed by PyAV and decoded by NVDEC on ``device``.

    Args:
        url: file path or rtsp:// / http(s):// URL.
        device: the CUDA device that decodes and holds the frames.
        decoder_factory: makes the decoder for a codec (default: NVDEC's); tests pass a stand-in.
        **options: as :class:`~streamdet.sources.pyav.PyAVSource` (``open_timeout_s``,
            ``read_timeout_s``, ``fps``); ``decode_threads`` and ``keep_packets`` are ignored
            (NVDEC decodes; no clips, see the module's docstring).

    Raises:
        SourceError: the source cannot be opened.
        UnsupportedSourceError: NVDEC does not decode its codec, or its decoder cannot be made
            (the opener then decodes it on the CPU).
    """

    def __init__(
        self,
        url: str,
        *,
        device: torch.device,
        decoder_factory: DecoderFactory = nvdec_decoder,
        **options: Any,
    ) -> None:
        options.pop("keep_packets", None)
        options.pop("decode_threads", None)
        super().__init__(url, decode_threads=1, **options)
        self.device = device
        codec = self._stream.codec_context.name
        try:
            if codec not in NVDEC_CODECS:
                raise UnsupportedSourceError(
                    f"{redact_url(url)}: NVDEC does not decode {codec} video"
                )
            name = ANNEX_B_FILTERS.get(codec)
            self._annex_b = av.BitStreamFilterContext(name, self._stream) if name else None
            self._decoder = decoder_factory(codec, device)
        except UnsupportedSourceError:
            super().release()
            raise
        except Exception as exc:  # no decoder for this size or profile, no NVDEC session left
            super().release()
            why = f"{type(exc).__name__}: {_reason(exc)}"
            raise UnsupportedSourceError(
                f"{redact_url(url)}: NVDEC cannot decode it ({why})"
            ) from None

    def read(self) -> torch.Tensor | None:  # type: ignore[override]
        """The next frame, (H, W, 3) uint8 RGB on the device (None at the end, on a failed or
        timed-out read)."""
        return self._next_frame()  # type: ignore[return-value]

    def _decode(self, packet: av.Packet | None) -> None:
        try:
            if packet is None:
                frames = self._decoder.decode(None)
            else:
                frames = []
                for data in self._annex_b_packets(packet):
                    frames.extend(self._decoder.decode(data))
        except Exception as exc:  # a damaged packet: its frame is lost, the next may decode
            log.debug("%s: NVDEC cannot decode a packet: %s", redact_url(self.url), _reason(exc))
            return
        self._frames.extend(frames)  # type: ignore[arg-type]

    def _annex_b_packets(self, packet: av.Packet) -> list[bytes]:
        if self._annex_b is None:
            return [bytes(packet)]
        # the filter takes its packet's data: it gets a copy, as ExtradataProbe's does
        return [bytes(out) for out in self._annex_b.filter(av.Packet(bytes(packet))) if out.size]
