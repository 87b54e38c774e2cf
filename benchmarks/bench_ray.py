"""``--backend ray`` against the single-machine run: windows/s, event latency, per-node overhead.

The same sources (``--sources`` copies of the bundled demo video, paced at its 10 fps like
cameras, window stride 4: 2.5 windows/s each) and the demo model run, in pairs measured one
right after the other:

- single: one in-process :class:`~streamdet.pipeline.Pipeline` (one inference worker, torch
  threads ``--threads``), as ``streamdet run`` runs it;
- ray N: the backend's :class:`~streamdet.distributed.backend.Coordinator` in this process
  (the driver) on a ``ray.cluster_utils.Cluster`` of N simulated one-CPU nodes, one engine actor
  each running the same pipeline (same threads) for its share of the sources.

The cluster starts with one node and grows to each size of ``--nodes`` in turn; every size gets
``--rounds`` pairs. Each run is measured for ``--seconds`` once every source is online plus a
``--warmup``. Simulated nodes are processes on this machine: they share its cores with each
other, with the driver and with the single run's turn, so more nodes cannot mean more cores.

Per run: windows/s scored; event latency (a window's newest frame captured -> its event line
written to the one log, ``time.time() - window_time``: on ray this includes the driver's poll
and the trip from the node) p50/p99 over the new, update and score-drop end lines; the node's
own window latency p99 (what ``latency_ms`` in the lines says); CPU seconds per window of every
process of the run (single: this process; ray: this driver + the engine actors + Ray's own
processes of the cluster, raylet, GCS, workers); engine actor RSS.

    python benchmarks/bench_ray.py                       # 6 sources, 1/2/3 nodes, 3 rounds
    python benchmarks/bench_ray.py --rounds 2 --seconds 15   # shorter
    python benchmarks/bench_ray.py --saturate            # one core: windows/s lost to the backend

``--saturate`` measures the backend's per-node overhead as the issue states it, a share of the
node's windows/s: the sources are files read as fast as the model takes them (``realtime:
false``: the node is saturated), and each round runs the single-machine pipeline and a one-node
cluster's engine in turn on one CPU (the order alternating between rounds); the overhead is
``1 - ray windows/s / single windows/s``. ``--layout one-core`` puts everything on that CPU (the
driver, GCS, raylet, the engine actor): the whole cluster's cost charged to its one node, an
upper bound. ``--layout worker-node`` (two CPUs) runs the head (GCS, the driver) on the other
CPU and a worker node (its raylet and the engine actor) on the node's CPU, as a node of a real
cluster is: the cost a node pays for each node added.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import git_rev, machine  # noqa: E402

from streamdet.config import RunConfig  # noqa: E402
from streamdet.events import EventChange  # noqa: E402
from streamdet.inference import build_engine  # noqa: E402
from streamdet.runner import load_model  # noqa: E402
from streamdet.sinks.jsonl import EventLog  # noqa: E402

DEMO = REPO / "streamdet" / "demo"
ONLINE_TIMEOUT_S = 180.0  # engines load the model and measure it, under load


class TimedLog(EventLog):
    """The JSONL log, noting when each line is written: the delay from the window's newest
    frame to its line, and when each source first came online."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock_t = threading.Lock()  # protects delays and online
        self.delays: list[tuple[float, float]] = []  # (written at, seconds since window_time)
        self.online: dict[str, float] = {}

    def write_event(self, change: EventChange, **kwargs: Any) -> dict[str, Any]:
        line = super().write_event(change, **kwargs)
        now = time.time()
        if change.type != "end" or change.end_reason == "score_drop":  # made by a window
            with self._lock_t:
                self.delays.append((time.monotonic(), now - change.window_time))
        return line

    def write_status(self, source: str, status: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        line = super().write_status(source, status, *args, **kwargs)
        if status == "online":
            with self._lock_t:
                self.online.setdefault(source, time.monotonic())
        return line

    def delays_since(self, t: float) -> list[float]:
        with self._lock_t:
            return [d for at, d in self.delays if at >= t]


@dataclass
class Result:
    """One run's figures."""

    name: str
    nodes: int
    windows_per_s: float
    windows_skipped: int
    event_ms: list[float]
    node_p99_ms: float
    cpu_s_per_window: float
    cpu_parts: dict[str, float] = field(default_factory=dict)  # share of one core, by process
    engine_rss_mib: list[float] = field(default_factory=list)


def make_config(folder: Path, n_sources: int, threads: int, video: Path | None = None) -> RunConfig:
    """The demo's model and tracker on ``n_sources`` copies of ``video``: paced like cameras
    (None: the demo video at its 10 fps) or, given a video, read as fast as the model takes it."""
    cfg = yaml.safe_load((DEMO / "demo.yaml").read_text())
    cfg["sources"] = [
        {"name": f"cam{i}", "url": str(video or DEMO / "demo.mp4"), "realtime": video is None}
        for i in range(n_sources)
    ]
    cfg["model"].update(
        weights=str(DEMO / cfg["model"]["weights"]), device="cpu", precision="fp32",
        threads=threads,
    )  # fmt: skip
    cfg["sinks"] = {"events": {"path": str(folder / "events.jsonl")}, "overlay": {"video": None}}
    cfg.pop("truth")
    cfg["progress_interval_s"] = 3600
    return RunConfig.model_validate(cfg)


def make_log(cfg: RunConfig, checkpoint: Any, path: Path) -> TimedLog:
    path.unlink(missing_ok=True)
    return TimedLog(
        path,
        {"name": checkpoint.name, "sha256": checkpoint.sha256},
        stride=cfg.window.stride,
        length=cfg.window.length,
        run_id="bench",
    )


def wait_online(timed: TimedLog, cfg: RunConfig, alive: Callable[[], bool]) -> float:
    """When the last source came online (monotonic)."""
    deadline = time.monotonic() + ONLINE_TIMEOUT_S
    names = {s.name for s in cfg.sources}
    while set(timed.online) < names:
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"sources never online: {sorted(names - set(timed.online))}")
        time.sleep(0.1)
    return max(timed.online.values())


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def measure_window(
    timed: TimedLog,
    cfg: RunConfig,
    args: argparse.Namespace,
    alive: Callable[[], bool],
    windows: Callable[[], int],
    procs: Callable[[], dict[str, list[psutil.Process]]],
) -> tuple[float, float, int, list[float], dict[str, float]]:
    """(seconds, windows/s, windows, event delays ms, CPU s by part) over the span measured."""
    start = wait_online(timed, cfg, alive)
    time.sleep(max(0.0, start + args.warmup - time.monotonic()))
    parts = procs()
    before = {k: cpu_seconds(v) for k, v in parts.items()}
    w0, t0 = windows(), time.monotonic()
    time.sleep(args.seconds)
    w1, t1 = windows(), time.monotonic()
    after = {k: cpu_seconds(v) for k, v in parts.items()}
    cpu = {k: sum(after[k].get(pid, b) - b for pid, b in before[k].items()) for k in parts}
    delays = [d * 1000 for d in timed.delays_since(t0)]
    return t1 - t0, (w1 - w0) / (t1 - t0), w1 - w0, delays, cpu


