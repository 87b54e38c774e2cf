"""Event clips: encoded packets stream-copied (never re-encoded) into an MP4 that appears whole.

A clip is written to a temporary name in its folder (``.<name>.part``: hidden, and never taken
for a clip) and renamed when complete, so a reader never sees half a file and a crash leaves
none that looks finished (:func:`remove_temp_files` clears what a crash left). A live clip,
written for as long as its event lasts, holds an advisory lock on its temporary file, so that
another run or cluster node starting on the same folder (``--backend ray`` on shared storage)
leaves it alone; a crashed writer's lock is gone with it. The MP4 is written with ``+faststart``
(its index first: it plays while it downloads).

Two sources of packets:

- a live source's :class:`~streamdet.sources.packets.PacketRing`, through :class:`ClipFile`,
  which takes packets as they come (a clip may last longer than the ring keeps);
- a file, through :func:`cut_file`, which seeks to the keyframe at or before the clip's start.

MP4 needs the codec configuration (H.264's SPS/PPS) in its header, and a camera may send it only
in-band: the output stream is made from a *template* stream that FFmpeg's raw parser builds from
the extradata and the clip's first keyframe (:func:`_template`), so the clip carries exactly the
source's parameters.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; every temporary file is taken for a leftover
    fcntl = None  # type: ignore[assignment]

from streamdet.sources.packets import EncodedPacket, StreamInfo

# Raw elementary-stream formats FFmpeg can read a codec's configuration from.
RAW_FORMATS = {"h264": "h264", "hevc": "hevc", "mjpeg": "mjpeg"}
TEMP_SUFFIX = ".part"


class ClipError(Exception):
    """A clip could not be written (its codec, or the muxer refused its packets)."""


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is complete: ``.<name>.part`` beside it."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    """True for a media file still being written (see :func:`temp_path`)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary media files a crashed run left under ``folder``; returns how many.
    A live clip still being written (by another run or node) is locked, and left."""
    removed = 0
    for path in folder.rglob(f".*{TEMP_SUFFIX}"):
        try:
            if _locked(path):
                continue
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _lock(temp: Path) -> int | None:
    """Create ``temp`` and hold an exclusive advisory lock on it; returns the fd to close."""
    if fcntl is None:
        return None
    fd = os.open(temp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # no lock on this filesystem: written unlocked, as without fcntl
        pass
    return fd


def _locked(path: Path) -> bool:
    """True while a writer holds ``path``'s lock (:func:`_lock`)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDWR)  # read-write: NFS emulates flock with write locks
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def finish_file(temp: Path, path: Path) -> None:
    """Make the complete ``temp`` durable, then visible as ``path`` (one atomic rename)."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


@dataclass(frozen=True)
class ClipStats:
    """What a finished clip holds.

    Attributes:
        path: the clip.
        frames: video packets written.
        first: the first packet written (a keyframe).
        last: the last packet written.
        duration_s: from the first frame's start to the last frame's end.
        size_bytes: the file's size.
    """

    path: Path
    frames: int
    first: EncodedPacket
    last: EncodedPacket
    duration_s: float
    size_bytes: int


def _template(info: StreamInfo, keyframe: bytes) -> tuple[Any, Any]:
    """(container, stream) of the codec's raw format read from ``info.extradata`` and a keyframe:
    a stream whose codec parameters (and extradata, from in-band parameter sets when the
    container had none) an output stream can copy."""
    raw = RAW_FORMATS.get(info.codec)
    if raw is None:
        raise ClipError(
            f"clips of {info.codec!r} streams are not supported (only {list(RAW_FORMATS)})"
        )
    head, body = info.extradata, keyframe
    if info.codec == "h264" and head[:1] == b"\x01":  # MP4's avcC and length-prefixed NALs
        head, body = _avcc_to_annexb(head), _length_prefixed_to_annexb(body)
    try:
        container = av.open(io.BytesIO(head + body), format=raw)
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError) as exc:
        raise ClipError(f"cannot read the {info.codec} stream's parameters: {exc}") from exc
    return container, stream


_START_CODE = b"\x00\x00\x00\x01"


def _avcc_to_annexb(avcc: bytes) -> bytes:
    """The SPS and PPS of an ``avcC`` record (ISO 14496-15), each behind a start code."""
    units, i = [], 5
    for count_mask in (0x1F, 0xFF):  # SPS count (low 5 bits), then PPS count
        if i >= len(avcc):
            break
        count, i = avcc[i] & count_mask, i + 1
        for _ in range(count):
            size = int.from_bytes(avcc[i : i + 2], "big")
            units.append(avcc[i + 2 : i + 2 + size])
            i += 2 + size
    return b"".join(_START_CODE + unit for unit in units)


def _length_prefixed_to_annexb(data: bytes) -> bytes:
    """NAL units with 4-byte big-endian lengths (MP4's) behind start codes instead."""
    out, i = [], 0
    while i + 4 <= len(data):
        size = int.from_bytes(data[i : i + 4], "big")
        out.append(_START_CODE + data[i + 4 : i + 4 + size])
        i += 4 + size
    return b"".join(out)


class ClipFile:
    """An MP4 clip written packet by packet, from a keyframe, visible only once complete.

    Args:
        path: the clip's final path (its folder must exist).
        info: the packets' stream parameters.
        first: the clip's first packet (a keyframe); written at once.

    Raises:
        ClipError: the codec is not supported, or the muxer refused the stream.
        OSError: the file cannot be created.

    Example:
        >>> # clip = ClipFile(path, follower.info, first); clip.write(p); stats = clip.finish()
    """

    def __init__(self, path: Path, info: StreamInfo, first: EncodedPacket) -> None:
        if not first.keyframe:
            raise ValueError("a clip starts on a keyframe")
        self.path = path
        self.temp = temp_path(path)
        self.info = info
        template, source = _template(info, first.data)
        self._lock_fd = _lock(self.temp)  # held until the clip is finished or given up
        try:
            self._out = av.open(
                str(self.temp), "w", format="mp4", options={"movflags": "+faststart"}
            )
            self._stream = self._out.add_stream_from_template(source, opaque=True)
            if info.extradata:
                self._stream.codec_context.extradata = info.extradata
            self._stream.codec_context.width = info.width
            self._stream.codec_context.height = info.height
            self._stream.time_base = info.time_base
        except av.FFmpegError as exc:
            self._discard()
            raise ClipError(f"cannot start the clip {path.name}: {exc}") from exc
        finally:
            template.close()
        self.first = first
        self.last = first
        self.frames = 0
        self._origin = first.dts if first.dts is not None else first.pts
        self._last_dts: int | None = None
        self._default_duration = self._frame_ticks(info)
        self.write(first)

    @staticmethod
    def _frame_ticks(info: StreamInfo) -> int:
        rate = info.rate or Fraction(25)
        return max(1, round(1 / (rate * info.time_base)))

    def write(self, packet: EncodedPacket) -> None:
        """Mux one more packet (in demux order), its timestamps moved to start at zero.

        Raises:
            ClipError: the muxer refused it.
        """
        pts, dts = self._timestamps(packet)
        out = av.Packet(packet.data)
        out.pts, out.dts = pts, dts
        out.duration = packet.duration or self._default_duration
        out.time_base = self.info.time_base
        out.is_keyframe = packet.keyframe
        out.stream = self._stream
        try:
            self._out.mux(out)
        except av.FFmpegError as exc:
            raise ClipError(f"{self.path.name}: the muxer refused a packet: {exc}") from exc
        self._last_dts = dts
        self.last = packet
        self.frames += 1

    def _timestamps(self, packet: EncodedPacket) -> tuple[int, int]:
        """(pts, dts) from the clip's start. A packet without timestamps (the first of an RTSP
        session) comes a frame after the previous one; a decode time that would not increase
        is moved just past the previous one."""
        raw = packet.dts if packet.dts is not None else packet.pts
        if raw is not None and self._origin is None:  # the packets before had none
            self._origin = raw - self._next_dts()
        dts = (
            raw - self._origin if raw is not None and self._origin is not None else self._next_dts()
        )
        if self._last_dts is not None:
            dts = max(dts, self._last_dts + 1)
        pts = (
            packet.pts - self._origin
            if packet.pts is not None and self._origin is not None
            else dts
        )
        return max(pts, dts), dts

    def _next_dts(self) -> int:
        return 0 if self._last_dts is None else self._last_dts + self._default_duration

    def finish(self) -> ClipStats:
        """Close the MP4 and rename it to its final path; returns what it holds.

        Raises:
            ClipError: the muxer could not finish the file (it is removed).
        """
        try:
            self._out.close()
        except av.FFmpegError as exc:
            self._discard()
            raise ClipError(f"cannot finish the clip {self.path.name}: {exc}") from exc
        try:
            finish_file(self.temp, self.path)
        finally:
            self._unlock()
        frame_s = float(self._default_duration * self.info.time_base)
        return ClipStats(
            path=self.path,
            frames=self.frames,
            first=self.first,
            last=self.last,
            duration_s=self.last.time - self.first.time + frame_s,
            size_bytes=self.path.stat().st_size,
        )

    def abort(self) -> None:
        """Give the clip up: close and delete the temporary file."""
        try:
            self._out.close()
        except (av.FFmpegError, OSError):
            pass
        self._discard()

    def _discard(self) -> None:
        try:
            self.temp.unlink()
        except FileNotFoundError:
            pass
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True)
class FileCut:
    """A clip cut from a file: what it holds, on the file's timeline (seconds)."""

    path: Path
    frames: int
    start_s: float
    end_s: float
    duration_s: float
    size_bytes: int


