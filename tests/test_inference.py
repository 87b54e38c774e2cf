"""Tests of inference: the engine's numeric paths and input checks, and the batching thread.

The thread is tested with a recording fake engine, so batches can be checked window by window;
the engine tests use a real C3D_BN at width 0.0625.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np
import pytest
import torch

from streamdet.buffer import FrameMeta, RingBuffer
from streamdet.inference import InferenceThread, WindowResult, build_engine, check_engine
from streamdet.inference import engine as engine_module
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE

FRAME_SHAPE = (3, 112, 112)
T0 = 1_700_000_000.0
# Waits on threads: work that takes milliseconds, with room for a busy 2-core machine.
DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def tiny_model() -> C3D_BN:
    torch.manual_seed(0)
    return C3D_BN(num_classes=3, width=0.0625).eval()


def test_fp32_engine_matches_the_unfused_model(tiny_model: C3D_BN) -> None:
    clips = torch.randn((2, *INPUT_SHAPE), generator=torch.Generator().manual_seed(1))

    engine = build_engine(tiny_model, "cpu", "fp32")

    assert engine.precision == "fp32" and engine.num_classes == 3
    with torch.inference_mode():
        expected = tiny_model(clips)
    torch.testing.assert_close(engine(clips), expected, rtol=1e-4, atol=1e-5)


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU (AVX512 or AVX512-BF16/AMX)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and supported is not None and supported())


@pytest.mark.skipif(
    not cpu_supports_bf16(),
    reason="this CPU has no bf16 support in oneDNN (needs AVX512 or AVX512-BF16/AMX)",
)
def test_bf16_engine_runs_in_bf16_and_passes_its_check_against_fp32(
    tiny_model: C3D_BN, tmp_path
) -> None:
    """Regression: the test accepted an fp32 engine, so a bf16 path that always failed its check
    (and fell back to fp32) or that never left fp32 passed unnoticed."""
    clips = torch.randn((2, *INPUT_SHAPE), generator=torch.Generator().manual_seed(2))
    reference = build_engine(tiny_model, "cpu", "fp32", cache_dir=tmp_path)

    engine = build_engine(tiny_model, "cpu", "bf16", check_clips=clips, cache_dir=tmp_path)

    assert engine.precision == "bf16" and engine.path.startswith("bf16-"), engine.path
    ok, agree, rel = check_engine(engine, reference, clips)
    assert ok, f"the bf16 engine disagrees with fp32: top-1 {agree:.0%}, relative error {rel:.3g}"
    # bf16 keeps 8 significant bits: its logits differ from fp32's (measured 2e-3), an fp32
    # path run under the bf16 name would not (5e-8).
    assert rel > 1e-4, f"relative error {rel:.3g}: the engine computes in fp32, not bf16"


def test_a_reduced_precision_path_that_fails_its_check_falls_back_to_fp32(
    tiny_model: C3D_BN, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    monkeypatch.setattr(engine_module, "check_engine", lambda *args, **kwargs: (False, 0.5, 0.3))

    with caplog.at_level(logging.WARNING, logger="streamdet.inference"):
        engine = build_engine(tiny_model, "cpu", "bf16", cache_dir=tmp_path)

    assert engine.precision == "fp32"
    assert "disagrees with fp32" in caplog.text


@pytest.mark.parametrize(
    ("shape", "expectation"),
    [
        ((1, *INPUT_SHAPE), contextlib.nullcontext()),
        ((2, 3, 8, 112, 112), pytest.raises(ValueError, match=r"expected \(B, 3, 16, 112, 112\)")),
        ((2, 3, 16, 64, 64), pytest.raises(ValueError, match=r"but got \(2, 3, 16, 64, 64\)")),
        ((3, 16, 112, 112), pytest.raises(ValueError, match="expected")),
    ],
)
def test_engine_checks_the_clip_shape(
    tiny_model: C3D_BN, shape: tuple[int, ...], expectation
) -> None:
    engine = build_engine(tiny_model, "cpu", "fp32")
    with expectation:
        assert engine(torch.zeros(shape)).shape == (shape[0], 3)


@pytest.mark.parametrize(
    ("kwargs", "expectation"),
    [
        (
            {"precision": "fp64"},
            pytest.raises(
                ValueError, match="precision must be auto, fp32, bf16, fp16 or int8, but got 'fp64'"
            ),
        ),
        ({"device": "tpu"}, pytest.raises(ValueError, match="device must be auto, cpu or cuda")),
    ],
)
def test_build_engine_rejects_unknown_options(
    tiny_model: C3D_BN, kwargs: dict, expectation
) -> None:
    with expectation:
        build_engine(tiny_model, **kwargs)


# -- the inference thread --------------------------------------------------------------------


def value(tag: int, index: int) -> float:
    """Pixel value of frame ``index`` of source number ``tag``."""
    return tag * 1000.0 + index


def filled_ring(
    name: str,
    tag: int,
    n_frames: int,
    *,
    stride: int = 8,
    lossless: bool = True,
    close: bool = False,
) -> RingBuffer:
    ring = RingBuffer(
        name,
        length=16,
        stride=stride,
        frame_shape=FRAME_SHAPE,
        capacity=n_frames + 1,
        lossless=lossless,
    )
    for i in range(n_frames):
        ring.write_frame(
            np.full(FRAME_SHAPE, value(tag, i), np.float32), FrameMeta(i, T0 + i / 10, float(i))
        )
    if close:
        ring.close()
    return ring


class RecordingEngine:
    """Fake engine: keeps a copy of each batch; logits favour class 1 by the clip's first pixel."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.batches: list[torch.Tensor] = []
        self.fail_on_call = fail_on_call
        self.device = torch.device("cpu")

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if len(self.batches) == self.fail_on_call:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.batches.append(clips.clone())
        logits = torch.zeros((clips.shape[0], 2))
        logits[:, 1] = clips[:, 0, 0, 0, 0] / 1000.0
        return logits


