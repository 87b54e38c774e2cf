"""The GPU path on a real GPU: NVDEC's frames and the CUDA device path against the CPU's.
Skipped without CUDA (and the NVDEC tests without PyNvVideoCodec); benchmarks/gpu_session.sh
runs them on a lent GPU."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gpu_decode import write_video

from streamdet import demo
from streamdet.buffer import FrameMeta
from streamdet.config import load_config
from streamdet.device_buffer import DeviceRingBuffer
from streamdet.inference import InferenceThread, build_engine
from streamdet.models.weights import load_checkpoint
from streamdet.pipeline import Pipeline
from streamdet.preprocess import preprocess_frame
from streamdet.preprocess_torch import preprocess_tensor
from streamdet.sources.decoding import DevicePath, to_tensor_frame
from streamdet.sources.pyav import PyAVSource

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_nvdec = pytest.mark.skipif(
    importlib.util.find_spec("PyNvVideoCodec") is None, reason="needs PyNvVideoCodec"
)
CUDA = torch.device("cuda")


def test_preprocessing_on_the_gpu_matches_the_cpu_path() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    cpu = preprocess_frame(frame)
    gpu = preprocess_tensor(to_tensor_frame(frame, CUDA)).cpu().numpy()
    assert np.abs(cpu - gpu).max() <= 1e-4


def test_the_scheduler_gathers_device_rings_into_a_batch_on_the_device() -> None:
    ring = DeviceRingBuffer("cam", device=CUDA, length=16, stride=8, frame_shape=(3, 112, 112))
    for i in range(16):
        ring.write_frame(torch.full((3, 112, 112), float(i), device=CUDA), FrameMeta(i, i, i))
    results = []
    thread = InferenceThread(
        [ring],
        lambda clips: torch.zeros(len(clips), 2, device=clips.device) + clips.is_cuda,
        results.extend,
        threading.Event(),
        batch_device=CUDA,
    )
    assert thread._batches[0].device.type == CUDA.type
    taken, scored = thread._gather(thread._batches[0])
    assert len(scored) == 1 and thread._batches[0][0, 0, :, 0, 0].tolist() == list(range(16))


@needs_nvdec
@pytest.mark.timeout(120)
def test_nvdec_frames_match_pyavs_after_preprocessing(tmp_path: Path) -> None:
    """NVDEC and FFmpeg convert YUV to RGB with their own rounding: compared as model input."""
    from streamdet.sources.nvdec import NvdecSource

    video = write_video(tmp_path / "clip.mp4", frames=30, size=(640, 480))
    with NvdecSource(str(video), device=CUDA) as ours, PyAVSource(str(video)) as reference:
        for i in range(30):
            expected = reference.read()
            frame = ours.read()
            assert frame is not None and expected is not None, i
            assert frame.is_cuda and frame.shape == (480, 640, 3)
            diff = np.abs(preprocess_tensor(frame).cpu().numpy() - preprocess_frame(expected))
            assert diff.mean() <= 0.05, (i, diff.mean())
        assert ours.read() is None


@needs_nvdec
@pytest.mark.timeout(300)
def test_the_demo_decoded_by_nvdec_logs_the_events_of_the_cpu_path(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(demo.config_path().parent / "c3d_bn_demo.safetensors")
    engine = build_engine(checkpoint.model, "cuda", "fp32")
    logs = {}
    for name, path in (("host", None), ("nvdec", DevicePath(CUDA, nvdec=True))):
        events = tmp_path / f"{name}.jsonl"
        overrides = {
            "sinks": {"events": {"path": str(events)}, "overlay": {"video": None}},
            "model": {"device": "cuda", "precision": "fp32"},
            "truth": None,
        }
        cfg = load_config(demo.config_path(), overrides)
        Pipeline(cfg, checkpoint, engine, print_fn=lambda line: None, device_path=path).run()
        keep = ("type", "label", "start_frame", "end_frame")
        logs[name] = [
            {k: o.get(k) for k in keep}
            for o in map(json.loads, events.read_text().splitlines())
            if o["type"] in ("new", "end")
        ]
    assert len(logs["host"]) >= 20
    same = sum(a == b for a, b in zip(logs["host"], logs["nvdec"], strict=False))
    assert same >= 0.9 * len(logs["host"]), logs  # YUV rounding may move a boundary
