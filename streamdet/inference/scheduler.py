"""The inference scheduler: worker threads that batch ready windows of all sources, score them
with an engine and hand the results on in the order their windows were taken.

Example:
    >>> import threading
    >>> import torch
    >>> from streamdet.buffer import RingBuffer
    >>> ring = RingBuffer("cam", length=16, stride=8, frame_shape=(3, 112, 112), capacity=32)
    >>> thread = InferenceThread([ring], lambda clips: torch.zeros(len(clips), 2), print,
    ...                          threading.Event())
    >>> thread.workers, thread.windows_done
    (1, 0)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamdet.buffer import RingBuffer, Window
from streamdet.gating import Gate
from streamdet.models.c3d import INPUT_SHAPE

GATED_PER_PASS = 4  # a pass takes at most this many times max_batch windows, gated ones included


@dataclass(frozen=True)
class WindowResult:
    """Class probabilities of one window (which holds where and when its frames came from)."""

    window: Window
    probs: np.ndarray  # (num_classes,) softmax probabilities
    inference_ms: float  # this batch's forward time
    batch_size: int  # windows in this batch's forward pass (0: none ran)
    gated: bool = False  # not scored (motion gating): ``probs`` is all background


class InferenceThread(threading.Thread):
    """Batches ready windows of all sources and runs the engine on them, on one or more workers.

    Each worker gathers a batch, runs the engine on it and parks the results; results reach
    ``on_result`` in the order their batches were gathered, one call at a time. Whichever worker
    finds the next batch in order ready becomes the deliverer: it hands on ready batches (and
    ends of sources) outside the lock until none is left, while the other workers park theirs
    and gather again, so a slow callback (an fsync of the event log) holds back no forward pass.
    At most ``2 * workers`` batches wait gathered and undelivered: past that, workers wait for
    the deliverer rather than queue results without bound (live sources then skip windows).

    Several workers suit a CPU: on 2 cores, beside a decoding thread, two workers on one torch
    thread each replayed a file faster than one worker on two (an OpenMP team waits at every
    barrier for whichever of its threads the decoder or the host displaced; independent workers
    do not). See benchmarks/RESULTS.md, 'Inference workers: two one-thread workers instead of one
    two-thread team'.

    Args:
        rings: one ring buffer per source.
        engine: from :func:`~streamdet.inference.build_engine`; with several workers, one whose
            ``concurrent`` is true.
        on_result: called with each batch's results (in source-fair order), in gathering order,
            never from two threads at once, and never while a worker waits on it to gather.
        stop_event: shared stop signal.
        max_batch: most windows per forward pass.
        newest_only: names of live sources: when more than ``live_max_lag`` of their windows are
            ready, take only the newest (and count the others skipped), so latency stays bounded.
        live_max_lag: ready windows a live source may fall behind by before that jump. 2 rides out
            a one-window hiccup (a decode burst, a slow batch) without losing a window, at up to
            one stride period of extra latency for the windows caught up on.
        wake: set by capture threads whenever a frame is written (so no worker ever polls).
        device: the engine's device (pinned host memory for CUDA).
        on_source_done: called once per source whose ring is closed and drained (after its
            last window's results), so its events can end after every window was seen; by the
            deliverer, like ``on_result``, never at the same time as it.
        fixed_batch: run every forward pass at exactly ``max_batch`` (padding with stale slots),
            so a window's scores never depend on how many others happened to be ready. Kernels
            pick different algorithms per batch size, which moves logits by ~1e-6: enough to
            flip a threshold now and then. Replays use it for run-to-run identical events.
        workers: threads running forward passes side by side, each with its own preallocated
            batch. This thread is the first; it starts and joins the others.
        threads_per_worker: torch intra-op threads each worker sets for itself (None: leave the
            process's setting).
        gate: motion gating: a window it does not let through is not scored but handed on, in
            its place in the order, with the gate's background probabilities (``gated``).
        batch_device: where the batches live when the rings are
            :class:`~streamdet.device_buffer.DeviceRingBuffer` on that device (the GPU path):
            windows are copied into the batch there, never through the host. None: host batches.
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
        fixed_batch: bool = False,
        live_max_lag: int = 2,
        workers: int = 1,
        threads_per_worker: int | None = None,
        gate: Gate | None = None,
        batch_device: torch.device | None = None,
    ) -> None:
        super().__init__(name="inference", daemon=True)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, but got {workers}")
        if workers > 1 and not getattr(engine, "concurrent", True):
            raise ValueError(f"{engine!r} cannot run on several threads at once: use one worker")
        self.rings = list(rings)
        self.engine = engine
        self.on_result = on_result
        self.stop_event = stop_event
        self.max_batch = max_batch
        self.fixed_batch = fixed_batch
        self.newest_only = newest_only
        self.live_max_lag = live_max_lag
        self.wake = wake or threading.Event()
        self.on_source_done = on_source_done
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.gate = gate
        pin = device is not None and device.type == "cuda" and batch_device is None
        self._device_batches = batch_device is not None
        # One preallocated batch per worker for the whole run: (max_batch, 3, 16, 112, 112), on
        # the host (pinned for CUDA) or on the rings' device.
        self._batches = [
            torch.empty(
                (max_batch, *INPUT_SHAPE), dtype=torch.float32, pin_memory=pin, device=batch_device
            )
            for _ in range(workers)
        ]
        self.inference_ms: list[float] = []
        self.windows_done = 0
        self.idle = threading.Event()  # set while no window is pending or being scored
        self.error: BaseException | None = None
        # Guards gathering and every field below, so that a source is reported done only once
        # none of its windows is waiting in a ring, in a worker or in delivery. No callback
        # runs under it: the one deliverer (``_delivering``) calls them with it released.
        self._lock = threading.Lock()
        self._next_ring = 0
        self._gathered = 0  # batches handed to workers so far: the next batch's number
        self._delivered = 0  # batches whose on_result has returned: the next one to hand on
        self._finished: dict[int, list[WindowResult]] = {}  # scored, parked until their turn
        self._in_flight: dict[str, int] = {ring.name: 0 for ring in self.rings}
        self._done: set[str] = set()
        self._ended: deque[str] = deque()  # sources drained, their on_source_done not yet called
        self._delivering = False  # a worker is handing results on (outside the lock)
        self._max_undelivered = 2 * workers  # gathered, not yet delivered: beyond it, wait

    def _gather(self, batch: Any) -> tuple[list[Window], list[Window]]:
        """Take ready windows into ``batch`` (a host array, or a tensor on the rings' device):
        (every window taken, in order; those to score, each in the batch slot of its position in
        this list)."""
        taken: list[Window] = []
        scored: list[Window] = []
        n = len(self.rings)
        progress = True

        def full() -> bool:
            return len(scored) >= self.max_batch or len(taken) >= GATED_PER_PASS * self.max_batch

        # Round-robin over sources, one window each per pass, so no source starves another.
        while progress and not full():
            progress = False
            for i in range(n):
                if full():
                    break
                ring = self.rings[(self._next_ring + i) % n]
                newest = ring.name in self.newest_only
                if newest and any(w.source == ring.name for w in taken):
                    continue
                w = ring.take_window(batch[len(scored)], newest=newest, max_lag=self.live_max_lag)
                if w is not None:
                    taken.append(w)
                    if self.gate is None or self.gate.should_score(w):
                        scored.append(w)  # else its slot is written again by the next window
                    progress = True
        self._next_ring = (self._next_ring + 1) % max(n, 1)
        return taken, scored

    def run(self) -> None:
        helpers = [
            threading.Thread(target=self._work, args=(slot,), name=f"inference-{slot}", daemon=True)
            for slot in range(1, self.workers)
        ]
        for helper in helpers:
            helper.start()
        self._work(0)
        for helper in helpers:
            helper.join()

    def _work(self, slot: int) -> None:
        try:
            if self.threads_per_worker is not None:
                torch.set_num_threads(self.threads_per_worker)  # this thread's OpenMP team
            batch = self._batches[slot]
            batch_np = batch if self._device_batches else batch.numpy()
            while not self.stop_event.is_set():
                self.wake.clear()
                with self._lock:
                    backlog = self._gathered - self._delivered >= self._max_undelivered
                    windows, scored = ([], []) if backlog else self._gather(batch_np)
                    number = self._gathered
                    if windows:
                        self._gathered += 1
                        for w in windows:
                            self._in_flight[w.source] += 1
                    else:
                        self._report_drained()
                        settled = not (self._ended or self._delivering)
                        if self._delivered == self._gathered and settled:
                            self.idle.set()
                if not windows:
                    if not self._hand_on():  # an ended source to report: look again at once
                        self.wake.wait(0.1)
                    continue
                self.idle.clear()
                if self.workers > 1 and any(ring.pending() for ring in self.rings):
                    self.wake.set()  # a wake-up this worker consumed may be another's window
                results = self._infer(batch, windows, scored)
                with self._lock:
                    self._finished[number] = results
                self._hand_on()
        except BaseException as exc:  # reported by the pipeline, which stops everything
            if self.error is None:
                self.error = exc
            self.stop_event.set()

    def _report_drained(self) -> None:  # with self._lock held
        """Queue for on_source_done each source now closed and drained, whose windows are all
        delivered."""
        for ring in self.rings:
            # closed is read before pending: a closed ring gets no more windows.
            if (
                ring.name not in self._done
                and ring.closed
                and ring.pending() == 0
                and self._in_flight[ring.name] == 0
            ):
                self._done.add(ring.name)
                self._ended.append(ring.name)

    @property
    def all_done(self) -> bool:
        return len(self._done) == len(self.rings)

    def _infer(
        self, batch: torch.Tensor, windows: list[Window], scored: list[Window]
    ) -> list[WindowResult]:
        """Results of ``windows`` in their order: those in ``scored`` (batch slots 0..) from one
        forward pass, the others gated."""
        n = len(scored)
        ms, probs = 0.0, None
        if n:
            t0 = time.perf_counter()
            logits = self.engine(batch if self.fixed_batch else batch[:n])
            probs = torch.softmax(logits[:n].float(), dim=1).cpu().numpy()
            ms = (time.perf_counter() - t0) * 1000.0
        results, slot = [], 0
        for w in windows:
            if slot < n and w is scored[slot]:
                assert probs is not None
                results.append(WindowResult(w, probs[slot], ms, n))
                slot += 1
            else:
                assert self.gate is not None
                results.append(WindowResult(w, self.gate.background_probs, 0.0, 0, gated=True))
        return results

    def _hand_on(self) -> bool:
        """Deliver what is ready, unless another worker is delivering (then it will).

        Returns:
            True when this worker delivered something.
        """
        with self._lock:
            if self._delivering or not (self._ended or self._delivered in self._finished):
                return False
            self._delivering = True
        try:
            self._deliver_ready()
        except BaseException:
            with self._lock:
                self._delivering = False
            raise
        return True

    def _deliver_ready(self) -> None:
        """Hand on ended sources and parked batches, in order, until none is ready (deliverer only).

        The callbacks run with the lock released. A batch's windows count as in flight until
        on_result has returned, so no source is reported done before its last result.
        """
        while True:
            with self._lock:
                ended = self._ended.popleft() if self._ended else None
                ready = None if ended is not None else self._finished.pop(self._delivered, None)
                if ended is None and ready is None:
                    self._delivering = False  # in the same lock as the check: none is left behind
                    return
            if ended is not None:
                self.on_source_done(ended)
                continue
            assert ready is not None
            self.on_result(ready)
            with self._lock:
                self._count_delivered(ready)
                self._report_drained()  # a source may end while others keep inference busy
            if self.workers > 1:
                self.wake.set()  # a worker held back by the backlog may gather again

    def _count_delivered(self, ready: list[WindowResult]) -> None:  # with self._lock held
        self._delivered += 1
        if any(not r.gated for r in ready):  # a forward pass ran
            self.inference_ms.append(next(r.inference_ms for r in ready if not r.gated))
        if len(self.inference_ms) > 4096:
            del self.inference_ms[:2048]  # bounded: recent history is enough for percentiles
        self.windows_done += len(ready)
        for r in ready:
            self._in_flight[r.window.source] -= 1