class Collector:
    """on_result / on_source_done callbacks that record what happened, in order."""

    def __init__(
        self, stop_after_done: int | None = None, stop_event: threading.Event | None = None
    ) -> None:
        self.results: list[list[WindowResult]] = []
        self.log: list[tuple[str, str]] = []
        self._stop_after_done = stop_after_done
        self._stop_event = stop_event

    def on_result(self, results: list[WindowResult]) -> None:
        self.results.append(results)
        self.log += [("result", r.window.source) for r in results]

    def on_source_done(self, source: str) -> None:
        self.log.append(("done", source))
        done = sum(1 for kind, _ in self.log if kind == "done")
        if self._stop_after_done is not None and done == self._stop_after_done:
            assert self._stop_event is not None
            self._stop_event.set()


def run_thread(
    rings: list[RingBuffer], engine: RecordingEngine, **kwargs
) -> tuple[InferenceThread, Collector]:
    """Runs an InferenceThread until every ring is drained (rings must be closed) or it fails."""
    stop_event = threading.Event()
    collector = Collector(stop_after_done=len(rings), stop_event=stop_event)
    thread = InferenceThread(
        rings,
        engine,
        collector.on_result,
        stop_event,
        on_source_done=collector.on_source_done,
        **kwargs,
    )
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), "the inference thread did not stop"
    return thread, collector


@pytest.mark.timeout(60)
def test_windows_of_several_sources_share_batches_and_each_result_matches_its_window() -> None:
    rings = [
        filled_ring("a", 1, 40, close=True),
        filled_ring("b", 2, 40, close=True),
        filled_ring("c", 3, 24, close=True),
    ]  # 4, 4 and 2 windows
    engine = RecordingEngine()

    thread, collector = run_thread(rings, engine, max_batch=4)

    assert thread.error is None
    assert [len(b) for b in engine.batches] == [4, 4, 2]
    assert thread.windows_done == 10
    tags = {"a": 1, "b": 2, "c": 3}
    for batch, results in zip(engine.batches, collector.results, strict=True):
        for clip, r in zip(batch, results, strict=True):
            # the batch slot holds this result's window: frames first_frame..last_frame of its source
            expected = [
                value(tags[r.window.source], i)
                for i in range(r.window.first_frame, r.window.last_frame + 1)
            ]
            assert clip[0, :, 0, 0].tolist() == expected
            np.testing.assert_allclose(
                r.window.frame_times,
                T0 + np.arange(r.window.first_frame, r.window.last_frame + 1) / 10,
            )
            assert r.window.last_monotonic == float(r.window.last_frame)
            expected_p1 = torch.softmax(torch.tensor([0.0, expected[0] / 1000.0]), 0)[1].item()
            assert r.probs == pytest.approx([1 - expected_p1, expected_p1], rel=1e-5)
            assert r.batch_size == len(results) and r.inference_ms >= 0
    per_source = {
        name: [
            (r.window.first_frame, r.window.last_frame)
            for rs in collector.results
            for r in rs
            if r.window.source == name
        ]
        for name in tags
    }
    assert per_source == {
        "a": [(0, 15), (8, 23), (16, 31), (24, 39)],
        "b": [(0, 15), (8, 23), (16, 31), (24, 39)],
        "c": [(0, 15), (8, 23)],
    }


