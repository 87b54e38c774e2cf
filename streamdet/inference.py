"""Inference: the engine that runs C3D_BN fast, and the thread that batches windows of all sources.

``build_engine`` folds BatchNorm into the convolutions, picks the numeric path for the device,
and checks it against fp32 before trusting it. ``InferenceThread`` waits for ready windows,
copies them into one preallocated (pinned, on CUDA) batch, runs the engine and hands each
result on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from streamdet.buffer import RingBuffer, Window
from streamdet.models.c3d import INPUT_SHAPE, C3D_BN, fuse_bn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for CUDA without one is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        from streamdet.errors import StreamdetError

        raise StreamdetError("device 'cuda' requested, but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, but got {requested!r}")
    return torch.device(requested)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 convolutions beat fp32 several times."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


class Engine:
    """A callable (B, 3, 16, 112, 112) float32 tensor -> (B, num_classes) float32 logits.

    Attributes:
        device: where the model runs.
        precision: the path in use (``fp32``, ``bf16``, ``fp16``, ``int8``).
        num_classes: logits per clip.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str,
                 num_classes: int, autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.device = device
        self.precision = precision
        self.num_classes = num_classes
        self._autocast_dtype = autocast_dtype
        self._input_dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5 or tuple(clips.shape[1:]) != INPUT_SHAPE:
            raise ValueError(f"expected (B, {', '.join(map(str, INPUT_SHAPE))}), but got {tuple(clips.shape)}")
        with torch.inference_mode():
            x = clips.to(self.device, non_blocking=True)
            x = x.to(memory_format=torch.channels_last_3d)
            if self._autocast_dtype is not None:
                ctx = torch.autocast(self.device.type, dtype=self._autocast_dtype)
            else:
                ctx = contextlib.nullcontext()
                x = x.to(self._input_dtype)
            with ctx:
                logits = self.model(x)
            return logits.float()


def _prepare(model: C3D_BN, device: torch.device) -> C3D_BN:
    fused = fuse_bn(model).to(device)
    return fused.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]