def run_single(cfg: RunConfig, args: argparse.Namespace, folder: Path) -> Result:
    from streamdet.pipeline import Pipeline

    checkpoint = load_model(cfg)
    torch.set_num_threads(args.threads)
    engine = build_engine(checkpoint.model, "cpu", "fp32")
    timed = make_log(cfg, checkpoint, folder / "single.jsonl")
    pipeline = Pipeline(cfg, checkpoint, engine, print_fn=lambda _: None, event_log=timed)
    thread = threading.Thread(target=pipeline.run, name="bench-single", daemon=True)
    thread.start()
    try:
        seconds, wps, n, delays, cpu = measure_window(
            timed, cfg, args, thread.is_alive,
            lambda: pipeline.inference.windows_done,
            lambda: {"process": [psutil.Process()]},
        )  # fmt: skip
        stats = pipeline.report.run_stats()
    finally:
        pipeline.stop("benchmark done")
        thread.join(30)
    return Result(
        "single", 0, wps,
        sum(s.windows_skipped for s in stats.sources.values()),
        delays,
        max(s.latency_ms_p99 for s in stats.sources.values()),
        cpu["process"] / max(n, 1),
        {k: v / seconds for k, v in cpu.items()},
    )  # fmt: skip


def ray_processes() -> dict[str, list[psutil.Process]]:
    """This process's descendants (the Cluster's): engine actors, and Ray's own others."""
    engines, others = [], []
    for p in psutil.Process().children(recursive=True):
        try:
            name = " ".join(p.cmdline()[:1])
        except psutil.Error:
            continue
        (engines if "NodeEngine" in name else others).append(p)
    return {"driver": [psutil.Process()], "engines": engines, "ray": others}