def cut_file(source: Path, path: Path, start_s: float, end_s: float) -> FileCut:
    """Stream-copy ``source``'s video from the keyframe at or before ``start_s`` (seconds on its
    timeline) to the last frame at or before ``end_s`` into the MP4 ``path`` (temp name, then
    renamed).

    Raises:
        ClipError: nothing to cut there, or the muxer refused the stream.
        OSError: a file cannot be read or written.
    """
    temp = temp_path(path)
    try:
        with av.open(str(source)) as inp:
            stream = inp.streams.video[0]
            cut = _copy_span(inp, stream, temp, start_s, end_s)
    except av.FFmpegError as exc:
        _unlink(temp)
        raise ClipError(f"cannot cut {path.name} from {source.name}: {exc}") from exc
    except BaseException:
        _unlink(temp)
        raise
    finish_file(temp, path)
    return FileCut(path, cut[0], cut[1], cut[2], cut[3], path.stat().st_size)


def _copy_span(
    inp: Any, stream: Any, temp: Path, start_s: float, end_s: float
) -> tuple[int, float, float, float]:
    """(frames, first and last frame's time, duration) of ``stream``'s packets copied to
    ``temp`` from the keyframe at or before ``start_s`` to ``end_s``."""
    tb = stream.time_base
    offset = stream.start_time or 0
    inp.seek(offset + max(0, int(start_s / tb)), stream=stream, backward=True, any_frame=False)
    frames, first_s, last_s, last_duration = 0, None, 0.0, 0.0
    origin = None
    with av.open(str(temp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        copy = out.add_stream_from_template(stream, opaque=True)
        for packet in inp.demux(stream):
            if packet.dts is None and packet.pts is None:
                continue  # the demuxer's flush packet
            stamp = packet.pts if packet.pts is not None else packet.dts
            t = float((stamp - offset) * tb)
            if first_s is None and not packet.is_keyframe:
                continue  # the seek landed after a keyframe: wait for one
            if t > end_s + 1e-6:
                break
            dts = packet.dts if packet.dts is not None else stamp
            if origin is None:
                origin, first_s = dts, t
            packet.pts = stamp - origin
            packet.dts = dts - origin
            packet.stream = copy
            out.mux(packet)
            frames += 1
            last_s = max(last_s, t)
            last_duration = float((packet.duration or 0) * tb)
    if first_s is None:
        raise ClipError(f"no keyframe between {start_s:.2f} s and {end_s:.2f} s")
    return frames, first_s, last_s, last_s - first_s + last_duration


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
