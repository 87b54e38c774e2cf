"""Live webcam demo: camera 0, annotated window, events logged to streamdet-out/.

    python demo/webcam_demo.py            # camera 0
    python demo/webcam_demo.py --camera 1

Press q or Esc in the window (or Ctrl-C) to stop. Without a camera it exits with one clear
``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamdet.cli import main

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "webcam.yaml"


def demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camera", default="0", help="camera index (default 0)")
    parser.add_argument("--max-seconds", type=float, help="stop after N seconds")
    args = parser.parse_args(argv)
    cli_args = ["run", str(CONFIG), "--source", args.camera, "--display"]
    if args.max_seconds:
        cli_args += ["--max-seconds", str(args.max_seconds)]
    return main(cli_args)


if __name__ == "__main__":
    sys.exit(demo())
