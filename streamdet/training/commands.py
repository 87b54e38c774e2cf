"""The handlers of the ``train``, ``eval``, ``eval-events`` and ``export`` subcommands.

Their options are declared with every other command's in :data:`streamdet.cli.COMMANDS`, which
imports this module only when one of them runs. Each handler takes the parsed arguments and
returns an exit code. Bad user input raises a :class:`StreamdetError` subclass, which the CLI
prints as one ``error:`` line.

``python -m streamdet.training.commands train CONFIG`` runs ``streamdet train CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streamdet.errors import ConfigError


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
    """``streamdet`` itself: the commands are parsed in one place, :mod:`streamdet.cli`."""
    from streamdet.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
