"""The device ring (the GPU path's) keeps the host ring's rules, run on a torch CPU device."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streamdet.buffer import FrameMeta, RingBuffer, Window
from streamdet.device_buffer import DeviceRingBuffer
from streamdet.gating import ActivityMeter

SHAPE = (3, 4, 4)


def frame(i: int) -> np.ndarray:
    return np.full(SHAPE, float(i), np.float32)


def meta(i: int) -> FrameMeta:
    return FrameMeta(i, 1000.0 + i, float(i))


def described(window: Window | None) -> tuple[object, ...] | None:
    """What a window says, comparable (its frame times are an array)."""
    if window is None:
        return None
    return (window.first_frame, window.last_frame, window.seq, window.frame_times.tolist())


def rings(**kwargs) -> tuple[RingBuffer, DeviceRingBuffer]:
    host = RingBuffer("cam", frame_shape=SHAPE, **kwargs)
    return host, DeviceRingBuffer("cam", device="cpu", frame_shape=SHAPE, **kwargs)


def write(ring: RingBuffer, i: int, gap_at: set[int]) -> None:
    if i in gap_at:
        ring.mark_gap()
    target = ring.slot()
    assert target is not None
    target[...] = torch.from_numpy(frame(i)) if isinstance(ring, DeviceRingBuffer) else frame(i)
    ring.commit(meta(i))


@pytest.mark.parametrize("newest", [False, True], ids=["oldest", "newest"])
def test_windows_gaps_and_skips_are_those_of_the_host_ring(newest: bool) -> None:
    host, device = rings(length=4, stride=2, capacity=8)
    for i in range(40):
        write(host, i, gap_at={13, 14, 30})
        write(device, i, gap_at={13, 14, 30})
        if i % 3 == 0:  # a reader slower than the windows come: live rings skip some
            out_host, out_device = np.empty((3, 4, 4, 4), np.float32), torch.empty(3, 4, 4, 4)
            w_host = host.take_window(out_host, newest=newest)
            w_device = device.take_window(out_device, newest=newest)
            assert described(w_device) == described(w_host)
            if w_host is not None:
                assert np.array_equal(out_device.numpy(), out_host)
    assert device.windows_skipped == host.windows_skipped > 0
    assert device.gaps == host.gaps == 3


def test_a_window_is_the_frames_in_order_copied_into_a_batch_slot() -> None:
    """The scheduler copies a window into its batch on the rings' device: a tensor slot."""
    host, device = rings(length=4, stride=2, capacity=8)
    for i in range(11):  # wraps the ring: the window comes from the doubled half
        write(host, i, set())
        write(device, i, set())
    batch = torch.full((2, 3, 4, 4, 4), -1.0)
    expected = np.empty((3, 4, 4, 4), np.float32)
    while True:
        w_host = host.take_window(expected, newest=True)
        w_device = device.take_window(batch[1], newest=True)
        if w_host is None:
            assert w_device is None
            break
        assert described(w_device) == described(w_host)
        assert np.array_equal(batch[1].numpy(), expected)
        assert batch[1, 0, :, 0, 0].tolist() == list(range(w_host.first_frame, w_host.seq + 1))
    assert (batch[0] == -1).all()  # nothing else of the batch was written


def test_a_window_copied_out_does_not_share_the_rings_memory() -> None:
    ring = DeviceRingBuffer("cam", device="cpu", length=2, stride=1, frame_shape=SHAPE)
    for i in range(2):
        assert ring.write_frame(torch.from_numpy(frame(i)), meta(i))
    out = torch.empty((3, 2, 4, 4))
    window = ring.take_window(out)
    assert window is not None and window.last_frame == 1
    ring._frames.zero_()
    assert out[0, :, 0, 0].tolist() == [0.0, 1.0]


@pytest.mark.timeout(20)
def test_a_lossless_writer_waits_for_the_reader_instead_of_overwriting() -> None:
    ring = DeviceRingBuffer(
        "cam", device="cpu", length=4, stride=4, capacity=6, lossless=True, frame_shape=SHAPE
    )
    for i in range(6):
        assert ring.write_frame(frame(i), meta(i), timeout=1.0)
    assert not ring.write_frame(frame(6), meta(6), timeout=0.05)  # would destroy window 0-3
    writer = threading.Thread(target=ring.write_frame, args=(frame(6), meta(6), 10.0))
    writer.start()
    window = ring.take_window()
    writer.join(10)
    assert not writer.is_alive() and window is not None and window.first_frame == 0
    assert ring.frames_written == 7 and ring.windows_skipped == 0


def test_gating_measures_a_host_copy_of_each_frame_as_the_host_ring_does() -> None:
    """The activity meter sees the same numbers whichever ring holds the frames."""
    rng = np.random.default_rng(0)
    host = RingBuffer("cam", length=4, stride=2, frame_shape=(3, 112, 112), meter=ActivityMeter())
    device = DeviceRingBuffer(
        "cam", device="cpu", length=4, stride=2, frame_shape=(3, 112, 112), meter=ActivityMeter()
    )
    scene = rng.normal(0, 1, (3, 112, 112)).astype(np.float32)
    for i in range(40):
        f = scene + rng.normal(0, 0.05, scene.shape).astype(np.float32)
        if i == 30:
            f[:, 40:60, 40:52] += 1.5  # an object appears
        assert host.write_frame(f, meta(i)) and device.write_frame(torch.from_numpy(f), meta(i))
    assert np.array_equal(host._activity, device._activity)
    assert np.isfinite(host._activity).any() and (host._activity > 1.0).any()


@pytest.mark.timeout(20)
def test_close_wakes_a_waiting_lossless_writer() -> None:
    ring = DeviceRingBuffer(
        "cam", device="cpu", length=2, stride=2, capacity=3, lossless=True, frame_shape=SHAPE
    )
    for i in range(3):
        ring.write_frame(frame(i), meta(i))
    result: list[bool] = []
    writer = threading.Thread(target=lambda: result.append(ring.write_frame(frame(3), meta(3))))
    writer.start()
    ring.close()
    writer.join(10)
    assert result == [False]
