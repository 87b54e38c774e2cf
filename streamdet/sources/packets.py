"""The encoded stream of a live source, kept for a few seconds so event clips can start before
their event (pre-roll), from the camera's own encoding and the one connection the capture holds.

A :class:`PacketRing` keeps the newest encoded packets of one source (compressed: 10 s of a
4 Mbit/s H.264 camera is ~5 MB, where as decoded BGR frames it would be ~0.9 GB), bounded in
seconds and in bytes, and never less than what a cut starting on a keyframe needs: the oldest
packets go only while a keyframe after them is still kept. Each (re)connect starts a *segment*
with its own :class:`StreamInfo`; a clip never joins two segments (timestamps and codec
parameters may differ across a reconnect).

The capture thread writes (``start_segment``, ``append``); the media writer reads from its own
thread: ``cut`` copies a span that is all in the ring, ``follow`` returns a
:class:`PacketFollower` that takes a segment's packets in order as they arrive, so a clip may last
longer than the ring keeps (up to ``max_clip_s``). A follower that falls so far behind that the
ring dropped packets it had not taken yet reports them as ``lost`` and resumes at the next
keyframe. Times are wall-clock epoch seconds of the frames, the clock of the event log's
``start_time`` / ``end_time``.

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


@dataclass(frozen=True)
class Taken:
    """What :meth:`PacketFollower.take` got.

    Attributes:
        packets: the next packets of the segment, in demux order, none later than asked.
        lost: packets the ring dropped before they were taken (the reader fell behind); the
            packets after them start at a keyframe again.
        reached: the segment holds a packet later than asked: everything up to then is taken.
        ended: no more packets will come for this segment (a reconnect started another one, or
            the ring was closed).
    """

    packets: tuple[EncodedPacket, ...]
    lost: int
    reached: bool
    ended: bool


class _Segment:
    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self.packets: deque[EncodedPacket] = deque()
        self.first_seq = 0  # sequence number of packets[0]: counts the packets dropped before it

    @property
    def end_seq(self) -> int:
        """Sequence number the next appended packet will get."""
        return self.first_seq + len(self.packets)


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

    def follow(self, start_time: float) -> PacketFollower | None:
        """A reader of the newest segment that has a keyframe, from the last keyframe at or
        before ``start_time`` (or the first kept one after it); None when none has one yet."""
        with self._cond:
            for segment in reversed(self._segments):
                first = _start_index(segment.packets, start_time, float("inf"))
                if first is not None:
                    return PacketFollower(self, segment, segment.first_seq + first)
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
            oldest.first_seq += 1
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


class PacketFollower:
    """Takes one segment's packets in order as they arrive, from a keyframe on.

    Made by :meth:`PacketRing.follow`; used by one thread (the clip writer).

    Example:
        >>> ring = PacketRing(max_seconds=10.0, max_bytes=1_000_000)
        >>> ring.start_segment(StreamInfo("h264", 64, 48, Fraction(1, 10), None, b""))
        >>> for i in range(20):
        ...     ring.append(EncodedPacket(b"x", i, i, 1, i % 10 == 0, 100.0 + i, i))
        >>> follower = ring.follow(start_time=112.0)  # from the keyframe at 110.0
        >>> [p.frame_index for p in follower.take(until=114.5).packets]
        [10, 11, 12, 13, 14]
        >>> taken = follower.take(until=114.5, through=True)  # ...and the frame covering 114.5
        >>> [p.frame_index for p in taken.packets], taken.reached
        ([15], True)

    Attributes:
        info: the segment's stream parameters.
        lost: packets lost so far (dropped by the ring before they were taken).
    """

    def __init__(self, ring: PacketRing, segment: _Segment, next_seq: int) -> None:
        self.info = segment.info
        self.lost = 0
        self._ring = ring
        self._segment = segment
        self._next_seq = next_seq
        self._need_keyframe = False  # after a loss: skip to the next keyframe
        self._last_time: float | None = None  # of the last packet taken

    def take(self, until: float, *, through: bool = False, timeout: float = 0.0) -> Taken:
        """The packets not taken yet, up to wall time ``until``; waits up to ``timeout`` seconds
        for at least one (or for the segment to reach past ``until``, or to end).

        With ``through``, the first packet at or after ``until`` is taken too (a clip that must
        cover ``until`` ends with the frame showing it)."""
        ring, segment = self._ring, self._segment
        with ring._cond:
            if timeout > 0:
                ring._cond.wait_for(lambda: self._has_news(until), timeout)
            lost = self._catch_up()
            packets: list[EncodedPacket] = []
            # With ``through``, the span ends at the first packet at or after ``until``, which
            # an earlier take may have taken already.
            reached = through and self._last_time is not None and self._last_time >= until
            start = self._next_seq - segment.first_seq
            for packet in itertools.islice(segment.packets, start, None):
                if reached or (packet.time > until and not through):
                    reached = True
                    break
                self._next_seq += 1
                if self._need_keyframe and not packet.keyframe:
                    lost += 1
                    continue
                self._need_keyframe = False
                packets.append(packet)
                self._last_time = packet.time
                reached = through and packet.time >= until
            ended = ring._closed or segment is not (ring._segments[-1] if ring._segments else None)
            self.lost += lost
            return Taken(tuple(packets), lost, reached, ended)

    def _has_news(self, until: float) -> bool:  # under the ring's _cond
        ring, segment = self._ring, self._segment
        if ring._closed or not ring._segments or segment is not ring._segments[-1]:
            return True
        return segment.end_seq > max(self._next_seq, segment.first_seq)

    def _catch_up(self) -> int:  # under the ring's _cond
        """Skip what the ring dropped before it was taken; returns how many packets that was."""
        dropped = self._segment.first_seq - self._next_seq
        if dropped <= 0:
            return 0
        self._next_seq = self._segment.first_seq
        self._need_keyframe = True
        return dropped


def _start_index(packets: deque[EncodedPacket], start: float, end: float) -> int | None:
    """Index of the last keyframe at or before ``start`` (else the first one after it, up to
    ``end``); None when there is none."""
    first = None
    for i, packet in enumerate(packets):
        if packet.time > end:
            break
        if packet.keyframe and (packet.time <= start or first is None):
            first = i
            if packet.time > start:
                break
    return first


def _span(packets: deque[EncodedPacket], start: float, end: float) -> tuple[EncodedPacket, ...]:
    """From the last keyframe at or before ``start`` (else the first after it) up to ``end``."""
    first = _start_index(packets, start, end)
    if first is None:
        return ()
    chosen = [p for p in itertools.islice(packets, first, None) if p.time <= end]
    return tuple(chosen)