@pytest.mark.timeout(60)
def test_round_robin_gives_every_source_its_share_of_small_batches() -> None:
    rings = [
        filled_ring(name, tag, 64, close=True) for tag, name in enumerate("abc", 1)
    ]  # 7 windows each

    _, collector = run_thread(rings, RecordingEngine(), max_batch=2)

    first_six = [r.window.source for rs in collector.results[:3] for r in rs]
    assert sorted(first_six) == ["a", "a", "b", "b", "c", "c"]
    assert [len(rs) for rs in collector.results] == [2] * 10 + [1]


@pytest.mark.timeout(60)
def test_a_live_source_one_window_behind_loses_no_window() -> None:
    live = filled_ring("cam", 1, 24, lossless=False, close=True)  # windows end at 15 and 23

    _, collector = run_thread(
        [live], RecordingEngine(), max_batch=8, newest_only=frozenset({"cam"})
    )

    cam = [(r.window.first_frame, r.window.last_frame) for rs in collector.results for r in rs]
    assert cam == [(0, 15), (8, 23)]
    assert live.windows_skipped == 0


@pytest.mark.timeout(60)
def test_newest_only_sources_give_one_window_per_batch_and_count_the_skipped() -> None:
    live = filled_ring(
        "cam", 1, 48, lossless=False, close=True
    )  # windows end at 15, 23, 31, 39, 47
    replay = filled_ring("file", 2, 48, close=True)

    _, collector = run_thread(
        [live, replay], RecordingEngine(), max_batch=8, newest_only=frozenset({"cam"})
    )

    cam = [
        (r.window.first_frame, r.window.last_frame)
        for rs in collector.results
        for r in rs
        if r.window.source == "cam"
    ]
    assert cam == [(32, 47)]
    assert live.windows_skipped == 4
    assert len([r for rs in collector.results for r in rs if r.window.source == "file"]) == 5
    assert replay.windows_skipped == 0


@pytest.mark.timeout(60)
def test_a_source_is_reported_done_once_after_its_last_result() -> None:
    rings = [filled_ring("a", 1, 40, close=True), filled_ring("b", 2, 16, close=True)]

    thread, collector = run_thread(rings, RecordingEngine(), max_batch=2)

    assert thread.all_done
    for name in ("a", "b"):
        assert collector.log.count(("done", name)) == 1
        done_at = collector.log.index(("done", name))
        assert all(entry != ("result", name) for entry in collector.log[done_at:])
    assert collector.log.count(("result", "a")) == 4


@pytest.mark.timeout(60)
def test_an_ended_source_is_reported_done_while_other_sources_still_have_windows() -> None:
    """Regression: on_source_done ran only when no source at all had a window ready.

    While a long replay kept inference busy, a source that had ended kept its events open and
    the overlay held back its last frames, waiting for the source to be reported done.
    """
    short = filled_ring("short", 1, 16, close=True)  # one window
    long = filled_ring("long", 2, 96)  # eleven windows, still open
    stop_event = threading.Event()
    collector = Collector()
    thread = InferenceThread(
        [short, long],
        RecordingEngine(),
        collector.on_result,
        stop_event,
        max_batch=2,
        on_source_done=collector.on_source_done,
    )
    thread.start()
    try:
        assert _wait_for(lambda: thread.windows_done == 12 and thread.idle.is_set())
    finally:
        stop_event.set()
        thread.join(DEADLINE_S)

    done_at = collector.log.index(("done", "short"))
    assert collector.log[:done_at] == [("result", "short"), ("result", "long")]


