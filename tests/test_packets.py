"""The encoded-packet ring that event clips are cut from: bounds, keyframes and segments."""

from __future__ import annotations

import threading
from fractions import Fraction

from streamdet.sources.packets import EncodedPacket, PacketRing, StreamInfo

INFO = StreamInfo("h264", 64, 48, Fraction(1, 90000), Fraction(30), b"\x01")
FPS = 30


def feed(ring: PacketRing, frames: range, *, gop: int = 30, size: int = 100, t0: float = 0.0):
    for i in frames:
        ring.append(
            EncodedPacket(b"x" * size, i * 3000, i * 3000, 3000, i % gop == 0, t0 + i / FPS, i)
        )


def test_a_cut_starts_on_the_keyframe_at_or_before_its_start() -> None:
    ring = PacketRing(max_seconds=10.0, max_bytes=10_000_000)
    ring.start_segment(INFO)
    feed(ring, range(300), gop=30)
    cut = ring.cut(start_time=100 / FPS, end_time=200 / FPS)
    assert cut is not None
    assert cut.packets[0].keyframe and cut.packets[0].frame_index == 90
    assert cut.packets[-1].frame_index == 200
    assert [p.frame_index for p in cut.packets] == list(range(90, 201))
    assert cut.start_time == 90 / FPS and cut.info == INFO


def test_the_ring_keeps_its_seconds_and_the_keyframe_before_them() -> None:
    ring = PacketRing(max_seconds=2.0, max_bytes=10_000_000)
    ring.start_segment(INFO)
    feed(ring, range(600), gop=45)  # keyframes every 1.5 s
    newest = 599 / FPS
    cut = ring.cut(newest - 2.0, newest)
    assert cut is not None
    # 2 s before the newest frame is frame 539: the keyframe at or before it is 495.
    assert cut.packets[0].frame_index == 495
    assert ring.bytes == 100 * (600 - 495)


def test_the_byte_bound_holds_even_without_keyframes() -> None:
    ring = PacketRing(max_seconds=60.0, max_bytes=5_000)
    ring.start_segment(INFO)
    feed(ring, range(1000), gop=10_000)  # one keyframe, at frame 0
    assert ring.bytes <= 5_000
    assert ring.cut(0.0, 1000.0) is None  # the keyframe is gone: nothing can be cut
    assert ring.dropped_bytes > 0


def test_a_cut_never_joins_two_segments() -> None:
    ring = PacketRing(max_seconds=60.0, max_bytes=10_000_000)
    ring.start_segment(INFO)
    feed(ring, range(100))
    other = StreamInfo("h264", 64, 48, Fraction(1, 1000), None, b"\x02")
    ring.start_segment(other)  # a reconnect: new timestamps
    feed(ring, range(0, 100), t0=10.0)
    cut = ring.cut(start_time=5.0, end_time=12.0)
    assert cut is not None and cut.info == other
    assert cut.packets[0].time == 10.0  # what the new segment has: the pre-roll came out short
    old = ring.cut(start_time=1.0, end_time=2.0)
    assert old is not None and old.info == INFO


def test_wait_until_wakes_when_the_time_arrives() -> None:
    ring = PacketRing(max_seconds=10.0, max_bytes=10_000_000)
    ring.start_segment(INFO)
    feed(ring, range(10))
    assert not ring.wait_until(5.0, timeout=0.01)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(ring.wait_until(5.0, timeout=60)))
    waiter.start()
    feed(ring, range(10, 200))
    waiter.join(60)
    assert got == [True]
    ring.close()
    assert not ring.wait_until(100.0, timeout=60)  # closed: returns at once
