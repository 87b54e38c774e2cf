"""Time every inference path of C3D_BN, interleaved, on windows of a real video.

Each round times every (path, batch) once, paths in a fresh random order per batch size, so a
shared host's load swings hit all paths alike; the tables give the median over rounds, the spread
(min..max), clips/s, the ratio to eager fp32 and to OpenVINO (bf16/int8, same weights) when
``openvino`` is installed. Correctness: top-1 agreement and relative logit error against the
unfused fp32 model on real windows (other windows than the int8 calibration ones). Start-up cost
(build, and the first call, which compiles for ``*-compiled``) is reported per path.

Usage:
    python benchmarks/bench_model.py                 # full C3D_BN, batch 1,4,16, 5 rounds
    python benchmarks/bench_model.py --quick         # smoke run, under a minute
    python benchmarks/bench_model.py --paths fp32-unfused,bf16-packed,int8 --batches 1 --rounds 9
    python benchmarks/bench_model.py --paths fp32-unfused,bf16-packed,bf16-packed+aten-pools --batches 1
    python benchmarks/bench_model.py --paths fp32-unfused,bf16-packed,int8,openvino-bf16,openvino-int8 --batches 1 --workers 2
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_VIDEO,
    clips_per_s,
    git_rev,
    load_model,
    machine,
    median_spread,
    real_windows,
)

from streamdet.inference import Engine, build_path  # noqa: E402
from streamdet.inference.fastpath import InferenceNet, plain_pool  # noqa: E402
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE, count_flops, fuse_bn  # noqa: E402

log = logging.getLogger("bench_model")

BASELINE = "fp32-unfused"
DEFAULT_PATHS = (
    BASELINE,
    "fp32-eager",
    "fp32-packed",
    "bf16-eager",
    "bf16-packed",
    "bf16-compiled",
    "int8",
    "openvino-bf16",
    "openvino-int8",
)
QUICK_PATHS = (BASELINE, "bf16-packed", "int8", "openvino-bf16")
# "bf16-packed+aten-pools": a packed path with ATen's max_pool3d instead of the compiled pools.
ATEN_POOLS = "+aten-pools"

Runner = Callable[[torch.Tensor], torch.Tensor]


class OpenVinoRunner:
    """OpenVINO on the same (BN-folded) weights, compiled once per batch size, one infer request
    per calling thread. ``streams`` > 1 compiles for throughput with that many CPU streams
    (OpenVINO's counterpart of streamdet's inference workers); else for latency."""

    def __init__(
        self, model: C3D_BN, precision: str, calibration: torch.Tensor, streams: int = 1
    ) -> None:
        import openvino as ov

        self.core = ov.Core()
        net = InferenceNet(fuse_bn(model)).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = ov.convert_model(net, example_input=calibration[:1])
        if precision == "int8":
            import nncf  # OpenVINO's post-training quantizer

            data = nncf.Dataset(
                [calibration[i : i + 1].numpy() for i in range(calibration.shape[0])]
            )
            self.model = nncf.quantize(self.model, data, subset_size=calibration.shape[0])
        self.precision = precision
        self.streams = streams
        self._compiled: dict[int, object] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # this thread's infer requests, by batch size

    def _compile(self, b: int) -> object:
        with self._lock:
            if b not in self._compiled:
                m = self.model.clone()
                m.reshape([b, *INPUT_SHAPE])
                config = {
                    "INFERENCE_PRECISION_HINT": "bf16"
                    if precision_is_low(self.precision)
                    else "f32"
                }
                if self.streams > 1:
                    config.update(
                        {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(self.streams)}
                    )
                else:
                    config["PERFORMANCE_HINT"] = "LATENCY"
                self._compiled[b] = self.core.compile_model(m, "CPU", config)
            return self._compiled[b]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        requests = self._local.__dict__.setdefault("requests", {})
        if b not in requests:
            requests[b] = self._compile(b).create_infer_request()  # type: ignore[attr-defined]
        out = requests[b].infer({0: x.numpy()})
        return torch.from_numpy(np.asarray(out[0]).copy())


def paired_ratio(reference: list[float], times: list[float]) -> float:
    """Median over rounds of reference / times, both timed in each round: how many times faster
    than ``reference``. On a host whose speed swings 2x between rounds this is steadier than a
    ratio of medians, which can pair one path's slow rounds with another's fast ones."""
    return statistics.median(r / t for r, t in zip(reference, times, strict=True))


def precision_is_low(precision: str) -> bool:
    return precision in ("bf16", "int8")


def build_runner(
    name: str, model: C3D_BN, calibration: torch.Tensor, cache_dir: Path | None
) -> Runner:
    if name == BASELINE:
        # The model exactly as trained: BN unfused, contiguous, fp32, eager.
        return Engine(
            model,
            torch.device("cpu"),
            "fp32",
            model.num_classes,
            input_dtype=torch.float32,
            path=BASELINE,
        )
    if name.startswith("openvino-"):
        return OpenVinoRunner(model, name.split("-", 1)[1], calibration)
    if name.endswith(ATEN_POOLS):
        # the packed path as it was before its pools were compiled: the ATen pools side by side
        engine = build_path(model, torch.device("cpu"), name.removesuffix(ATEN_POOLS))
        engine.model.pools = torch.nn.ModuleList(plain_pool(p) for p in engine.model.pools)
        return engine
    return build_path(
        model, torch.device("cpu"), name, calibration_clips=calibration, cache_dir=cache_dir
    )


def bench_workers(
    runners: dict[str, Runner],
    model: C3D_BN,
    calib: torch.Tensor,
    clips: torch.Tensor,
    args: argparse.Namespace,
) -> str:
    """Clips/s at batch 1, one caller on every torch thread against ``args.workers`` callers on
    an equal share each, every (path, mode) once per round in shuffled order. OpenVINO paths get
    a second runner compiled with as many throughput streams. The eager fp32 baseline is left
    out (seconds per clip)."""
    threads = torch.get_num_threads()
    per_worker = max(1, threads // args.workers)
    n = 12 * args.workers
    modes: dict[tuple[str, str], Callable[[], float]] = {}
    for name, run in runners.items():
        if name == BASELINE:
            continue
        modes[(name, "one")] = lambda run=run: clips_per_s(run, clips, n)
        if name.startswith("openvino-"):
            streamed = OpenVinoRunner(model, name.split("-", 1)[1], calib, streams=args.workers)
            streamed(clips[:1])  # compile outside the timing
            modes[(name, "workers")] = lambda run=streamed: clips_per_s(
                run, clips, n, 1, args.workers
            )
        else:
            modes[(name, "workers")] = lambda run=run: clips_per_s(
                run, clips, n, 1, args.workers, per_worker
            )
    for measure in modes.values():  # warm every thread's requests and OpenMP teams
        measure()
    rate: dict[tuple[str, str], list[float]] = {key: [] for key in modes}
    rng = random.Random(args.seed + 1)
    for _ in range(args.rounds):
        for key in rng.sample(list(modes), len(modes)):
            rate[key].append(modes[key]())
    ov = {k: v for k, v in (("bf16", "openvino-bf16"), ("int8", "openvino-int8")) if v in runners}
    lines = [
        f"\n## Throughput at batch 1: one caller on {threads} torch threads against {args.workers} callers on "
        f"{per_worker} each ({args.rounds} rounds of {n} clips per mode; medians, ratios within rounds)\n",
        f"OpenVINO: latency mode against {args.workers} throughput streams.\n",
        f"| path | 1 x {threads} clips/s | {args.workers} x {per_worker} clips/s | workers / one | "
        f"x OpenVINO, {args.workers} streams |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(key[0] for key in modes):
        one, many = rate[(name, "one")], rate[(name, "workers")]
        peer = ov.get(name.split("-")[0])
        versus = (
            f"{statistics.median(a / b for a, b in zip(many, rate[(peer, 'workers')], strict=True)):.2f}"
            if peer and not name.startswith("openvino-")
            else "-"
        )
        lines.append(
            f"| {name} | {statistics.median(one):.2f} | {statistics.median(many):.2f} | "
            f"{statistics.median(b / a for a, b in zip(one, many, strict=True)):.2f} | {versus} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--paths", help=f"comma-separated, default {','.join(DEFAULT_PATHS)}")
    ap.add_argument(
        "--batches", default="1,4,16", help="comma-separated batch sizes (default 1,4,16)"
    )
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 4 paths, batch 1, 3 rounds, width 0.5"
    )
    ap.add_argument("--video", default=str(DEFAULT_VIDEO), help="real video the windows come from")
    ap.add_argument("--weights", help="checkpoint to benchmark (default: seeded random C3D_BN)")
    ap.add_argument("--width", type=float, default=1.0, help="C3D_BN width without --weights")
    ap.add_argument(
        "--num-classes", type=int, default=None, help="classes without --weights (default 8)"
    )
    ap.add_argument("--calib-windows", type=int, default=8, help="int8 calibration windows")
    ap.add_argument("--check-windows", type=int, default=16, help="windows for top-1/error checks")
    ap.add_argument(
        "--cache-dir",
        help="compile/int8 cache (default $STREAMDET_CACHE_DIR or ~/.cache/streamdet)",
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also time throughput at batch 1: one caller on every torch thread against this many "
        "callers side by side on an equal share each, as streamdet's inference workers run "
        "(OpenVINO: latency mode against as many throughput streams); 0 skips it",
    )
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module="torch.ao")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.rounds = "1", 3
        args.calib_windows, args.check_windows = 4, 4
        if not args.weights and args.width == 1.0:
            args.width = 0.5
    paths = [
        p
        for p in (
            args.paths.split(",") if args.paths else (QUICK_PATHS if args.quick else DEFAULT_PATHS)
        )
    ]
    if BASELINE not in paths:
        paths.insert(0, BASELINE)
    batches = [int(b) for b in args.batches.split(",")]
    cache_dir = Path(args.cache_dir) if args.cache_dir else None

    model, model_desc = load_model(args.weights, args.num_classes, args.width)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gflop = count_flops(model) / 1e9
    host = machine()  # first: it loads the compiled kernels and times that
    calib = real_windows(args.video, args.calib_windows, stride=8, skip=0)
    check = real_windows(args.video, args.check_windows, stride=8, skip=400)
    big = max(batches)
    timing_clips = check.repeat((big + check.shape[0] - 1) // check.shape[0], 1, 1, 1, 1)[
        :big
    ].contiguous()

    print(f"# bench_model: {host}, git {git_rev()}")
    print(
        f"# model: {model_desc}; {params:.2f} M params, {gflop:.2f} GFLOP per clip; video {args.video}"
    )

    runners: dict[str, Runner] = {}
    startup: dict[str, dict[str, float]] = {}
    for name in paths:
        t0 = time.perf_counter()
        try:
            runners[name] = build_runner(name, model, calib, cache_dir)
        except Exception as exc:  # a missing optional backend skips its column, nothing else
            print(f"# skipped {name}: {type(exc).__name__}: {exc}")
            continue
        startup[name] = {"build_s": time.perf_counter() - t0}
    # First call per batch size (compiles for *-compiled and OpenVINO), then correctness.
    ref_logits = torch.cat(
        [runners[BASELINE](check[i : i + 4]) for i in range(0, check.shape[0], 4)]
    )
    accuracy: dict[str, tuple[float, float]] = {}
    for name, run in list(runners.items()):
        t0 = time.perf_counter()
        try:
            for b in batches:
                run(timing_clips[:b])
        except Exception as exc:
            print(f"# skipped {name}: first call failed: {type(exc).__name__}: {exc}")
            del runners[name]
            continue
        startup[name]["first_calls_s"] = time.perf_counter() - t0
        out = torch.cat([run(check[i : i + 4]) for i in range(0, check.shape[0], 4)]).float()
        agree = float((out.argmax(1) == ref_logits.argmax(1)).float().mean())
        rel = float((out - ref_logits).norm() / ref_logits.norm())
        accuracy[name] = (agree, rel)

    rng = random.Random(args.seed)
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runners for b in batches}
    for r in range(args.rounds):
        for b in batches:
            order = list(runners)
            rng.shuffle(order)
            x = timing_clips[:b]
            for name in order:
                t0 = time.perf_counter()
                runners[name](x)
                times[(name, b)].append(time.perf_counter() - t0)
        log.info("round %d/%d done", r + 1, args.rounds)

    ov = {k: v for k, v in (("bf16", "openvino-bf16"), ("int8", "openvino-int8")) if v in runners}
    print(
        f"\n## Batch latency, interleaved ({args.rounds} rounds; median ms per batch, spread min..max; "
        "each ratio is the median over rounds of the two paths' ratio within the round)\n"
    )
    header = "| path | batch | ms (median) | spread | ms/clip | clips/s | x eager fp32 |"
    sep = "|---|---|---|---|---|---|---|"
    for prec in ov:
        header += f" x OpenVINO {prec} |"
        sep += "---|"
    print(header)
    print(sep)
    results = []
    for b in batches:
        for name in runners:
            med, lo, hi = median_spread(times[(name, b)])
            speedup = paired_ratio(times[(BASELINE, b)], times[(name, b)])
            row = (
                f"| {name} | {b} | {med * 1e3:.1f} | {lo * 1e3:.1f}..{hi * 1e3:.1f} | {med * 1e3 / b:.1f} | "
                f"{b / med:.2f} | {speedup:.2f} |"
            )
            for ov_name in ov.values():
                row += f" {paired_ratio(times[(ov_name, b)], times[(name, b)]):.2f} |"
            print(row)
            results.append(
                {
                    "path": name,
                    "batch": b,
                    "median_s": med,
                    "min_s": lo,
                    "max_s": hi,
                    "speedup_vs_fp32": speedup,
                }
            )
    if args.workers > 1:
        print(bench_workers(runners, model, calib, timing_clips, args))
    print(f"\n## Correctness on {check.shape[0]} real windows vs unfused fp32, and start-up\n")
    print(
        "| path | top-1 agreement | relative logit error | build s | first calls s (batches "
        + args.batches
        + ") |"
    )
    print("|---|---|---|---|---|")
    for name in runners:
        agree, rel = accuracy[name]
        s = startup[name]
        print(
            f"| {name} | {agree * 100:.1f}% | {rel:.2e} | {s['build_s']:.1f} | {s.get('first_calls_s', float('nan')):.1f} |"
        )
    print(
        f"\n# command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": host,
                    "model": model_desc,
                    "results": results,
                    "accuracy": accuracy,
                    "startup": startup,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