def run_ray(cfg: RunConfig, args: argparse.Namespace, folder: Path, nodes: int) -> Result:
    from streamdet.distributed.backend import Coordinator
    from streamdet.distributed.merge import ClusterLog

    checkpoint = load_model(cfg)
    timed = make_log(cfg, checkpoint, folder / f"ray{nodes}.jsonl")
    cluster_log = ClusterLog("bench", timed)
    coordinator = Coordinator(cfg, cluster_log, print_fn=logging.getLogger("coordinator").info)
    thread = threading.Thread(target=coordinator.run, name="bench-coordinator", daemon=True)
    thread.start()
    try:
        seconds, wps, n, delays, cpu = measure_window(
            timed, cfg, args, thread.is_alive, coordinator.windows, ray_processes
        )
        stats = coordinator.run_stats()
        rss = []
        for p in ray_processes()["engines"]:
            try:
                rss.append(p.memory_info().rss / 2**20)
            except psutil.Error:
                pass
    finally:
        coordinator.stop("benchmark done")
        thread.join(60)
        cluster_log.close("shutdown")
    return Result(
        f"ray {nodes}", nodes, wps,
        sum(s.windows_skipped for s in stats.sources.values()),
        delays,
        stats.latency_ms_p99,
        sum(cpu.values()) / max(n, 1),
        {k: v / seconds for k, v in cpu.items()},
        rss,
    )  # fmt: skip


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def per_node_overhead(single: Result, on_ray: Result) -> float:
    """Cores the ray run used beyond the single run's, per node: the driver, the engines'
    extra and Ray's own processes, for the same windows (paced sources: same windows/s)."""
    return (sum(on_ray.cpu_parts.values()) - single.cpu_parts["process"]) / on_ray.nodes


def table(pairs: dict[int, list[tuple[Result, Result]]]) -> list[str]:
    rows = [
        "| nodes | run | windows/s | ratio to single | windows skipped | event ms p50 | "
        "event ms p99 | node window ms p99 | CPU ms/window | ratio to single | "
        "CPU (cores): driver / engines / Ray | backend overhead per node (cores) | "
        "engine RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for nodes, runs in sorted(pairs.items()):
        for which in (0, 1):
            rs = [pair[which] for pair in runs]
            single = [pair[0] for pair in runs]
            wps = med([r.windows_per_s for r in rs])
            wratio = med(
                [r.windows_per_s / s.windows_per_s for r, s in zip(rs, single, strict=True)]
            )
            cpu = med([r.cpu_s_per_window * 1000 for r in rs])
            cratio = med(
                [r.cpu_s_per_window / s.cpu_s_per_window for r, s in zip(rs, single, strict=True)]
            )
            if which == 0:
                parts = f"{med([r.cpu_parts['process'] for r in rs]):.2f} (one process)"
                rss = overhead = "-"
            else:
                overhead = f"{med([per_node_overhead(a, b) for a, b in runs]):.3f}"
                parts = " / ".join(
                    f"{med([r.cpu_parts[k] for r in rs]):.2f}" for k in ("driver", "engines", "ray")
                )
                rss_each = [statistics.mean(r.engine_rss_mib) for r in rs if r.engine_rss_mib]
                rss = f"{med(rss_each):.0f}"
            rows.append(
                f"| {nodes} | {rs[0].name} | {wps:.2f} | {wratio:.3f} | "
                f"{med([float(r.windows_skipped) for r in rs]):.0f} | "
                f"{med([p(r.event_ms, 50) for r in rs]):.0f} | "
                f"{med([p(r.event_ms, 99) for r in rs]):.0f} | "
                f"{med([r.node_p99_ms for r in rs]):.0f} | {cpu:.1f} | {cratio:.2f} | "
                f"{parts} | {overhead} | {rss} |"
            )
    return rows


def long_video(folder: Path, loops: int) -> Path:
    """The demo video ``loops`` times over (stream copy), so a saturated run outlasts its
    measurement."""
    out = folder / "long.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-stream_loop", str(loops - 1), "-i",
         str(DEMO / "demo.mp4"), "-c", "copy", str(out)],
        check=True,
    )  # fmt: skip
    return out


