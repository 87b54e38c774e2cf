"""Files and network streams read with PyAV: decoded frames and encoded packets from one demuxer.

:class:`PyAVSource` reads a file or an rtsp:// / http(s):// stream with FFmpeg through PyAV. It
gives capture the decoded frames (BGR, as :class:`~streamdet.sources.opening.OpenCVSource`
does, pixel for pixel) and, when asked to keep them, the encoded packets those frames came from,
so that event clips are cut from the camera's own encoding over the one connection capture holds
(:mod:`streamdet.sources.packets`).

Timeouts: ``av.open(timeout=(open, read))`` installs FFmpeg's interrupt callback, which aborts
the open (``avformat_open_input`` and the stream probe) after ``open_timeout_s`` and each packet
read after ``read_timeout_s``. RTSP also gets ``rtsp_transport=tcp`` (no lost UDP packets) and,
like HTTP, FFmpeg's own socket ``timeout`` at the read timeout.

Credentials: FFmpeg's error messages quote the URL, so no message of PyAV's is shown as it is:
only its reason, through :func:`~streamdet.redaction.redact_text`. PyAV ignores FFmpeg's log by
default, and this module leaves it so: that log quotes URLs too, and PyAV's docs warn that its
callback, called from FFmpeg's decoding threads, can deadlock them ("Caveats").

Example:
    >>> with PyAVSource("clip.mp4") as source:  # doctest: +SKIP
    ...     frame = source.read()  # (H, W, 3) uint8 BGR, or None at the end
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from streamdet.errors import SourceError
from streamdet.redaction import redact_text, redact_url, register_secrets
from streamdet.sources.opening import SourceKind, _video_file, source_kind
from streamdet.sources.packets import EncodedPacket, StreamInfo

__all__ = ["ExtradataProbe", "PacketLog", "PyAVSource", "UnsupportedSourceError"]

log = logging.getLogger(__name__)

# Packets demuxed without a frame coming out before a read gives up: OpenCV's FFmpeg backend
# gives up after as many (``max_number_of_attempts``), so both end a hopeless file alike.
MAX_PACKETS_PER_READ = 512
# Packets kept waiting for their frame: a decoder's delay (frame threads plus B-frame
# reordering) is far less; past it the oldest goes out with its demux time (bounded memory).
PENDING_LIMIT = 64
# H.264 and HEVC reorder at most 16 frames: a packet demuxed this much before the frame just
# handed out that has no frame yet will never get one (it did not decode).
MAX_REORDER = 16
# What FFmpeg probes of a stream before the first frame: as OpenCV is set up (opening.py).
STREAM_ANALYZE_US = 500_000
# FFmpeg's errors that say PyAV cannot read this source at all (an OpenCV built otherwise
# might), as opposed to a source it cannot reach now (refused, unauthorized, timed out).
# Not InvalidDataError: FFmpeg's RTSP client reports an open that its interrupt callback cut
# short (the open timeout) as invalid data, and OpenCV's FFmpeg reads the same bytes alike.
_UNSUPPORTED = (
    av.DecoderNotFoundError,
    av.DemuxerNotFoundError,
    av.ProtocolNotFoundError,
    av.PatchWelcomeError,
)


class UnsupportedSourceError(SourceError):
    """PyAV cannot read this source at all: its format, codec or protocol (see ``_UNSUPPORTED``),
    or it has no video stream. Not raised for a source it cannot reach."""


class PyAVSource:
    """A file or a network stream read with PyAV (FFmpeg).

    Args:
        url: file path or rtsp:// / http(s):// URL (not a camera index: OpenCV reads those).
        open_timeout_s: for URLs, give up opening (connect and probe) after this long.
        read_timeout_s: for URLs, a packet read blocking this long fails.
        fps: override the stream's frame rate.
        decode_threads: FFmpeg decoding threads (None: FFmpeg's choice, frame and slice threads
            on every core, as OpenCV does; see :class:`~streamdet.sources.pacing.Pacing`).
        keep_packets: keep every demuxed video packet for :meth:`drain_packets` (a live source
            with event clips on); off, packets are decoded and dropped.

    Attributes:
        fps: the stream's frame rate (its average rate, else FFmpeg's guess), or None.
        frame_count: frames the container says it holds (0 for a stream).
        size: (width, height) at open.
        stream_info: what a muxer needs to write the packets (codec, size, time base,
            extradata) as of the frame handed out last: a camera may change its size inside a
            session; None until it is known (see :class:`ExtradataProbe`).

    Raises:
        SourceError: the source cannot be opened (the message never contains a password).
    """

    def __init__(
        self,
        url: str,
        *,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        fps: float | None = None,
        decode_threads: int | None = None,
        keep_packets: bool = False,
    ) -> None:
        register_secrets(url)
        self.url = url
        self.kind = source_kind(url)
        if self.kind is SourceKind.CAMERA:
            raise SourceError(f"camera {url}: PyAV reads files and streams; use backend opencv")
        self._container = _open_container(url, self.kind, open_timeout_s, read_timeout_s)
        try:
            self._stream = _video_stream(self._container, url)
            _set_threads(self._stream.codec_context, decode_threads)
        except BaseException:
            self._container.close()
            raise
        codec = self._stream.codec_context
        self.fps = fps or _frame_rate(self._stream)
        self.frame_count = int(self._stream.frames or 0)
        self.size = (codec.width, codec.height)
        packets = self._container.demux(self._stream)
        self._packets = cast(Generator[av.Packet], packets)  # a generator: closed in release
        self._frames: deque[av.VideoFrame] = deque()
        self._drained = False  # the decoder was flushed: no frame will come any more
        # One per source: a new one per frame rebuilds its swscale context (twice the time).
        self._reformatter = VideoReformatter()
        self._log: PacketLog | None = None
        self._probe: ExtradataProbe | None = None
        self._frame_size: tuple[int, int] | None = None  # of the frame handed out last
        if keep_packets:
            codec.copy_opaque = True  # each frame carries its packet's number (``opaque``)
            self._log = PacketLog()
            self._probe = ExtradataProbe(self._stream, bytes(codec.extradata or b""))

    # -- VideoSource ----------------------------------------------------------------------------

    def read(self) -> np.ndarray | None:
        """The next frame as BGR (None at the end, on a failed or timed-out read)."""
        frame = self._next_frame()
        if frame is None:
            return None
        try:
            image = self._reformatter.reformat(frame, format="bgr24").to_ndarray()
        except (av.FFmpegError, ValueError) as exc:
            log.debug("%s: cannot convert a frame: %s", redact_url(self.url), _reason(exc))
            return None
        return image if image.flags.c_contiguous else np.ascontiguousarray(image)

    def skip(self) -> bool:
        """Advance one frame without converting it to BGR. The frame is still decoded: every
        later frame may refer to it, and frame numbers must stay those :meth:`read` gives."""
        return self._next_frame() is not None

    def release(self) -> None:
        self._frames.clear()
        self._packets.close()  # ends the demux generator (its read buffer is freed)
        self._container.close()

    def __enter__(self) -> PyAVSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- encoded packets ------------------------------------------------------------------------

    @property
    def stream_info(self) -> StreamInfo | None:
        if self._probe is None or self._probe.extradata is None:
            return None
        stream, codec = self._stream, self._stream.codec_context
        rate = stream.average_rate or stream.guessed_rate
        assert stream.time_base is not None, "a demuxed stream always has a time base"
        width, height = self._frame_size or (codec.width, codec.height)
        return StreamInfo(
            codec=codec.name,
            width=width,
            height=height,
            time_base=Fraction(stream.time_base),
            rate=Fraction(rate) if rate else None,
            extradata=self._probe.extradata,
        )

    def drain_packets(self, frame_index: int, wall_time: float) -> list[EncodedPacket]:
        """The packets demuxed so far whose frames are settled, in demux order: the frame last
        handed out (by :meth:`read` or :meth:`skip`) is stamped ``frame_index`` and
        ``wall_time``. Empty without ``keep_packets``, and while :attr:`stream_info` is not
        known (packets before the codec's parameter sets cannot start a clip)."""
        if self._log is None:
            return []
        packets = self._log.stamp(frame_index, wall_time)
        known = self._probe is not None and self._probe.extradata is not None
        return packets if known else []

    # -- internals ------------------------------------------------------------------------------

    def _next_frame(self) -> av.VideoFrame | None:
        demuxed = 0
        while not self._frames:
            if self._drained or demuxed > MAX_PACKETS_PER_READ:
                return None
            packet = self._demux()
            if packet is None:  # end of file, lost stream or read timeout: flush the decoder
                self._decode(None)
                self._drained = True
                continue
            if packet.size == 0:  # PyAV's flush packet at the end: same as above, next round
                continue
            demuxed += 1
            if self._log is not None and self._probe is not None:
                self._probe.feed(packet)
                packet.opaque = self._log.add(packet)
            self._decode(packet)
        frame = self._frames.popleft()
        if self._log is not None:
            self._log.handed_out(frame.opaque)
            self._frame_size = (frame.width, frame.height)
        return frame

    def _demux(self) -> av.Packet | None:
        try:
            return next(self._packets)
        except StopIteration:
            return None
        except av.FFmpegError as exc:  # a timeout (ExitError), a lost connection, damaged data
            log.debug("%s: read failed: %s", redact_url(self.url), _reason(exc))
            return None

    def _decode(self, packet: av.Packet | None) -> None:
        try:
            self._frames.extend(self._stream.codec_context.decode(packet))
        except av.EOFError:  # the decoder was flushed already
            pass
        except av.FFmpegError as exc:  # a damaged packet: its frame is lost, the next may decode
            log.debug("%s: cannot decode a packet: %s", redact_url(self.url), _reason(exc))


@dataclass
class _Pending:
    """A demuxed packet waiting for the index and wall time of its frame."""

    number: int
    packet: EncodedPacket  # stamped with the demux wall time and no frame index until settled
    settled: bool = False


class PacketLog:
    """Demuxed packets waiting to learn which frame each carries, handed out in demux order.

    Each packet gets a number (:meth:`add`), which FFmpeg copies to the frame decoded from it
    (``copy_opaque``), whatever the decoder's delay or reordering. When capture stamps the frame
    it was handed (:meth:`stamp`), that frame's packet is settled with the frame's index and wall
    time; a packet far behind it that got no frame (it did not decode) is settled with its demux
    time and no index. Settled packets leave from the front, so their order stays the demux
    order. At most ``limit`` packets wait: past it the oldest is settled as frameless.

    Example:
        >>> log = PacketLog()
        >>> number = log.add_encoded(EncodedPacket(b"k", 0, 0, 1, True, 0.0, None))
        >>> log.handed_out(number)
        >>> [(p.frame_index, p.time) for p in log.stamp(7, 1000.5)]
        [(7, 1000.5)]
    """

    def __init__(self, limit: int = PENDING_LIMIT) -> None:
        self.limit = limit
        self._pending: deque[_Pending] = deque()
        self._next = 0
        self._handed_out: int | None = None  # number of the packet of the frame handed out last

    def add(self, packet: av.Packet) -> int:
        """Keep a demuxed video packet (not a flush packet); returns its number."""
        return self.add_encoded(
            EncodedPacket(
                data=bytes(packet),
                pts=packet.pts,
                dts=packet.dts,
                duration=packet.duration,
                keyframe=packet.is_keyframe,
                time=time.time(),
                frame_index=None,
            )
        )

    def add_encoded(self, packet: EncodedPacket) -> int:
        number = self._next
        self._next += 1
        self._pending.append(_Pending(number, packet))
        waiting = [p for p in self._pending if not p.settled]
        for oldest in waiting[: max(0, len(waiting) - self.limit)]:  # over the bound: frameless
            oldest.settled = True
        return number

    def handed_out(self, number: object) -> None:
        """The frame handed out next was decoded from packet ``number`` (None: not known)."""
        self._handed_out = number if isinstance(number, int) else None

    def stamp(self, frame_index: int, wall_time: float) -> list[EncodedPacket]:
        """Stamp the frame handed out last; returns the packets settled from the front."""
        number, self._handed_out = self._handed_out, None
        for pending in self._pending:
            if number is not None and pending.number == number:
                pending.packet = _stamped(pending.packet, frame_index, wall_time)
                pending.settled = True
            elif number is not None and pending.number < number - MAX_REORDER:
                pending.settled = True
        out = []
        while self._pending and self._pending[0].settled:
            out.append(self._pending.popleft().packet)
        return out


def _stamped(packet: EncodedPacket, frame_index: int, wall_time: float) -> EncodedPacket:
    return EncodedPacket(
        packet.data,
        packet.pts,
        packet.dts,
        packet.duration,
        packet.keyframe,
        wall_time,
        frame_index,
    )


class ExtradataProbe:
    """A stream's codec configuration (H.264 SPS/PPS...) for MP4 muxing: the container's, else
    taken from the packets that carry it in-band, with FFmpeg's ``extract_extradata`` bitstream
    filter (a camera may send its parameter sets only in-band). Keyframes are looked at for as
    long as the stream runs, so that a camera that changes its size mid-session (new SPS) has
    the new parameter sets here by the time its first frame of the new size decodes.

    Args:
        stream: the stream the packets come from (or its codec's name).
        extradata: the container's extradata of the stream (empty: none).

    ``extradata`` is None until known; empty bytes for a codec that has none (MJPEG).

    Example:
        >>> ExtradataProbe("mjpeg", b"").extradata
        b''
    """

    def __init__(self, stream: av.VideoStream | str, extradata: bytes) -> None:
        self.extradata: bytes | None = extradata or None
        self._filter: av.BitStreamFilterContext | None = None
        try:
            self._filter = av.BitStreamFilterContext("extract_extradata", stream)
        except (av.FFmpegError, ValueError):  # a codec the filter does not know (MJPEG): none
            self.extradata = self.extradata or b""

    def feed(self, packet: av.Packet) -> None:
        """Look for parameter sets in a packet: every packet until some are found, then each
        keyframe (a copy is filtered: the filter takes its packet's data)."""
        if self._filter is None or (self.extradata is not None and not packet.is_keyframe):
            return
        try:
            filtered = self._filter.filter(av.Packet(bytes(packet)))
        except av.FFmpegError:
            return
        for out in filtered:
            if out.has_sidedata("new_extradata"):
                side = out.get_sidedata("new_extradata")
                self.extradata = bytes(side)[: side.data_size]


def _open_container(
    url: str, kind: SourceKind, open_timeout_s: float, read_timeout_s: float
) -> av.container.InputContainer:
    """``url`` opened for reading; SourceError (never quoting a password) when it cannot be."""
    if kind is SourceKind.FILE:
        path = _video_file(url)
        try:
            return av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, OSError) as exc:
            raise UnsupportedSourceError(
                f"{path}: cannot decode video (corrupt or unsupported format: {_reason(exc)})"
            ) from None
    shown = redact_url(url)
    started = time.monotonic()
    try:
        return av.open(
            url,
            container_options=_stream_options(url, read_timeout_s),
            timeout=(open_timeout_s, read_timeout_s),
            metadata_errors="ignore",
        )
    except (av.FFmpegError, OSError) as exc:
        raise _stream_open_error(shown, exc, time.monotonic() - started, open_timeout_s) from None


