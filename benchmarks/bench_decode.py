"""Decode speed of the two capture backends, PyAV and OpenCV, on the same files.

Each round reads every file start to end with every (backend, mode) in shuffled order, so that
background load hits all of them alike; the table gives the median frames per second over the
rounds. Modes, as capture uses a source:

- ``read``: every frame decoded and converted to BGR (``read()``, a frame someone looks at);
- ``skip``: decoded, not converted (``skip()``, a frame the model does not sample);
- ``read+packets`` (PyAV only): ``read`` while keeping every encoded packet and draining them
  each frame, as a live source with event clips on does.

Decoding threads: ``--threads 1`` is a replay's setting (``Pacing.decode_threads``), ``auto``
FFmpeg's choice (a live or paced source).

Example:
    python benchmarks/bench_decode.py --rounds 5 --threads 1,auto
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_VIDEO, git_rev, machine  # noqa: E402

from streamdet.sources.capture import make_opener  # noqa: E402

MODES = ("read", "skip", "read+packets")


def h264_file(folder: Path, name: str, args: list[str]) -> Path:
    """An H.264 file made with ffmpeg (x264 defaults: B-frames, a keyframe every 250 frames)."""
    path = folder / name
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args]
        + ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-an", str(path)],
        check=True,
        timeout=300,
    )
    return path


def inputs(folder: Path) -> dict[str, Path]:
    """The files timed: vtest.avi as it is (MPEG-4 part 2), as H.264, and 1080p H.264."""
    return {
        "vtest.avi 768x576 MPEG-4": DEFAULT_VIDEO,
        "vtest 768x576 H.264": h264_file(folder, "vtest.mp4", ["-i", str(DEFAULT_VIDEO)]),
        "testsrc2 1920x1080 H.264": h264_file(
            folder,
            "1080p.mp4",
            ["-f", "lavfi", "-i", "testsrc2=size=1920x1080:rate=25:duration=8"],
        ),
    }


def frames_per_s(path: Path, backend: str, mode: str, threads: int | None) -> float:
    """Read ``path`` start to end as ``mode`` says; frames per second."""
    opener = make_opener(
        str(path), backend=backend, decode_threads=threads, keep_packets=mode == "read+packets"
    )
    source = opener()
    try:
        t0 = time.perf_counter()
        frames = 0
        while True:
            got = source.skip() if mode == "skip" else source.read() is not None
            if not got:
                break
            if mode == "read+packets":
                source.drain_packets(frames, time.time())  # type: ignore[attr-defined]
            frames += 1
        return frames / (time.perf_counter() - t0)
    finally:
        source.release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,auto", help="comma list of 1, 2... or auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    thread_settings = [None if t == "auto" else int(t) for t in args.threads.split(",")]

    print(f"machine: {machine()}")
    print(f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}), git {git_rev()}")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = inputs(Path(tmp))
        cases = [
            (name, backend, mode, threads)
            for name in files
            for threads in thread_settings
            for backend in ("pyav", "opencv")
            for mode in MODES
            if not (backend == "opencv" and mode == "read+packets")
        ]
        results: dict[tuple, list[float]] = {case: [] for case in cases}
        for round_ in range(args.rounds):
            order = cases[:]
            rng.shuffle(order)
            for case in order:
                name, backend, mode, threads = case
                results[case].append(frames_per_s(files[name], backend, mode, threads))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    print(f"\nframes/s, median of {args.rounds} interleaved rounds (min-max in brackets)\n")
    print("| file | threads | mode | OpenCV | PyAV | PyAV / OpenCV |")
    print("|---|---|---|---|---|---|")
    for name in files:
        for threads in thread_settings:
            for mode in MODES:
                pyav = results[(name, "pyav", mode, threads)]
                opencv = results.get((name, "opencv", mode, threads))
                base = opencv or results[(name, "opencv", "read", threads)]
                ratio = statistics.median(pyav) / statistics.median(base)
                shown = "-" if opencv is None else cell(opencv)
                label = "auto" if threads is None else str(threads)
                note = "" if opencv else " (vs OpenCV read)"
                print(f"| {name} | {label} | {mode} | {shown} | {cell(pyav)} | {ratio:.2f}{note} |")


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


if __name__ == "__main__":
    main()