def _candidate(model: C3D_BN, device: torch.device, precision: str) -> Engine:
    num_classes = model.num_classes
    if precision == "fp32":
        return Engine(_prepare(model, device), device, "fp32", num_classes)
    if precision == "bf16":
        if device.type == "cpu":
            # bf16 weights in eager mode: the oneDNN bf16 kernels (AMX) without autocast overhead.
            return Engine(_prepare(model, device).to(torch.bfloat16), device, "bf16", num_classes)
        return Engine(_prepare(model, device), device, "bf16", num_classes, autocast_dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
        return Engine(_prepare(model, device), device, "fp16", num_classes, autocast_dtype=torch.float16)
    if precision == "int8":
        from streamdet.quantize import build_int8_engine

        return build_int8_engine(model, device)
    raise ValueError(f"precision must be one of {PRECISIONS}, but got {precision!r}")


def _auto_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def check_engine(engine: Engine, reference: Engine, clips: torch.Tensor, *,
                 max_rel_error: float = 0.05) -> tuple[bool, float, float]:
    """Compare ``engine`` with an fp32 ``reference`` on ``clips``.

    Returns:
        (ok, top-1 agreement in [0, 1], relative error ||a - b|| / ||b|| of the logits).
    """
    a = engine(clips).cpu()
    b = reference(clips).cpu()
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
    return agree == 1.0 and rel <= max_rel_error, agree, rel


def build_engine(model: C3D_BN, device: str | torch.device = "cpu", precision: str = "auto", *,
                 check_clips: torch.Tensor | None = None) -> Engine:
    """Build the fastest correct inference path for ``model`` on ``device``.

    Args:
        model: a C3D_BN (left untouched; the engine works on a fused copy).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch.device.
        precision: ``auto`` picks bf16 on CPUs with AMX/AVX512-BF16 and on CUDA (fp16 where bf16
            is unsupported), fp32 elsewhere; or force ``fp32``/``bf16``/``fp16``/``int8``.
        check_clips: windows (B, 3, 16, 112, 112) to check a reduced-precision path against
            fp32 with; random clips when None. A path that disagrees on top-1 or errs more than
            5% falls back to fp32 with a warning.

    Returns:
        A callable mapping a (B, 3, 16, 112, 112) float32 tensor to (B, num_classes) logits.

    Example:
        >>> from streamdet.models.c3d import C3D_BN
        >>> engine = build_engine(C3D_BN(num_classes=3, width=0.0625), "cpu", "fp32")
        >>> engine(torch.zeros(2, 3, 16, 112, 112)).shape
        torch.Size([2, 3])
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, but got {precision!r}")
    dev = device if isinstance(device, torch.device) else select_device(device)
    model = model.eval()
    chosen = _auto_precision(dev) if precision == "auto" else precision
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # set once, here: fixed input shapes
    engine = _candidate(model, dev, chosen)
    if chosen == "fp32":
        return engine
    reference = _candidate(model, dev, "fp32")
    if check_clips is None:
        gen = torch.Generator().manual_seed(0)
        check_clips = torch.randn((2, *INPUT_SHAPE), generator=gen)
    ok, agree, rel = check_engine(engine, reference, check_clips)
    if not ok:
        log.warning("precision %s disagrees with fp32 (top-1 agreement %.0f%%, relative error %.3g): "
                    "using fp32", chosen, agree * 100, rel)
        return reference
    log.info("inference path: %s on %s (top-1 agreement %.0f%%, relative error %.2g vs fp32)",
             chosen, dev, agree * 100, rel)
    return engine


@dataclass(frozen=True)
class WindowResult:
    """Class probabilities of one window, with where and when its frames came from."""

    source: str
    first_frame: int
    last_frame: int
    frame_times: np.ndarray  # (16,) UTC epoch seconds of the window's frames
    last_monotonic: float  # monotonic capture time of the newest frame
    probs: np.ndarray  # (num_classes,) softmax probabilities
    inference_ms: float  # this batch's forward time
    batch_size: int

    @property
    def first_time(self) -> float:
        return float(self.frame_times[0])

    @property
    def last_time(self) -> float:
        return float(self.frame_times[-1])


class InferenceThread(threading.Thread):
    """Batches ready windows of all sources and runs the engine on them.

    Args:
        rings: one ring buffer per source.
        engine: from :func:`build_engine`.
        on_result: called in this thread with each batch's results (in source-fair order).
        stop_event: shared stop signal.
        max_batch: most windows per forward pass.
        newest_only: names of live sources: when behind, take only their newest window.
        wake: set by capture threads whenever a frame is written (so this thread never polls).
        device: the engine's device (pinned host memory for CUDA).
        on_source_done: called once per source whose ring is closed and drained (after its
            last window's results), so its events can end after every window was seen.
    """

    def __init__(
        self,
        rings: Sequence[RingBuffer],
        engine: Callable[[torch.Tensor], torch.Tensor],
        on_result: Callable[[list[WindowResult]], None],
        stop_event: threading.Event,
        *,
        max_batch: int = 8,
        newest_only: frozenset[str] = frozenset(),
        wake: threading.Event | None = None,
        device: torch.device | None = None,
        on_source_done: Callable[[str], None] = lambda source: None,
    ) -> None:
        super().__init__(name="inference", daemon=True)
        self.rings = list(rings)
        self.engine = engine
        self.on_result = on_result
        self.stop_event = stop_event
        self.max_batch = max_batch
        self.newest_only = newest_only
        self.wake = wake or threading.Event()
        self.on_source_done = on_source_done
        pin = device is not None and device.type == "cuda"
        # One preallocated host batch for the whole run: (max_batch, 3, 16, 112, 112).
        self._batch = torch.empty((max_batch, *INPUT_SHAPE), dtype=torch.float32, pin_memory=pin)
        self._batch_np = self._batch.numpy()
        self.inference_ms: list[float] = []
        self.windows_done = 0
        self.idle = threading.Event()  # set while no window is pending
        self.error: BaseException | None = None
        self._next_ring = 0
        self._done: set[str] = set()

    def _gather(self) -> list[Window]:
        windows: list[Window] = []
        n = len(self.rings)
        progress = True
        # Round-robin over sources, one window each per pass, so no source starves another.
        while progress and len(windows) < self.max_batch:
            progress = False
            for i in range(n):
                if len(windows) >= self.max_batch:
                    break
                ring = self.rings[(self._next_ring + i) % n]
                newest = ring.name in self.newest_only
                if newest and any(w.source == ring.name for w in windows):
                    continue
                w = ring.take_window(self._batch_np[len(windows)], newest=newest)
                if w is not None:
                    windows.append(w)
                    progress = True
        self._next_ring = (self._next_ring + 1) % max(n, 1)
        return windows

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.wake.clear()
                windows = self._gather()
                if not windows:
                    self._report_drained()
                    self.idle.set()
                    self.wake.wait(0.1)
                    continue
                self.idle.clear()
                self._infer(windows)
        except BaseException as exc:  # reported by the pipeline, which stops everything
            self.error = exc
            self.stop_event.set()

    def _report_drained(self) -> None:
        for ring in self.rings:
            # closed is read before pending: a closed ring gets no more windows.
            if ring.name not in self._done and ring.closed and ring.pending() == 0:
                self._done.add(ring.name)
                self.on_source_done(ring.name)

    @property
    def all_done(self) -> bool:
        return len(self._done) == len(self.rings)

    def _infer(self, windows: list[Window]) -> None:
        n = len(windows)
        t0 = time.perf_counter()
        logits = self.engine(self._batch[:n])
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        ms = (time.perf_counter() - t0) * 1000.0
        self.inference_ms.append(ms)
        if len(self.inference_ms) > 4096:
            del self.inference_ms[:2048]  # bounded: recent history is enough for percentiles
        results = [
            WindowResult(w.source, w.first_frame, w.last_frame, w.frame_times, w.last_monotonic,
                         probs[i], ms, n)
            for i, w in enumerate(windows)
        ]
        self.windows_done += n
        self.on_result(results)
