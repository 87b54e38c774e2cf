"""The CUDA paths on a real GPU: skipped on machines without one (CI), run on a lent GPU machine.

Everything here uses the shipped demo model and demo video, so it needs nothing but the checkout.
The CPU-side logic of these paths (device choice, pinned batch, graph padding) is unit-tested in
test_inference.py; these tests check that the real CUDA kernels give the same answers.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import torch

from streamdet import demo
from streamdet.buffer import FrameMeta, RingBuffer
from streamdet.cli import main
from streamdet.evaluation import evaluate_files
from streamdet.inference import InferenceThread, build_engine, build_path
from streamdet.models.c3d import CLIP_LENGTH
from streamdet.models.weights import load_checkpoint
from streamdet.preprocess import DEFAULT_CONTRACT, preprocess_frame

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEMO = demo.config_path().parent
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def demo_model():
    return load_checkpoint(DEMO / "c3d_bn_demo.safetensors").model


@pytest.fixture(scope="module")
def demo_windows() -> torch.Tensor:
    """12 real windows of the demo video, one every 40 frames (so they span several events)."""
    cap = cv2.VideoCapture(str(DEMO / "demo.mp4"))
    frames = []
    while (result := cap.read())[0]:
        frames.append(preprocess_frame(result[1], DEFAULT_CONTRACT))
    cap.release()
    stack = np.stack(frames, axis=1)
    starts = range(0, len(frames) - CLIP_LENGTH, 40)[:12]
    return torch.from_numpy(
        np.ascontiguousarray(np.stack([stack[:, s : s + CLIP_LENGTH] for s in starts]))
    )


def _cpu_fp32(model, windows: torch.Tensor) -> torch.Tensor:
    return build_path(model, torch.device("cpu"), "fp32-eager")(windows)


def test_auto_engine_on_cuda_uses_half_autocast_and_agrees_with_cpu_fp32(demo_model, demo_windows):
    engine = build_engine(demo_model, "cuda", "auto", check_clips=demo_windows[:4])
    assert engine.path in ("bf16-autocast", "fp16-autocast")
    out = engine(demo_windows).cpu()
    ref = _cpu_fp32(demo_model, demo_windows)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert float((out - ref).norm() / ref.norm()) < 0.05
    assert torch.backends.cudnn.benchmark  # set once by build_engine on CUDA


def test_cuda_graph_replay_matches_eager_including_padded_batches(demo_model, demo_windows):
    engine = build_path(demo_model, CUDA, "fp16-autocast")
    eager = engine(demo_windows[:3]).cpu()
    engine.use_cuda_graphs([1, 4])
    replayed = engine(demo_windows[:3]).cpu()  # batch 3 is padded to the 4-graph
    assert replayed.shape == eager.shape
    assert torch.equal(replayed.argmax(1), eager.argmax(1))
    assert float((replayed - eager).norm() / eager.norm()) < 1e-2
    single = engine(demo_windows[5:6]).cpu()
    assert torch.equal(single.argmax(1), _cpu_fp32(demo_model, demo_windows[5:6]).argmax(1))


def test_inference_thread_batches_through_pinned_memory_to_cuda(demo_model, demo_windows):
    engine = build_engine(demo_model, "cuda", "auto", check_clips=demo_windows[:2])
    ring = RingBuffer("cam", length=CLIP_LENGTH, stride=CLIP_LENGTH, lossless=True)
    results = []
    stop = threading.Event()
    thread = InferenceThread([ring], engine, results.extend, stop, max_batch=4, device=CUDA)
    assert thread._batches[0].is_pinned()
    thread.start()
    clip = demo_windows[2].numpy()  # (3, 16, 112, 112)
    for t in range(CLIP_LENGTH):
        assert ring.write_frame(
            np.ascontiguousarray(clip[:, t]), FrameMeta(t, 1e9 + t / 10, float(t)), timeout=5
        )
    ring.close()
    thread.join(timeout=30)
    stop.set()
    assert thread.error is None and len(results) == 1
    ref = _cpu_fp32(demo_model, demo_windows[2:3])[0]
    assert int(np.argmax(results[0].probs)) == int(ref.argmax())


def test_demo_run_on_cuda_finds_the_demo_events(tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    code = main(
        [
            "run",
            "--device",
            "cuda",
            "--events",
            str(events),
            "--output-video",
            str(tmp_path / "out.mp4"),
        ]
    )
    assert code == 0
    metrics = evaluate_files(events, DEMO / "demo_truth.json")
    assert metrics.f1 >= 0.8, str(metrics)


def test_build_engine_replays_cuda_graphs_when_asked(demo_model, demo_windows):
    engine = build_engine(
        demo_model, "cuda", "auto", check_clips=demo_windows[:4], cuda_graph_sizes=(1, 2, 4)
    )
    assert engine._graphed is not None
    out = engine(demo_windows[:3]).cpu()
    assert torch.equal(out.argmax(1), _cpu_fp32(demo_model, demo_windows[:3]).argmax(1))