def saturate(args: argparse.Namespace) -> None:
    """Single vs one-node ray, sources as fast as the model goes, on one CPU: everything there
    (``--layout one-core``), or the node's own processes there and the head (GCS, driver) on
    another (``--layout worker-node``)."""
    import ray
    from ray.cluster_utils import Cluster

    cpus = sorted(os.sched_getaffinity(0))
    node_cpu = cpus[-1]
    head_cpu = node_cpu if args.layout == "one-core" else cpus[0]
    if head_cpu == node_cpu and args.layout != "one-core":
        raise SystemExit("error: --layout worker-node needs two CPUs")
    # Affinity is per thread and inherited by the threads and processes a thread starts: the
    # head's processes and Ray's driver threads are started on head_cpu, the worker node's
    # raylet (and the engine actor it starts) and the single run's threads on node_cpu.
    os.sched_setaffinity(0, {head_cpu})
    print(
        f"machine: {machine()}; git {git_rev()}; ray {ray.__version__}; layout {args.layout}: "
        f"node on CPU {node_cpu}, head and driver on CPU {head_cpu}",
        flush=True,
    )
    rows: list[tuple[Result, Result]] = []
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        folder = Path(tmp)
        cfg = make_config(folder, args.sources, args.threads, long_video(folder, 8))
        one_core = args.layout == "one-core"
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1 if one_core else 0})
        try:
            if not one_core:
                os.sched_setaffinity(0, {node_cpu})
                cluster.add_node(num_cpus=1)
                os.sched_setaffinity(0, {head_cpu})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level=logging.WARNING)

            def single_run() -> Result:
                os.sched_setaffinity(0, {node_cpu})  # the pipeline's threads start from here
                try:
                    return run_single(cfg, args, folder)
                finally:
                    os.sched_setaffinity(0, {head_cpu})

            for r in range(args.rounds):
                if r % 2 == 0:  # turn about, so that a drift in load hits both alike
                    single = single_run()
                    on_ray = run_ray(cfg, args, folder, 1)
                else:
                    on_ray = run_ray(cfg, args, folder, 1)
                    single = single_run()
                rows.append((single, on_ray))
                print(
                    f"round {r + 1}: single {single.windows_per_s:.2f} windows/s, "
                    f"ray {on_ray.windows_per_s:.2f} windows/s, "
                    f"ratio {on_ray.windows_per_s / single.windows_per_s:.3f}",
                    flush=True,
                )
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(
        f"\n{args.sources} sources (demo.mp4 x8, realtime: false), layout {args.layout}, "
        f"{args.seconds:g} s measured per run, torch threads {args.threads}\n"
    )
    print("| round | single windows/s | ray (1 node) windows/s | ratio | overhead |")
    print("|---:|---:|---:|---:|---:|")
    ratios = []
    for i, (single, on_ray) in enumerate(rows, 1):
        ratio = on_ray.windows_per_s / single.windows_per_s
        ratios.append(ratio)
        print(
            f"| {i} | {single.windows_per_s:.2f} | {on_ray.windows_per_s:.2f} | {ratio:.3f} | "
            f"{(1 - ratio) * 100:.1f}% |"
        )
    print(
        f"| median | {med([a.windows_per_s for a, _ in rows]):.2f} | "
        f"{med([b.windows_per_s for _, b in rows]):.2f} | {med(ratios):.3f} | "
        f"{(1 - med(ratios)) * 100:.1f}% |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=6)
    ap.add_argument("--nodes", default="1,2,3", help="cluster sizes, growing")
    ap.add_argument("--rounds", type=int, default=3, help="pairs (single, ray) per size")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured span of each run")
    ap.add_argument("--warmup", type=float, default=3.0, help="after every source is online")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (single and engines)")
    ap.add_argument(
        "--saturate", action="store_true", help="one CPU, sources as fast as possible (see above)"
    )
    ap.add_argument(
        "--layout",
        default="one-core",
        choices=["one-core", "worker-node"],
        help="with --saturate: everything on the node's CPU, or the head and driver elsewhere",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.saturate:
        saturate(args)
        return
    import ray
    from ray.cluster_utils import Cluster

    sizes = sorted(int(n) for n in args.nodes.split(","))
    print(f"machine: {machine()}; git {git_rev()}; ray {ray.__version__}", flush=True)
    pairs: dict[int, list[tuple[Result, Result]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        folder = Path(tmp)
        cfg = make_config(folder, args.sources, args.threads)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level=logging.WARNING)
            have = 1
            for size in sizes:
                while have < size:
                    cluster.add_node(num_cpus=1)
                    have += 1
                cluster.wait_for_nodes()
                for r in range(args.rounds):
                    single = run_single(cfg, args, folder)
                    on_ray = run_ray(cfg, args, folder, size)
                    pairs.setdefault(size, []).append((single, on_ray))
                    for res in (single, on_ray):
                        print(
                            f"nodes {size} round {r + 1} {res.name}: "
                            f"{res.windows_per_s:.2f} windows/s, "
                            f"event ms p99 {p(res.event_ms, 99):.0f} "
                            f"({len(res.event_ms)} lines), "
                            f"CPU ms/window {res.cpu_s_per_window * 1000:.1f}, "
                            f"cores {res.cpu_parts}, RSS {res.engine_rss_mib}",
                            flush=True,
                        )
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(
        f"\n{args.sources} sources (demo.mp4 paced at 10 fps, stride 4: "
        f"{args.sources * 2.5:.1f} windows/s offered), {args.seconds:g} s measured per run, "
        f"medians of {args.rounds} pairs, torch threads {args.threads}\n"
    )
    print("\n".join(table(pairs)))
    for size, runs in sorted(pairs.items()):
        cores = med([per_node_overhead(single, on_ray) for single, on_ray in runs])
        print(
            f"{size} node(s): the backend costs {cores:.3f} cores per node, "
            f"{cores * 100:.1f}% of a one-CPU node's windows/s when it is saturated"
        )


if __name__ == "__main__":
    main()
