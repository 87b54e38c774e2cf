"""The encoded stream of a live source, kept for a few seconds so event clips can start before
their event (pre-roll), from the camera's own encoding and the one connection the capture holds.

A :class:`PacketRing` keeps the newest encoded packets of one source (compressed: 10 s of a
4 Mbit/s H.264 camera is ~5 MB, where as decoded BGR frames it would be ~0.9 GB), bounded in
seconds and in bytes, and never less than what a cut starting on a keyframe needs: the oldest
packets go only while a keyframe after them is still kept. Each (re)connect starts a *segment*
with its own :class:`StreamInfo`; a clip never joins two segments (timestamps and codec
parameters may differ across a reconnect).

The capture thread writes (``start_segment``, ``append``); the media writer reads
(``cut``, ``wait_until``) from its own thread. Times are wall-clock epoch seconds of the
frames, the clock of the event log's ``start_time`` / ``end_time``.

Example:
    >>> ring = PacketRing(max_seconds=10.0, max_bytes=1_000_000)
    >>> ring.start_segment(StreamInfo("h264", 640, 480, Fraction(1, 90000), None, b""))
    >>> for i in range(30):
    ...     ring.append(EncodedPacket(b"x" * 100, i * 3000, i * 3000, 3000, i % 10 == 0,
    ...                               1000.0 + i / 30, i))
    >>> cut = ring.cut(1000.5, 1000.9)
    >>> cut.packets[0].keyframe, cut.packets[0].frame_index, cut.packets[-1].frame_index
    (True, 10, 27)
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class StreamInfo:
    """What a muxer needs to write a segment's packets without decoding them.

    Attributes:
        codec: FFmpeg codec name (``h264``, ``hevc``, ``mjpeg``...).
        width: picture width.
        height: picture height.
        time_base: unit of the packets' ``pts``/``dts``/``duration``.
        rate: frame rate when the stream says (None: unknown).
        extradata: codec configuration (H.264 SPS/PPS...): the container's, or taken from the
            stream's in-band parameter sets (FFmpeg's ``extract_extradata``) when it has none;
            empty when neither has any yet.
    """

    codec: str
    width: int
    height: int
    time_base: Fraction
    rate: Fraction | None
    extradata: bytes


@dataclass(frozen=True)
class EncodedPacket:
    """One compressed packet as demuxed.

    Attributes:
        data: the packet's bytes.
        pts: presentation timestamp in the segment's ``time_base`` (None: unknown).
        dts: decoding timestamp (None: unknown).
        duration: in ``time_base`` (None or 0: unknown).
        keyframe: a cut may start here.
        time: wall-clock epoch seconds of the frame it carries (the capture's clock).
        frame_index: the index the capture gave the decoded frame (the event log's
            ``start_frame`` numbering), or None when it gave no frame of its own.
    """

    data: bytes
    pts: int | None
    dts: int | None
    duration: int | None
    keyframe: bool
    time: float
    frame_index: int | None


@dataclass(frozen=True)
class Cut:
    """Packets of one segment, from a keyframe, ready to be muxed in order.

    Attributes:
        info: the segment's stream parameters.
        packets: in demux (decode) order, the first one a keyframe.
        start_time: wall time of the first packet (earlier than asked when the keyframe was,
            later when the ring did not reach back that far).
        end_time: wall time of the last packet.
    """

    info: StreamInfo
    packets: tuple[EncodedPacket, ...]
    start_time: float
    end_time: float


class _Segment:
    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self.packets: deque[EncodedPacket] = deque()


class PacketRing:
    """The newest encoded packets of one source, bounded in seconds and bytes.

    Args:
        max_seconds: keep packets this much older than the newest (plus what reaches back to a
            keyframe).
        max_bytes: a hard bound on the bytes kept, whatever the keyframes: a camera that
            never sends one cannot fill memory.
    """

    def __init__(self, *, max_seconds: float, max_bytes: int) -> None:
        if max_seconds <= 0 or max_bytes <= 0:
            raise ValueError("max_seconds and max_bytes must be positive")
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self._cond = threading.Condition()  # protects everything below
        self._segments: deque[_Segment] = deque()
        self._bytes = 0
        self._newest_time: float | None = None
        self._closed = False
        self.dropped_bytes = 0  # dropped by the byte bound before max_seconds were reached

    # -- the capture thread ------------------------------------------------------------------

    def start_segment(self, info: StreamInfo) -> None:
        """A (re)connect: packets appended from now on belong to a new segment."""
        with self._cond:
            self._segments.append(_Segment(info))

    def append(self, packet: EncodedPacket) -> None:
        """Add the newest packet (after ``start_segment``), dropping the oldest that are no
        longer needed."""
        with self._cond:
            if not self._segments:
                raise RuntimeError("append before start_segment")
            self._segments[-1].packets.append(packet)
            self._bytes += len(packet.data)
            self._newest_time = packet.time
            self._trim()
            self._cond.notify_all()

    def close(self) -> None:
        """No more packets (the run stops): wake every waiter."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- readers -----------------------------------------------------------------------------

    @property
    def newest_time(self) -> float | None:
        with self._cond:
            return self._newest_time

    @property
    def bytes(self) -> int:
        with self._cond:
            return self._bytes

    def wait_until(self, time: float, timeout: float) -> bool:
        """Wait until a packet at or after wall time ``time`` is kept; False on timeout or
        once closed without one."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    self._closed or (self._newest_time is not None and self._newest_time >= time)
                ),
                timeout,
            ) and (self._newest_time is not None and self._newest_time >= time)

    def cut(self, start_time: float, end_time: float) -> Cut | None:
        """The packets from the last keyframe at or before ``start_time`` (or the first kept
        keyframe after it) to the last packet at or before ``end_time``, from the newest
        segment that has a keyframe in that span; None when no segment has one."""
        with self._cond:
            for segment in reversed(self._segments):
                packets = _span(segment.packets, start_time, end_time)
                if packets:
                    return Cut(segment.info, packets, packets[0].time, packets[-1].time)
            return None

    # -- internals (under _cond) ---------------------------------------------------------------

    def _trim(self) -> None:
        newest = self._newest_time if self._newest_time is not None else 0.0
        horizon = newest - self.max_seconds
        while self._segments:
            oldest = self._segments[0]
            if not oldest.packets:
                if len(self._segments) == 1:
                    return
                self._segments.popleft()
                continue
            over_bytes = self._bytes > self.max_bytes
            if not over_bytes and not self._may_drop_oldest(oldest, horizon):
                return
            packet = oldest.packets.popleft()
            self._bytes -= len(packet.data)
            if over_bytes and packet.time >= horizon:
                self.dropped_bytes += len(packet.data)

    def _may_drop_oldest(self, segment: _Segment, horizon: float) -> bool:
        """The oldest packet is past the horizon and a keyframe at or before the horizon is
        still kept after it (or a newer segment takes over)."""
        first = segment.packets[0]
        if first.time >= horizon:
            return False
        if segment is not self._segments[-1]:
            return True  # a whole older segment past the horizon goes packet by packet
        # Keep the last keyframe at or before the horizon: a cut from there starts on it.
        for packet in itertools.islice(segment.packets, 1, None):
            if packet.time > horizon:
                return False
            if packet.keyframe:
                return True
        return False


def _span(packets: deque[EncodedPacket], start: float, end: float) -> tuple[EncodedPacket, ...]:
    """From the last keyframe at or before ``start`` (else the first after it) up to ``end``."""
    items = list(packets)
    first = None
    for i, packet in enumerate(items):
        if packet.time > end:
            break
        if packet.keyframe and (packet.time <= start or first is None):
            first = i
            if packet.time > start:
                break
    if first is None:
        return ()
    chosen = [p for p in items[first:] if p.time <= end]
    return tuple(chosen)
