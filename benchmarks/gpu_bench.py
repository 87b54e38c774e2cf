"""CUDA benchmark of the engine: correctness against fp32 first, then clips/s at batch 1..128.

Run through ``benchmarks/gpu_bench.sh`` (one command, a few minutes). For each path (fp32,
bf16/fp16 autocast, optionally CUDA graphs) it prints top-1 agreement and relative error against
fp32 on real windows, then per batch size: ms per batch (median of interleaved rounds), clips/s,
achieved TFLOP/s and its share of the card's dense bf16 peak, and the streams that rate would
hold at 30 fps, stride 8 (one window per 8 sampled frames; the model's frame_step applies).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_VIDEO, load_model, real_windows  # noqa: E402

from streamdet.inference import build_engine, build_path  # noqa: E402
from streamdet.models.c3d import count_flops  # noqa: E402
from streamdet.preprocess import DEFAULT_CONTRACT  # noqa: E402

DEMO_VIDEO = Path(__file__).resolve().parents[1] / "streamdet" / "demo" / "demo.mp4"

# Dense bf16 tensor-core peak in TFLOP/s, by a substring of the device name (no sparsity).
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "T4": 65.0,
    "V100": 125.0,
}


def peak_for(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def synchronize() -> None:
    """Wait for the GPU, whenever CUDA is present: the timed calls may take a pinned host batch
    and still run on the device; a no-op on machines without CUDA (the scripts' CPU smoke runs)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each function on ``x``: each round times every one once, in shuffled
    order, with the device synchronised around each call (warm them up first)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        order = list(fns)
        random.shuffle(order)
        for name in order:
            synchronize()
            t0 = time.perf_counter()
            fns[name](x)
            synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--video", default=str(DEFAULT_VIDEO))
    ap.add_argument("--weights")
    ap.add_argument("--graphs", action="store_true", help="also time bf16 with CUDA graphs")
    ap.add_argument("--compile", action="store_true", help="also time bf16 with torch.compile")
    ap.add_argument(
        "--budget-s", type=float, default=200.0, help="stop adding batch sizes after this long"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    started = time.monotonic()
    name = torch.cuda.get_device_name(0)
    peak = peak_for(name)
    model, desc = load_model(args.weights, None, None)
    flop = count_flops(model)
    dev = torch.device("cuda")
    video = Path(args.video)
    if not video.is_file():  # the test assets are not installed here: use the shipped demo video
        print(f"# {video} missing: using {DEMO_VIDEO}")
        video = DEMO_VIDEO
    clips = real_windows(video, 16, stride=8, skip=100)
    print(
        f"# {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
        f"model {desc}, {flop / 1e9:.1f} GFLOP/clip; bf16 peak {peak or '?'} TFLOP/s"
    )

    # Correctness first: build_engine checks against fp32 and would fall back; report it here too.
    engine = build_engine(model, dev, "auto", check_clips=clips[:8])
    print(f"# build_engine(auto) chose {engine.path}")
    paths = {
        "fp32": build_path(model, dev, "fp32-eager"),
        "bf16": build_path(model, dev, "bf16-autocast"),
        "fp16": build_path(model, dev, "fp16-autocast"),
    }
    if args.graphs:
        g = build_path(model, dev, "bf16-autocast")
        g.use_cuda_graphs([int(b) for b in args.batches.split(",")])
        paths["bf16+graphs"] = g
    if args.compile:
        paths["bf16-compiled"] = build_path(model, dev, "bf16-compiled")
    ref = torch.cat([paths["fp32"](clips[i : i + 4]).cpu() for i in range(0, 16, 4)])
    print("\n| path | top-1 agreement | relative error |\n|---|---|---|")
    for pname, eng in paths.items():
        out = torch.cat([eng(clips[i : i + 4]).cpu() for i in range(0, 16, 4)])
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        print(f"| {pname} | {agree * 100:.0f}% | {float((out - ref).norm() / ref.norm()):.2e} |")

    windows_per_stream_s = 30.0 / DEFAULT_CONTRACT.step_for(30.0) / 8
    print(f"\n(one stream at 30 fps, stride 8 = {windows_per_stream_s:.2f} windows/s)\n")
    print("| path | batch | ms/batch | clips/s | TFLOP/s | % bf16 peak | streams |")
    print("|---|---|---|---|---|---|---|")
    for b in (int(s) for s in args.batches.split(",")):
        if time.monotonic() - started > args.budget_s:
            print(f"# time budget reached; stopping before batch {b}")
            break
        x = clips.repeat((b + 15) // 16, 1, 1, 1, 1)[:b].pin_memory()
        try:
            for eng in paths.values():
                eng(x)  # warm-up: cuDNN autotuning, graph capture
            times = time_interleaved(paths, x, args.rounds)
        except torch.cuda.OutOfMemoryError:
            print(f"# out of memory at batch {b}")
            break
        for pname in paths:
            med = statistics.median(times[pname])
            tflops = flop * b / med / 1e12
            share = f"{tflops / peak * 100:.0f}%" if peak else "?"
            print(
                f"| {pname} | {b} | {med * 1e3:.1f} | {b / med:.0f} | {tflops:.1f} | {share} | "
                f"{int(b / med / windows_per_stream_s)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