def _stream_open_error(
    shown: str, exc: BaseException, elapsed: float, open_timeout_s: float
) -> SourceError:
    """Why a stream did not open, in words without a password.

    The interrupt callback ends an open at its timeout, which HTTP reports as "exit requested"
    and RTSP as "invalid data": the time it took tells a timeout from a refusal.
    """
    if isinstance(exc, av.ExitError) or elapsed >= open_timeout_s:
        return SourceError(f"{shown}: cannot open stream (timed out after {open_timeout_s:g} s)")
    error = UnsupportedSourceError if isinstance(exc, _UNSUPPORTED) else SourceError
    return error(f"{shown}: cannot open stream ({_reason(exc)})")


def _stream_options(url: str, read_timeout_s: float) -> dict[str, str]:
    """FFmpeg options of a network stream: TCP for RTSP, socket timeouts, a short probe."""
    scheme = url.split("://", 1)[0].lower()
    options = {"analyzeduration": str(STREAM_ANALYZE_US)}
    if scheme in ("rtsp", "rtsps"):
        options["rtsp_transport"] = "tcp"
    if scheme in ("rtsp", "rtsps", "http", "https"):
        options["timeout"] = str(int(read_timeout_s * 1_000_000))  # microseconds
    return options


def _video_stream(container: av.container.InputContainer, url: str) -> av.VideoStream:
    if not container.streams.video:
        shown = str(_video_file(url)) if source_kind(url) is SourceKind.FILE else redact_url(url)
        raise UnsupportedSourceError(f"{shown}: cannot decode video (no video stream)")
    return container.streams.video[0]


def _set_threads(codec: av.VideoCodecContext, decode_threads: int | None) -> None:
    """Before the decoder opens (at its first packet): one thread, or FFmpeg's choice."""
    if decode_threads is None:
        codec.thread_type = "AUTO"  # frame and slice threads, as OpenCV's FFmpeg backend
        codec.thread_count = 0  # one per core
    else:
        codec.thread_count = decode_threads


def _frame_rate(stream: av.VideoStream) -> float | None:
    """The stream's average frame rate, else FFmpeg's guess; None when neither is plausible."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and 0 < float(rate) <= 1000:
            return float(rate)
    return None


def _reason(exc: BaseException) -> str:
    """FFmpeg's reason for an error, without the URL it quotes, redacted anyway."""
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return redact_text(" ".join(str(reason).split()))
