"""CUDA: how far the full C3D_BN is from the card's bf16 peak, by layout, dtype and compile mode.

    python benchmarks/gpu_variants.py                      # ~2 minutes on an H100
    python benchmarks/gpu_variants.py --modes default,max-autotune-no-cudagraphs --batches 128,256

Times the same BN-folded net (channels_last_3d) on random input, interleaved (each round times
every variant once, in shuffled order), median of ``--rounds``: autocast vs bf16 weights, conv1
as it is or with its input zero-padded to more channels (``--conv1``), and torch.compile
(Inductor, with freezing as the engine compiles, one graph per batch size) in each of ``--modes``.
Prints ms per batch, clips/s, TFLOP/s and the share of the dense bf16 peak (see gpu_bench.py's
table). Correctness is gpu_bench.py's job; this script is for choosing a faster path.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_model  # noqa: E402
from gpu_bench import peak_for, synchronize, time_interleaved  # noqa: E402

from streamdet.inference.engine import _configure_cuda, _prepare  # noqa: E402
from streamdet.inference.fastpath import InferenceNet  # noqa: E402
from streamdet.models.c3d import count_flops  # noqa: E402


def variant(net: torch.nn.Module, dtype: torch.dtype, autocast: bool) -> Callable:
    """A channels_last_3d forward of ``net`` with fp32 weights under autocast, or with weights in
    ``dtype``."""
    fmt = torch.channels_last_3d
    m = net if autocast else copy.deepcopy(net).to(dtype)
    m = m.to(memory_format=fmt)  # type: ignore[call-overload]

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=fmt)
        if autocast:
            with torch.autocast(x.device.type, dtype=dtype):
                return m(x)
        return m(x.to(dtype))

    return forward


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options gpu_variants.py and gpu_layers.py share: conv1's forms, device, width."""
    ap.add_argument(
        "--conv1",
        default="3,8",
        help="conv1 input channels to try: 3 (as it is) or a padded count; comma-separated",
    )
    ap.add_argument(
        "--device", default="cuda", help="cpu: a smoke test of this script (with a small --width)"
    )
    ap.add_argument(
        "--width", type=float, default=1.0, help="channel width multiplier (1.0 = the seed C3D_BN)"
    )


def open_device(args: argparse.Namespace) -> torch.device | None:
    """``--device``, with the engine's CUDA flags set; None (and a message) when CUDA is missing."""
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: nothing to measure")
            return None
        _configure_cuda()
    return dev


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"


def conv1_net(model: torch.nn.Module, dev: torch.device, form: str) -> InferenceNet:
    """The BN-folded net with conv1's input as it is (``3``) or zero-padded to ``form`` channels."""
    channels = int(form)
    return InferenceNet(_prepare(model, dev), pad_conv1=0 if channels == 3 else channels).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--modes",
        default="default",
        help="torch.compile modes to time, comma-separated ('' for none)",
    )
    ap.add_argument("--fp16", action="store_true", help="also fp16 weights (the last conv1 form)")
    add_model_args(ap)
    args = ap.parse_args(argv)
    dev = open_device(args)
    if dev is None:
        return 1
    model, desc = load_model(None, 8, args.width)
    flop = count_flops(model)
    name = device_name(dev)
    peak = peak_for(name)
    forms = args.conv1.split(",")
    nets = {form: conv1_net(model, dev, form) for form in forms}
    bf16 = torch.bfloat16
    cl = torch.channels_last_3d
    variants: dict[str, Callable] = {}
    for form, net in nets.items():
        variants[f"bf16 autocast, conv1 {form}"] = variant(net, bf16, autocast=True)
        variants[f"bf16 weights, conv1 {form}"] = variant(net, bf16, autocast=False)
    if args.fp16:
        variants[f"fp16 weights, conv1 {forms[-1]}"] = variant(
            nets[forms[-1]], torch.float16, autocast=False
        )
    inductor_config.freezing = True  # as the engine's bf16-compiled path compiles
    for mode in filter(None, args.modes.split(",")):
        for form, net in nets.items():
            compiled = torch.compile(
                copy.deepcopy(net).to(bf16).to(memory_format=cl), mode=mode, dynamic=False
            )
            variants[f"torch.compile mode={mode}, conv1 {form}"] = lambda x, c=compiled: c(
                x.to(bf16).contiguous(memory_format=cl)
            )
    print(
        f"# {name}, torch {torch.__version__}; model {desc}, {flop / 1e9:.1f} GFLOP/clip; "
        f"bf16 peak {peak or '?'} TFLOP/s\n"
    )
    print("| variant | batch | ms/batch | clips/s | TFLOP/s | % bf16 peak | warm-up s |")
    print("|---|---|---|---|---|---|---|")
    for b in (int(s) for s in args.batches.split(",")):
        x = torch.randn(b, 3, 16, 112, 112, device=dev)
        warm: dict[str, float] = {}
        with torch.inference_mode():
            for n, f in variants.items():
                t0 = time.perf_counter()
                f(x)
                f(x)
                synchronize()
                warm[n] = time.perf_counter() - t0
            times = time_interleaved(variants, x, args.rounds)
        for n, ts in times.items():
            med = statistics.median(ts)
            tflops = flop * b / med / 1e12
            share = f"{tflops / peak * 100:.0f}%" if peak else "?"
            print(
                f"| {n} | {b} | {med * 1e3:.1f} | {b / med:.0f} | {tflops:.0f} | {share} | {warm[n]:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
