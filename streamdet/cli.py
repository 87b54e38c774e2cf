"""The ``streamdet`` command line.

Every problem a user can cause ends as one ``error:`` line on stderr and exit code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from streamdet import __version__
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
        raise argparse.ArgumentTypeError(f"invalid width {text!r}: expected a number in (0, 4]") from None
    if not 0.0 < value <= 4.0:
        raise argparse.ArgumentTypeError(f"invalid width {text!r}: expected a number in (0, 4]")
    return value


def _seconds(text: str) -> float:
    """``--max-seconds``: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds > 0") from None
    if not value > 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds > 0")
    return value


def _num_classes(text: str) -> int:
    """``--num-classes``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid class count {text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid class count {text!r}: expected an integer >= 1")
    return value


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
    from streamdet.runner import run_from_args

    return run_from_args(args, default_config_path())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamdet", description="Real-time video event detection with C3D_BN.")
    parser.add_argument("--version", action="version", version=f"streamdet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    info = sub.add_parser("info", help="model size, FLOPs, device and preprocessing")
    info.add_argument("--weights", help="checkpoint to describe")
    # None: a plain state dict's own shape (load_or_random), 1.0 and 8 without weights
    info.add_argument("--width", type=_width, help="width without weights (default 1.0)")
    info.add_argument("--num-classes", type=_num_classes,
                      help="classes without weights (default 8)")
    info.set_defaults(func=_cmd_info)

    validate = sub.add_parser("validate", help="check a config file")
    validate.add_argument("config", help="YAML config")
    validate.set_defaults(func=_cmd_validate)

    run = sub.add_parser("run", help="detect events (no CONFIG: the bundled demo)")
    run.add_argument("config", nargs="?", help="YAML config (default: the bundled demo)")
    run.add_argument("--source", action="append", metavar="URL",
                     help="camera index, file or URL; repeatable; replaces the config's sources")
    run.add_argument("--weights", help="checkpoint (overrides model.weights)")
    run.add_argument("--events", metavar="PATH", help="JSONL event log (overrides sinks.events.path)")
    run.add_argument("--output-video", metavar="PATH", help="write an annotated video")
    run.add_argument("--display", action="store_true", help="show annotated frames in a window")
    run.add_argument("--max-seconds", type=_seconds, metavar="N", help="stop after N seconds")
    run.add_argument("--truth", metavar="PATH",
                     help="ground-truth events JSON of the first source: print event F1 at exit")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides model.device")
    run.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                     help="overrides model.precision")
    run.set_defaults(func=_cmd_run)

    try:
        from streamdet.training.commands import add_commands
    except ImportError:  # training tools not installed in this build
        pass
    else:
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: argparse has printed it
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        print("error: a command is required: info, validate, run, ... (see 'streamdet --help')",
              file=sys.stderr)
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
        print(f"error: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, with every credential masked."""
    from streamdet.redaction import redact_text

    return redact_text(" ".join(str(exc).split()))


if __name__ == "__main__":
    sys.exit(main())
