"""Soak: a real-time RTSP stream with periodic outages; is memory and thread count flat?

Serves ``vtest.avi`` (looped) as a live 320x240 10 fps H.264 RTSP stream with the test server
(``tests/rtsp_server.py``, GStreamer under the system python), runs the streamdet pipeline on it
in this process, and every ``--outage-every`` seconds makes an outage, alternating a killed server
(SIGKILL, restarted after ``--outage-s``) and a hung one (SIGSTOP, SIGCONT after ``--outage-s``).
RSS, threads, open file descriptors and glibc's allocator (bytes in use, freed bytes it keeps)
are sampled every 10 s; the report compares the first sample after warm-up (``--warmup-s``:
model, decoder and allocator pools settle) with the last, gives the growth over the second half
of the run (a leak keeps growing there, warm-up does not), and checks that the stream came back
online after every outage. RSS that steps up while the bytes in use stay flat is the allocator
keeping a freed block, not a leak.

Usage:
    python benchmarks/soak.py                         # 30 minutes, an outage every minute
    python benchmarks/soak.py --minutes 3 --outage-every 20 --json soak.json
    python benchmarks/soak.py --minutes 4 --outage-every 30 --workers 2
    python benchmarks/soak.py --workers 2 --width 1 --precision bf16   # the full model, as streamdet run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the RTSP test server's launcher lives with the tests

from conftest import RtspServer, free_port  # noqa: E402

from streamdet.config import load_config  # noqa: E402
from streamdet.device import Precision  # noqa: E402
from streamdet.inference import build_engine  # noqa: E402
from streamdet.models.c3d import C3D_BN  # noqa: E402
from streamdet.models.weights import Checkpoint  # noqa: E402
from streamdet.pipeline import Pipeline  # noqa: E402
from streamdet.preprocess import DEFAULT_CONTRACT  # noqa: E402
from streamdet.sinks.jsonl import read_lines  # noqa: E402

SAMPLE_EVERY_S = 10.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc_mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _glibc_mallinfo2()


def malloc_status() -> dict[str, int]:
    """What glibc's allocator holds, over all its arenas (kB): ``malloc_used_kb``, the bytes
    handed out and not yet freed (heap and mmapped chunks), and ``malloc_kept_kb``, freed bytes
    it keeps for reuse instead of returning to the OS. RSS that rises while ``malloc_used_kb``
    stays flat is the allocator keeping memory, not a leak. Empty off glibc."""
    if _MALLINFO2 is None:
        return {}
    info = _MALLINFO2()
    return {
        "malloc_used_kb": (info.uordblks + info.hblkhd) // 1024,
        "malloc_kept_kb": info.fordblks // 1024,
    }


def proc_status() -> dict[str, int]:
    """RSS (kB), OS threads and open file descriptors of this process, from /proc."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return {
        "rss_kb": fields["VmRSS"],
        "os_threads": fields["Threads"],
        "py_threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        **malloc_status(),
    }


def verdict(report: dict[str, Any], first: dict[str, Any], last: dict[str, Any]) -> str:
    """'flat', 'flat in use, ...' when RSS grew only by freed blocks the allocator kept (bytes in
    use flat, kept blocks up by as much: bounded by the largest transient buffers, not a leak),
    or 'GROWING'."""
    if last["py_threads"] > first["py_threads"] or last["fds"] > first["fds"] + 2:
        return "GROWING"
    rss = report["rss_growth_second_half_mb"]
    if rss < 10:
        return "flat"
    used, kept = (
        report.get("malloc_used_growth_second_half_mb"),
        report.get("malloc_kept_growth_second_half_mb"),
    )
    if used is not None and used < 2 and kept >= rss - 2:
        return f"flat in use (RSS +{rss} MB: freed blocks the allocator kept)"
    return "GROWING"


