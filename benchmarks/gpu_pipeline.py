"""The whole pipeline on N synthetic 1080p H.264 streams paced at 30 fps, decoded on the GPU:
the N it holds, and where the time goes (decode, preprocess, model).

    python benchmarks/gpu_pipeline.py                 # on a CUDA machine with PyNvVideoCodec
    python benchmarks/gpu_pipeline.py --smoke         # anywhere: small frames, the device path
                                                      # on torch's cpu device, in seconds

One synthetic stream (PyAV's libx264, a moving pattern over noise, a keyframe a second) is
written once; every source is a paced file source reading it (``realtime: true``: frames at
30 fps as from a camera, windows skipped when inference lags), so N sources cost N decodes.

A trial runs N sources for ``--seconds`` and holds when the windows' latency p99 (newest frame
to event line) stays under one stride period plus 1.5 x the inference p99, under 1% of the
windows were skipped, and NVDEC took every source (one it cannot, for want of a decoder session
or memory, is decoded by PyAV on the CPU, with a warning, and counted). N doubles from
``--start`` until a trial fails, then is bisected.

Before the search each stage is timed alone: decode (frames/s of one source read flat out, and
of ``--decode-threads`` sources read side by side), preprocess (one frame into a ring slot, the
device synchronised), model (the engine at the batch the search's streams make): the streams
each stage alone would hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from streamdet.config import load_config
from streamdet.inference import build_engine, graph_batch_sizes
from streamdet.models.weights import Checkpoint, load_or_random
from streamdet.pipeline import Pipeline
from streamdet.preprocess import DEFAULT_CONTRACT
from streamdet.preprocess_torch import preprocess_tensor
from streamdet.sources.decoding import DeviceOpener, DevicePath, TensorFrames, resolve_decode
from streamdet.sources.pyav import PyAVSource

FPS = 30


@dataclass
class Trial:
    streams: int
    holds: bool
    windows: int
    skipped: int
    latency_ms_p50: float
    latency_ms_p99: float
    inference_ms_p99: float
    bound_ms: float
    frames_in_per_s: float
    cpu_decoded: int  # sources NVDEC could not take (no decoder to be had): decoded by PyAV


def write_stream(path: Path, width: int, height: int, seconds: float) -> Path:
    """A synthetic H.264 stream at 30 fps: a bright bar sweeping over a fixed noise scene."""
    rng = np.random.default_rng(0)
    background = rng.integers(0, 200, (height // 8, width // 8, 3), dtype=np.uint8)
    background = background.repeat(8, axis=0).repeat(8, axis=1)  # blocky: compresses well
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(FPS), "bf": "0"}
        bar = max(8, width // 20)
        for i in range(int(seconds * FPS)):
            image = background.copy()
            x = (i * 16) % (width - bar)
            image[:, x : x + bar] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def open_source(video: Path, path: DevicePath | None) -> Any:
    if path is None:
        return PyAVSource(str(video), decode_threads=1)
    if path.nvdec:
        from streamdet.sources.nvdec import NvdecSource

        return NvdecSource(str(video), device=path.device)
    return TensorFrames(PyAVSource(str(video), decode_threads=1), path.device)


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(video: Path, path: DevicePath | None, threads: int, frames: int) -> float:
    """Frames/s of ``threads`` sources of ``video`` read flat out side by side (each its own
    decoder), ``frames`` frames each."""
    device = path.device if path else None

    def read(count: list[int]) -> None:
        source = open_source(video, path)
        try:
            for _ in range(frames):
                if source.read() is None:
                    break
                count[0] += 1
        finally:
            source.release()

    counts = [[0] for _ in range(threads)]
    workers = [threading.Thread(target=read, args=(c,)) for c in counts]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    synchronize(device)
    return sum(c[0] for c in counts) / (time.perf_counter() - t0)


def time_preprocess(video: Path, path: DevicePath | None, rounds: int) -> float:
    """Microseconds to preprocess one frame of ``video`` into a ring slot, device synchronised."""
    source = open_source(video, path)
    frame = source.read()
    source.release()
    if path is None:
        from streamdet.preprocess import preprocess_frame

        out_np = np.empty((3, 112, 112), np.float32)
        run = lambda: preprocess_frame(frame, DEFAULT_CONTRACT, out_np)  # noqa: E731
    else:
        out = torch.empty((3, 112, 112), device=path.device)
        run = lambda: preprocess_tensor(frame, DEFAULT_CONTRACT, out)  # noqa: E731
    device = path.device if path else None
    for _ in range(10):
        run()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        run()
    synchronize(device)
    return (time.perf_counter() - t0) / rounds * 1e6


def time_model(engine: Any, device: torch.device, batch: int, rounds: int) -> float:
    """Milliseconds per forward pass of ``batch`` windows already on ``device``."""
    x = torch.randn((batch, 3, 16, 112, 112), device=device)
    engine(x)
    synchronize(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        engine(x)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_trial(
    streams: int,
    video: Path,
    checkpoint: Checkpoint,
    engine: Any,
    path: DevicePath | None,
    args: argparse.Namespace,
) -> Trial:
    sources = [{"name": f"s{i}", "url": str(video), "realtime": True} for i in range(streams)]
    cfg = load_config(
        None,
        {
            "sources": sources,
            "model": {"device": str(engine.device), "max_batch": args.max_batch},
            "window": {"length": 16, "stride": args.stride},
            "events": {"background": None},
            "sinks": {"events": {"path": None}},
            "progress_interval_s": 3600,
        },
    )
    pipeline = Pipeline(
        cfg,
        checkpoint,
        engine,
        max_seconds=args.seconds,
        print_fn=lambda line: None,
        device_path=path,
    )
    summary = pipeline.run()
    cpu_decoded = sum(
        1
        for c in pipeline.captures
        if isinstance(c._opener, DeviceOpener) and c._opener.path.nvdec and not c._opener.nvdec
    )
    windows = summary.windows
    skipped = sum(s.windows_skipped for s in summary.sources)
    step = checkpoint.contract.step_for(FPS)
    stride_ms = args.stride * step / FPS * 1000.0
    bound = stride_ms + 1.5 * summary.inference_ms_p99
    holds = (
        windows > 0
        and summary.latency_ms_p99 <= bound
        and skipped <= 0.01 * (windows + skipped)
        and cpu_decoded == 0
    )
    frames = sum(s.frames_read for s in summary.sources)
    return Trial(
        streams,
        holds,
        windows,
        skipped,
        summary.latency_ms_p50,
        summary.latency_ms_p99,
        summary.inference_ms_p99,
        bound,
        frames / max(summary.seconds, 1e-9),
        cpu_decoded,
    )


def search(try_n: Any, start: int, limit: int, budget_s: float) -> list[Trial]:
    """Double N from ``start`` until a trial fails (or ``limit``), then bisect, within budget."""
    started = time.monotonic()
    trials: list[Trial] = []
    good, bad = 0, None
    n = start
    while n <= limit and time.monotonic() - started < budget_s:
        trial = try_n(n)
        trials.append(trial)
        if not trial.holds:
            bad = n
            break
        good, n = n, n * 2
    while bad is not None and bad - good > max(1, good // 8):
        if time.monotonic() - started >= budget_s:
            break
        n = (good + bad) // 2
        trial = try_n(n)
        trials.append(trial)
        good, bad = (n, bad) if trial.holds else (good, n)
    return trials


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="small and quick, on any machine")
    ap.add_argument("--decode", choices=("gpu", "torch-cpu", "cpu"), default="gpu")
    ap.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the streams")
    ap.add_argument("--seconds", type=float, default=12.0, help="length of one trial")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--start", type=int, default=32, help="first N of the search")
    ap.add_argument("--limit", type=int, default=1024, help="largest N tried")
    ap.add_argument("--streams", help="comma-separated N to try instead of searching")
    ap.add_argument("--budget-s", type=float, default=200.0, help="time for the search")
    ap.add_argument("--decode-threads", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine")
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs for batches 1, 2, 4...")
    ap.add_argument("--width", type=float, default=None, help="model width (default 1.0)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.smoke:
        args.decode, args.size, args.seconds = "torch-cpu", "320x240", 3.0
        args.streams, args.max_batch, args.width = "1,2", 4, 0.0625
        args.decode_threads = 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    width, height = (int(v) for v in args.size.split("x"))
    path: DevicePath | None
    if args.decode == "gpu":
        path = resolve_decode("gpu")
        if path is None:
            print("decode gpu cannot run here (see the warning): nothing to measure")
            return 1
    elif args.decode == "torch-cpu":
        path = DevicePath(torch.device("cpu"), nvdec=False)
    else:
        path = None
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"streamdet-gpu-pipeline-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    video = write_stream(folder / f"synthetic-{height}p.mp4", width, height, args.seconds + 4)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(
        f"# {name}; streams {width}x{height} H.264 at {FPS} fps (written in "
        f"{time.perf_counter() - t0:.1f} s); decode {args.decode}; stride {args.stride}"
    )

    checkpoint = load_or_random(None, width=args.width)  # seeded random weights: timing only
    model = checkpoint.model
    desc = f"random init, width {model.width}, {checkpoint.num_classes} classes"
    engine = build_engine(
        model,
        device,
        "auto",
        compile=args.compile,
        cuda_graph_sizes=graph_batch_sizes(args.max_batch) if args.graphs else (),
    )
    print(f"# model {desc}; engine {engine.path} on {engine.device}")

    step = checkpoint.contract.step_for(FPS)
    windows_per_stream = FPS / step / args.stride
    frames_decode = int(FPS * min(args.seconds, 4))
    batch = min(args.max_batch, 128)
    stages: dict[str, tuple[str, Callable[[], float], Callable[[float], float]]] = {
        "decode, 1 source": (
            "{:.0f} frames/s",
            lambda: time_decode(video, path, 1, frames_decode),
            lambda rate: rate / FPS,
        ),
        f"decode, {args.decode_threads} sources": (
            "{:.0f} frames/s",
            lambda: time_decode(video, path, args.decode_threads, frames_decode),
            lambda rate: rate / FPS,
        ),
        "preprocess": (
            "{:.0f} us/frame",
            lambda: time_preprocess(video, path, 50 if args.smoke else 500),
            lambda us: 1e6 / us / (FPS / step),
        ),
        f"model, batch {batch}": (
            "{:.1f} ms/batch",
            lambda: time_model(engine, device, batch, 3 if args.smoke else 10),
            lambda ms: batch / (ms / 1e3) / windows_per_stream,
        ),
    }
    measured: dict[str, str] = {}
    print("\n| stage | measured | streams it alone holds |\n|---|---|---|")
    for stage, (unit, measure, streams) in stages.items():
        try:  # a stage that fails is reported, and the search still runs
            value = measure()
            measured[stage] = unit.format(value)
            print(f"| {stage} | {measured[stage]} | {streams(value):.0f} |", flush=True)
        except Exception as exc:
            measured[stage] = f"failed: {type(exc).__name__}: {exc}"
            print(f"| {stage} | {measured[stage]} | - |", flush=True)

    def try_n(n: int) -> Trial:
        trial = run_trial(n, video, checkpoint, engine, path, args)
        print(
            f"| {n} | {'yes' if trial.holds else 'no'} | {trial.windows} | {trial.skipped} | "
            f"{trial.latency_ms_p50:.0f} | {trial.latency_ms_p99:.0f} | {trial.bound_ms:.0f} | "
            f"{trial.inference_ms_p99:.1f} | {trial.frames_in_per_s:.0f} | {trial.cpu_decoded} |",
            flush=True,
        )
        return trial

    print(
        "\n| streams | holds | windows | skipped | latency p50 ms | p99 ms | bound ms "
        "| inference p99 ms | frames/s decoded | decoded on the CPU |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    if args.streams:
        trials = [try_n(int(n)) for n in args.streams.split(",")]
    else:
        trials = search(try_n, args.start, args.limit, args.budget_s)
    held = [t.streams for t in trials if t.holds]
    print(f"\nheld: {max(held) if held else 0} streams ({name})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": name,
                    "stages": measured,
                    "trials": [asdict(t) for t in trials],
                },
                indent=1,
            )
        )
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