@pytest.mark.timeout(60)
def test_an_open_ring_is_not_done_until_closed_and_drained() -> None:
    ring = filled_ring("a", 1, 16)
    stop_event = threading.Event()
    collector = Collector()
    wake = threading.Event()
    thread = InferenceThread(
        [ring],
        RecordingEngine(),
        collector.on_result,
        stop_event,
        wake=wake,
        on_source_done=collector.on_source_done,
    )
    thread.start()
    try:
        assert _wait_for(lambda: thread.windows_done == 1)
        assert thread.idle.wait(DEADLINE_S)
        assert collector.log == [("result", "a")]
        ring.close()
        wake.set()
        assert _wait_for(lambda: ("done", "a") in collector.log)
    finally:
        stop_event.set()
        thread.join(DEADLINE_S)
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_an_engine_crash_is_recorded_and_stops_the_run() -> None:
    rings = [filled_ring("a", 1, 40, close=True)]
    stop_event = threading.Event()
    collector = Collector()
    thread = InferenceThread(
        rings, RecordingEngine(fail_on_call=1), collector.on_result, stop_event, max_batch=2
    )

    thread.start()
    thread.join(DEADLINE_S)

    assert not thread.is_alive()
    assert isinstance(thread.error, RuntimeError) and "illegal memory access" in str(thread.error)
    assert stop_event.is_set()
    assert len(collector.results) == 1


@pytest.mark.timeout(60)
def test_a_result_callback_crash_is_recorded_and_stops_the_run() -> None:
    stop_event = threading.Event()

    def on_result(results: list[WindowResult]) -> None:
        raise ValueError("probs must be finite")

    thread = InferenceThread(
        [filled_ring("a", 1, 16, close=True)], RecordingEngine(), on_result, stop_event
    )
    thread.start()
    thread.join(DEADLINE_S)

    assert isinstance(thread.error, ValueError)
    assert stop_event.is_set()


class OverlappingEngine(RecordingEngine):
    """Fake engine for two workers: its first two calls wait for each other (so they provably run
    at once), then the first gathered batch (frame 0 of source a) finishes last."""

    def __init__(self) -> None:
        super().__init__()
        self.meeting = threading.Barrier(2, timeout=DEADLINE_S)
        self.calls = 0
        self.torch_threads: set[int] = set()

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.torch_threads.add(torch.get_num_threads())
        if self.calls <= 2:
            self.meeting.wait()  # BrokenBarrierError (recorded as the thread's error) if they never overlap
            if clips[0, 0, 0, 0, 0] == value(1, 0):
                time.sleep(0.3)
        return super().__call__(clips)


@pytest.mark.timeout(60)
def test_two_workers_run_side_by_side_and_results_keep_their_gathering_order() -> None:
    rings = [
        filled_ring("a", 1, 40, close=True),
        filled_ring("b", 2, 24, close=True),
    ]  # 4 and 2 windows
    engine = OverlappingEngine()
    main_threads = torch.get_num_threads()

    thread, collector = run_thread(rings, engine, max_batch=1, workers=2, threads_per_worker=1)

    assert thread.error is None
    assert engine.torch_threads == {1}  # each worker set its own count ...
    assert torch.get_num_threads() == main_threads  # ... and left this thread's alone
    order = [(r.window.source, r.window.first_frame) for rs in collector.results for r in rs]
    # round-robin gathering order, although the second batch (b, 0) finished before the first
    assert order == [("a", 0), ("b", 0), ("a", 8), ("b", 8), ("a", 16), ("a", 24)]
    for name in ("a", "b"):
        assert collector.log.count(("done", name)) == 1
        assert collector.log.index(("done", name)) > max(
            i for i, entry in enumerate(collector.log) if entry == ("result", name)
        )
    assert thread.windows_done == 6 and len(thread.inference_ms) == 6


@pytest.mark.timeout(60)
def test_a_source_is_not_done_while_another_worker_still_scores_its_last_window() -> None:
    rings = [
        filled_ring("a", 1, 16, close=True),
        filled_ring("b", 2, 16, close=True),
    ]  # one window each
    engine = OverlappingEngine()  # (a, 0) is scored last

    _, collector = run_thread(rings, engine, max_batch=1, workers=2)

    assert collector.log.index(("done", "a")) > collector.log.index(("result", "a"))
    assert collector.log.index(("done", "b")) > collector.log.index(("result", "b"))


