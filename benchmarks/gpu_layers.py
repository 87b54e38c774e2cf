"""CUDA: where the time of one C3D_BN batch goes, layer by layer, and which kernels run the convs.

    python benchmarks/gpu_layers.py --batch 128          # ~30 s on an H100/H200

Times each stage of the BN-folded net (bf16 weights, channels_last_3d) alone, the device
synchronised around each call (median of ``--rounds`` after warm-up), for conv1 as it is and with
its input zero-padded to more channels (``fastpath.ChannelPad``). Prints ms, TFLOP/s and the share of the dense bf16 peak for
convolutions, GB/s for ReLU and pools, and the kernel that took most of each conv's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_model  # noqa: E402
from gpu_bench import peak_for, synchronize  # noqa: E402
from gpu_variants import add_model_args, conv1_net, device_name, open_device  # noqa: E402

from streamdet.models.c3d import conv_names  # noqa: E402


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    """Median milliseconds of ``fn``, device synchronised around each call, after two warm-ups."""
    fn()
    fn()
    times = []
    for _ in range(rounds):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def top_kernel(fn: Callable[[], object], dev: torch.device) -> str:
    """The name (shortened) and share of the kernel that takes most of ``fn``'s device time."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == dev.type.upper()]
    total = sum(e.device_time_total for e in events) or 1.0
    best = max(events, key=lambda e: e.device_time_total, default=None)
    if best is None:
        return "?"
    return f"{best.key[:70]} ({best.device_time_total / total * 100:.0f}%)"


def conv_flop(conv: torch.nn.Module, out: torch.Tensor) -> float:
    real = conv[-1] if isinstance(conv, torch.nn.Sequential) else conv
    k = real.weight[0].numel()  # in_channels * kt * kh * kw (padded channels count as work done)
    return 2.0 * k * out.numel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    add_model_args(ap)
    args = ap.parse_args(argv)
    dev = open_device(args)
    if dev is None:
        return 1
    name = device_name(dev)
    peak = peak_for(name) or float("nan")
    model, desc = load_model(None, 8, args.width)
    x0 = torch.randn(args.batch, 3, 16, 112, 112, device=dev, dtype=torch.bfloat16)
    x0 = x0.contiguous(memory_format=torch.channels_last_3d)
    print(
        f"# {name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; model {desc}; "
        f"batch {args.batch}; bf16 peak {peak} TFLOP/s\n"
    )
    print("| conv1 | stage | ms | TFLOP/s or GB/s | % bf16 peak | top kernel |")
    print("|---|---|---|---|---|---|")
    names = conv_names()
    for form in args.conv1.split(","):
        net = conv1_net(model, dev, form).to(torch.bfloat16)
        total = 0.0
        x = x0
        with torch.inference_mode():
            for cname, conv, pool in zip(names, net.convs, net.pools, strict=True):
                y = conv(x)
                ms = median_ms(lambda c=conv, i=x: c(i), args.rounds)
                tflops = conv_flop(conv, y) / ms / 1e9
                print(
                    f"| {form} | {cname} | {ms:.2f} | {tflops:.0f} TFLOP/s | {tflops / peak * 100:.0f}% | "
                    f"{top_kernel(lambda c=conv, i=x: c(i), dev)} |",
                    flush=True,
                )
                r = F.relu(y)
                ms_r = median_ms(lambda i=y: F.relu(i), args.rounds)
                p = pool(r)
                ms_p = (
                    median_ms(lambda q=pool, i=r: q(i), args.rounds)
                    if not isinstance(pool, torch.nn.Identity)
                    else 0.0
                )
                gb_r = 2 * y.numel() * y.element_size() / ms_r / 1e6
                gb_p = (r.numel() + p.numel()) * r.element_size() / ms_p / 1e6 if ms_p else 0.0
                print(
                    f"| {form} | relu + pool after {cname} | {ms_r:.2f} + {ms_p:.2f} | "
                    f"{gb_r:.0f} + {gb_p:.0f} GB/s | | |",
                    flush=True,
                )
                total += ms + ms_r + ms_p
                x = p
            flat = torch.flatten(x, 1)
            ms_fc = median_ms(
                lambda n=net, f=flat: n.fc8(F.relu(n.fc7(F.relu(n.fc6(f))))), args.rounds
            )
            total += ms_fc
            whole = median_ms(lambda n=net: n(x0), args.rounds)
        print(f"| {form} | fc6-fc8 | {ms_fc:.2f} | | | |")
        print(
            f"| {form} | **sum of stages / whole net** | **{total:.1f} / {whole:.1f}** | | | |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
