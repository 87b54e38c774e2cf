"""The engine as `streamdet run` builds it, timed at the varying batch sizes a live run gives it.

    python benchmarks/gpu_engine_batches.py                 # CUDA: compiled and default engines
    python benchmarks/gpu_engine_batches.py --smoke         # anywhere: a tiny model, in seconds

The inference scheduler hands the engine whatever number of windows is ready, 1 to max_batch:
a compiled engine (``model.compile: true``) runs those through one graph dynamic in the batch
(``warm_other_batch_size``), a path no table had timed. Each engine is built as ``streamdet
run`` builds it (its fp32 check included), every size is run once to warm up, then each round
calls every batch size once, in shuffled order, so consecutive calls differ in size as in a
run; per size it prints the median ms per batch, clips/s, TFLOP/s and the share of the card's
dense bf16 peak. The default engine comes first: a cold compile takes minutes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_model  # noqa: E402
from gpu_bench import peak_for, synchronize  # noqa: E402

from streamdet.inference import build_engine  # noqa: E402
from streamdet.models.c3d import INPUT_SHAPE, count_flops  # noqa: E402

BATCHES = "1,2,3,4,6,8,12,16,24,32,48,64,96,128"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default=BATCHES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--paths", default="default,compiled", help="default and/or compiled")
    ap.add_argument("--width", type=float, default=None, help="model width (default 1.0)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, batches 1-3, on any device")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batches, args.rounds, args.width, args.paths = "1,2,3", 2, 0.0625, "default"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = peak_for(name) if device.type == "cuda" else None
    model, desc = load_model(None, None, args.width)
    flop = count_flops(model)
    print(f"# {name}, torch {torch.__version__}; model {desc}, {flop / 1e9:.1f} GFLOP/clip")
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn((b, *INPUT_SHAPE), generator=gen).to(device) for b in batches}
    print(
        "\n| path | batch | ms/batch | clips/s | TFLOP/s | % bf16 peak |\n|---|---|---|---|---|---|"
    )
    for path in args.paths.split(","):  # the default first: a compile may run out of time
        t0 = time.perf_counter()
        engine = build_engine(model, device, "auto", compile=path == "compiled")
        for b in batches:  # warm-up: each size once (a compiled engine may compile again)
            engine(inputs[b])
        synchronize()
        label = f"{path} ({engine.path}, ready in {time.perf_counter() - t0:.0f} s)"
        times: dict[int, list[float]] = {b: [] for b in batches}
        for _ in range(args.rounds):
            order = list(batches)
            random.shuffle(order)  # consecutive calls differ in size, as in a live run
            for b in order:
                synchronize()
                t0 = time.perf_counter()
                engine(inputs[b])
                synchronize()
                times[b].append(time.perf_counter() - t0)
        for b in batches:
            med = statistics.median(times[b])
            tflops = flop * b / med / 1e12
            share = f"{tflops / peak * 100:.0f}%" if peak else "?"
            print(
                f"| {label} | {b} | {med * 1e3:.1f} | {b / med:.0f} | {tflops:.1f} | {share} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