class BlockingDelivery:
    """on_result whose first call blocks until released, as an fsync on a slow disk would; it
    records the order of the results and whether two calls ever overlapped."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()  # set once the first call is blocking
        self.order: list[tuple[str, int]] = []
        self.overlapped = False
        self._active = 0
        self._lock = threading.Lock()

    def on_result(self, results: list[WindowResult]) -> None:
        with self._lock:
            self._active += 1
            self.overlapped |= self._active > 1
        try:
            if not self.blocked.is_set():
                self.blocked.set()
                self.release.wait(3 * DEADLINE_S)  # outlasts any check below: the test releases it
            self.order += [(r.window.source, r.window.first_frame) for r in results]
        finally:
            with self._lock:
                self._active -= 1


class CountingEngine(RecordingEngine):
    """RecordingEngine that counts the forward passes that have returned, thread-safely."""

    def __init__(self) -> None:
        super().__init__()
        self.scored = 0
        self._lock = threading.Lock()

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        with self._lock:
            logits = super().__call__(clips)
            self.scored += 1
        return logits


@pytest.mark.timeout(90)
def test_a_slow_result_callback_holds_back_no_other_worker() -> None:
    """Regression: on_result ran under the scheduler's lock, so while one worker's callback
    waited on a slow disk (an fsync of the event log) every other worker blocked on that lock
    as soon as it finished its batch, and scored nothing more."""
    ring = filled_ring("a", 1, 64, close=True)  # 7 windows
    engine = CountingEngine()
    delivery = BlockingDelivery()
    stop_event = threading.Event()
    thread = InferenceThread([ring], engine, delivery.on_result, stop_event, max_batch=1, workers=2)
    thread.start()
    try:
        assert delivery.blocked.wait(DEADLINE_S), "no result was delivered"
        # Two windows were taken before the delivery blocked; a third scored means the other
        # worker parked its batch and went on.
        assert _wait_for(lambda: engine.scored >= 3), (
            f"only {engine.scored} forward passes while a delivery was blocked"
        )
        assert thread.windows_done == 0  # ... and nothing was handed on past the blocked one
    finally:
        delivery.release.set()
    assert _wait_for(lambda: thread.windows_done == 7)
    stop_event.set()
    thread.join(DEADLINE_S)

    assert not thread.is_alive() and thread.error is None
    assert delivery.order == [("a", first) for first in range(0, 49, 8)]  # gathering order
    assert not delivery.overlapped


@pytest.mark.timeout(90)
def test_workers_wait_for_a_blocked_delivery_rather_than_queue_without_bound() -> None:
    ring = filled_ring("a", 1, 160, close=True)  # 19 windows
    engine = CountingEngine()
    delivery = BlockingDelivery()
    stop_event = threading.Event()
    thread = InferenceThread([ring], engine, delivery.on_result, stop_event, max_batch=1, workers=2)
    thread.start()
    try:
        assert delivery.blocked.wait(DEADLINE_S), "no result was delivered"
        assert _wait_for(lambda: engine.scored >= 4)
        stop_event.wait(0.5)  # time in which unbounded workers would score every window
        assert engine.scored == 4  # 2 batches per worker gathered and not yet delivered
    finally:
        delivery.release.set()
    assert _wait_for(lambda: thread.windows_done == 19)
    stop_event.set()
    thread.join(DEADLINE_S)
    assert delivery.order == [("a", first) for first in range(0, 145, 8)]


def test_an_engine_that_cannot_run_concurrently_gets_no_second_worker() -> None:
    engine = RecordingEngine()
    engine.concurrent = False  # type: ignore[attr-defined]

    with pytest.raises(ValueError, match="use one worker"):
        InferenceThread([], engine, lambda r: None, threading.Event(), workers=2)
    InferenceThread([], engine, lambda r: None, threading.Event(), workers=1)


def _wait_for(condition, timeout: float = DEADLINE_S) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds have passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        threading.Event().wait(0.01)
    return condition()