def make_outages(
    server: RtspServer,
    every_s: float,
    outage_s: float,
    stop: threading.Event,
    record: list[dict[str, Any]],
) -> threading.Thread:
    def run() -> None:
        n = 0
        while not stop.wait(every_s):
            kind = "kill" if n % 2 == 0 else "hang"
            started = time.time()
            if kind == "kill":
                server.kill()
                if stop.wait(outage_s):
                    server.start()
                    break
                server.start()
            else:
                server.pause()
                stop.wait(outage_s)
                server.resume()
            record.append({"kind": kind, "start": started, "end": time.time()})
            n += 1

    thread = threading.Thread(target=run, name="outages", daemon=True)
    thread.start()
    return thread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    parser.add_argument("--outage-every", type=float, default=60.0, help="seconds between outages")
    parser.add_argument("--outage-s", type=float, default=5.0, help="length of each outage")
    parser.add_argument("--width", type=float, default=0.25, help="C3D_BN width (random weights)")
    cpu_paths = [p.value for p in Precision if p not in (Precision.AUTO, Precision.FP16)]
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=cpu_paths,
        help="inference path (default fp32); bf16 and int8 are checked, and int8 calibrated, "
        "on the first windows of --video",
    )
    parser.add_argument("--video", default=str(REPO / "tests" / ".assets" / "vtest.avi"))
    parser.add_argument(
        "--warmup-s", type=float, default=60.0, help="seconds before the baseline sample"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="inference workers, each on an equal share of the torch threads (default 1, what "
        "streamdet run picks for one camera)",
    )
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    workdir = Path(tempfile.mkdtemp(prefix="streamdet-soak-"))
    server = RtspServer(["--video", args.video], free_port(), workdir / "rtsp_server.log")
    server.start()
    torch.manual_seed(0)
    model = C3D_BN(num_classes=3, width=args.width).eval()
    checkpoint = Checkpoint(model, ("none", "walk", "run"), DEFAULT_CONTRACT, "soak-random", "-")
    events = workdir / "events.jsonl"
    cfg = load_config(
        None,
        {
            "sources": [
                {
                    "name": "cam",
                    "url": server.url,
                    "options": {
                        "open_timeout_s": 3.0,
                        "read_timeout_s": 2.0,
                        "stall_timeout_s": 4.0,
                        "backoff_initial_s": 0.5,
                        "backoff_max_s": 4.0,
                    },
                }
            ],
            "model": {"device": "cpu", "precision": args.precision, "max_batch": 2},
            "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
            "sinks": {"events": {"path": str(events), "rotate_mb": 1.0}},
            "progress_interval_s": 60.0,
        },
    )
    check_clips = None
    if args.precision != "fp32":
        from streamdet.inference import calibration_windows

        check_clips = calibration_windows(args.video, stride=8)
    engine = build_engine(model, "cpu", args.precision, check_clips=check_clips)
    pipeline = Pipeline(
        cfg,
        checkpoint,
        engine,
        print_fn=lambda line: None,
        workers=args.workers,
        threads_per_worker=max(1, torch.get_num_threads() // args.workers)
        if args.workers > 1
        else None,
    )
    outcome: dict[str, Any] = {}

    def run_pipeline() -> None:
        try:
            outcome["summary"] = pipeline.run()
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    runner = threading.Thread(target=run_pipeline, name="soak-pipeline", daemon=True)
    runner.start()
    stop = threading.Event()
    outages: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    duration = args.minutes * 60.0
    outage_thread = None
    try:
        while not stop.wait(SAMPLE_EVERY_S if samples else args.warmup_s):
            elapsed = time.monotonic() - started
            samples.append(
                {
                    "t_s": round(elapsed, 1),
                    **proc_status(),
                    "windows": pipeline.inference.windows_done,
                }
            )
            print(f"[soak] {samples[-1]}", flush=True)
            if outage_thread is None:  # warm-up over: the first sample is the baseline
                outage_thread = make_outages(
                    server, args.outage_every, args.outage_s, stop, outages
                )
            if elapsed >= duration or not runner.is_alive():
                break
    finally:
        stop.set()
        if outage_thread is not None:
            outage_thread.join(args.outage_s + 15)
        time.sleep(
            min(10.0, args.outage_s + 5)
        )  # let the last outage recover before the final look
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                **proc_status(),
                "windows": pipeline.inference.windows_done,
            }
        )
        pipeline.stop("soak over")
        runner.join(15)
        server.stop()

    lines = list(read_lines(events))
    statuses = [o for o in lines if o["type"] == "status"]
    capture = pipeline.captures[0]
    first, last = samples[0], samples[-1]
    middle = samples[len(samples) // 2]
    report = {
        "minutes": round((time.monotonic() - started) / 60, 2),
        "outages": Counter(o["kind"] for o in outages),
        "back_online_after_last_outage": bool(statuses) and statuses[-1]["status"] == "online",
        "start": first,
        "end": last,
        "rss_growth_mb": round((last["rss_kb"] - first["rss_kb"]) / 1024, 1),
        "rss_growth_second_half_mb": round((last["rss_kb"] - middle["rss_kb"]) / 1024, 1),
        "rss_max_mb": round(max(s["rss_kb"] for s in samples) / 1024, 1),
        **{
            f"{key.removesuffix('_kb')}_growth_second_half_mb": round(
                (last[key] - middle[key]) / 1024, 1
            )
            for key in ("malloc_used_kb", "malloc_kept_kb")
            if key in last
        },
        "threads_start_end": (first["os_threads"], last["os_threads"]),
        "py_threads_start_end": (first["py_threads"], last["py_threads"]),
        "fds_start_end": (first["fds"], last["fds"]),
        "reconnects": capture.stats.reconnects,
        "stalls": capture.stats.stalls,
        "abandoned_threads": capture.stats.abandoned,
        "offline_s": round(capture.stats.offline_total(), 1),
        "frames_read": capture.stats.frames_read,
        "windows": pipeline.inference.windows_done,
        "status_lines": Counter(o["status"] for o in statuses),
        "end_reasons": Counter(o["end_reason"] for o in lines if o["type"] == "end"),
        "error": repr(outcome.get("error")) if "error" in outcome else None,
        "samples": samples,
    }
    report["verdict"] = verdict(report, first, last)
    flat = report["verdict"].startswith("flat")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if flat and report["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
