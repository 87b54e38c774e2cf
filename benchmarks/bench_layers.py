"""Layer by layer: where a packed path spends a clip, with the compiled pools and with ATen's.

Both variants are one build: the pools are swapped between rounds (``NonNegMaxPool3d.pool`` is
ATen's), so the convolutions and fc layers are the same objects. Each round times both variants
in random order; the table gives per-layer medians and the whole clip, and the last line the
median over rounds of the within-round ratio.

Usage:
    python benchmarks/bench_layers.py                     # bf16-packed, batch 1, 25 rounds
    python benchmarks/bench_layers.py --path fp32-packed --rounds 15
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
from _common import git_rev, load_model, machine  # noqa: E402

from streamdet.inference import build_path  # noqa: E402
from streamdet.inference.fastpath import PackedNet, plain_pool  # noqa: E402
from streamdet.models.c3d import INPUT_SHAPE, conv_names  # noqa: E402


def timed_forward(net: PackedNet, pools: list[torch.nn.Module], x: torch.Tensor) -> list[float]:
    """Seconds per layer: each conv, each pool after it (0 where there is none), then fc6-fc8."""
    times = []
    for conv, pool in zip(net.convs, pools, strict=True):
        t0 = time.perf_counter()
        x = conv(x)
        t1 = time.perf_counter()
        x = pool(x)
        times += [t1 - t0, time.perf_counter() - t1]
    t0 = time.perf_counter()
    net.head(x)
    times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--path", default="bf16-packed", choices=["bf16-packed", "fp32-packed"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--width", type=float, default=1.0)
    args = ap.parse_args(argv)
    host = machine()
    model, desc = load_model(None, 8, args.width)
    engine = build_path(model, torch.device("cpu"), args.path)
    net = engine.model
    assert isinstance(net, PackedNet)
    variants = {
        "compiled pools": list(net.pools),
        "ATen pools": [plain_pool(p) for p in net.pools],
    }
    x = engine.prepare(
        torch.randn(args.batch, *INPUT_SHAPE)
    )  # as the engine passes it: conv1 includes its fold
    rows: dict[str, list[list[float]]] = {name: [] for name in variants}
    with torch.inference_mode():
        for pools in variants.values():
            for _ in range(3):
                timed_forward(net, pools, x)
        for _ in range(args.rounds):
            for name in random.sample(list(variants), len(variants)):
                rows[name].append(timed_forward(net, variants[name], x))

    print(f"# bench_layers: {host}, git {git_rev()}")
    print(f"# model: {desc}; path {args.path}, batch {args.batch}, {args.rounds} rounds\n")
    names: list[
        str | None
    ] = []  # one per timed slot; None for the Identity after a conv with no pool
    for conv, pool in zip(conv_names(), net.pools, strict=True):
        names += [conv, None if isinstance(pool, torch.nn.Identity) else f"pool after {conv}"]
    names.append("fc6-fc8")
    print("| layer | " + " | ".join(f"{v} ms" for v in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for i, name in enumerate(names):
        if name is not None:
            medians = [statistics.median(r[i] for r in rows[v]) * 1e3 for v in variants]
            print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    totals = {v: [sum(r) for r in rows[v]] for v in variants}
    print(
        "| whole clip | "
        + " | ".join(f"{statistics.median(totals[v]) * 1e3:.1f}" for v in variants)
        + " |"
    )
    ratio = statistics.median(
        a / b for a, b in zip(totals["ATen pools"], totals["compiled pools"], strict=True)
    )
    print(f"\ncompiled pools: {ratio:.3f}x ATen's (median of within-round ratios)")
    print(
        f"\n# command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
