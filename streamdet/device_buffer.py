"""A ring buffer whose frames live in torch memory on a device: the GPU path's ring.

:class:`DeviceRingBuffer` is a :class:`~streamdet.buffer.RingBuffer` (the same lock, the same
rules: every frame written twice so a window is a view, lossless and live modes, gaps, the
activity of each frame for gating) whose store is a torch tensor on ``device``. The capture
thread preprocesses each frame straight into its slot there (:mod:`streamdet.preprocess_torch`)
and the inference scheduler copies a window into its batch on the same device: no frame
crosses to the host on the way to the model.

Every write and every window copy is queued on the device's current stream, which the capture
and inference threads share (PyTorch's default stream), so a window copied after a frame's
commit sees that frame, as on the host.

Example:
    >>> import torch
    >>> ring = DeviceRingBuffer("cam", length=4, stride=2, frame_shape=(1, 2, 2), device="cpu")
    >>> for i in range(6):
    ...     _ = ring.write_frame(torch.full((1, 2, 2), float(i)), FrameMeta(i, float(i), float(i)))
    >>> w = ring.take_window()
    >>> (w.first_frame, w.last_frame)
    (0, 3)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from streamdet.buffer import FrameMeta, FrameMeter, RingBuffer, Scene

__all__ = ["DeviceRingBuffer", "FrameMeta", "HostMeter"]


class HostMeter:
    """A :class:`~streamdet.buffer.FrameMeter` (motion gating's activity meter) fed device
    frames: each frame is copied to the host and measured there.

    The copy waits for the frame's preprocessing on the device (a synchronisation per frame of
    a gated source) and moves 150 kB per 112x112 frame; what the meter computes is unchanged,
    so gating decides as on the CPU path.
    """

    def __init__(self, meter: FrameMeter) -> None:
        self.meter = meter

    def update(self, frame: Any) -> float:
        if isinstance(frame, torch.Tensor):
            frame = frame.detach().to("cpu").numpy()
        return self.meter.update(frame)

    def reset(self) -> None:
        self.meter.reset()

    def scene(self) -> Scene | None:
        return self.meter.scene()


class DeviceRingBuffer(RingBuffer):
    """A :class:`~streamdet.buffer.RingBuffer` whose frames are a float32 tensor on ``device``.

    Args:
        name: source name carried by its windows.
        device: where the frames live (``cuda`` on the GPU path; ``cpu`` runs the same code
            without a GPU, as the tests do).
        **kwargs: as :class:`~streamdet.buffer.RingBuffer` (``length``, ``stride``,
            ``frame_shape``, ``capacity``, ``lossless``, ``meter``); a ``meter`` measures a
            host copy of each frame (:class:`HostMeter`).

    ``slot()`` hands out a (C, H, W) tensor view, ``write_frame`` takes a tensor (or an array),
    and ``take_window(out)`` copies into a tensor ``out`` on any device (a slot of the
    scheduler's batch) or returns a new tensor on ``device``.
    """

    def __init__(self, name: str, *, device: str | torch.device, **kwargs: Any) -> None:
        self.device = torch.device(device)
        meter = kwargs.pop("meter", None)
        super().__init__(name, meter=HostMeter(meter) if meter is not None else None, **kwargs)

    def _allocate(self, shape: tuple[int, int, int, int]) -> Any:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _copy_window(self, view: Any, out: Any) -> Any:
        if out is None:
            return view.clone()
        if isinstance(out, np.ndarray):  # a host batch: the one place a window leaves the device
            out[...] = view.to("cpu").numpy()
            return out
        out.copy_(view, non_blocking=True)
        return out

    def write_frame(self, frame: Any, meta: FrameMeta, timeout: float | None = None) -> bool:
        """Copy an already preprocessed frame (tensor or array) in and publish it."""
        if isinstance(frame, np.ndarray):
            frame = torch.from_numpy(frame)
        return super().write_frame(frame, meta, timeout)
