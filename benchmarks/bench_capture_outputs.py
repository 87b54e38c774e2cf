"""What the outputs that take decoded frames cost capture: the web page, snapshots, and an
output that wants every frame, on paced 30-fps cameras; and what FFmpeg's frame threads cost.

Each camera decodes 30 frames a second (``--fps``); the model uses every third. A frame the
model skips is converted to BGR only if an output wants it (``Sink.wants_frame``): the web page
one per ``1 / mjpeg_fps`` s, snapshots only the model's frames, an annotated video every frame.
The engine is a stub that answers at once, so the process's CPU is capture and the outputs.
Modes, in alternating rounds, medians: no output taking frames; the web page and media (snapshots,
clips); the same plus an output that wants every frame (what any frame output cost before
outputs could say which frames they want); no output, with each camera's decoder on FFmpeg's
own thread count (``ffmpeg-threads``: frame threads, what a live source had before a run with
as many sources as cores decoded each on one thread).

Usage:
    python benchmarks/bench_capture_outputs.py [--cameras 10] [--seconds 25] [--rounds 3]
    python benchmarks/bench_capture_outputs.py --cameras 27 --fps 10 --modes none,ffmpeg-threads
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_VIDEO, git_rev, load_model, machine  # noqa: E402
from bench_pipeline import make_h264_clip  # noqa: E402

from streamdet.config import RunConfig  # noqa: E402
from streamdet.models.weights import Checkpoint, default_class_names  # noqa: E402
from streamdet.pipeline import Pipeline  # noqa: E402
from streamdet.preprocess import DEFAULT_CONTRACT  # noqa: E402
from streamdet.sinks.base import BaseSink, FrameMessage  # noqa: E402
from streamdet.sources.pacing import Pacing  # noqa: E402

# Decoding as a live source did before a run with as many sources as cores decoded on one thread
FFMPEG_THREADS = mock.patch.object(
    Pacing, "decode_threads", lambda self, sources=1: 1 if self is Pacing.REPLAY else None
)
MODES = ("none", "web+media", "web+media+every-frame", "ffmpeg-threads")


class StubEngine:
    """Answers every window at once: the run's CPU is capture and the outputs."""

    device = torch.device("cpu")
    precision = "fp32"
    concurrent = True
    path = "stub"

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        return torch.zeros(clips.shape[0], self.classes)


class EveryFrame(BaseSink):
    """An output that wants every frame of every camera and does nothing with it."""

    name = "every-frame"

    def __init__(self, sources: list[str]) -> None:
        self.sources = sources

    def frame_sources(self) -> list[str]:
        return self.sources

    def on_frame(self, msg: FrameMessage) -> None:
        pass


def run(mode: str, clip: Path, cameras: int, seconds: float, checkpoint: Checkpoint) -> float:
    """ms of process CPU per frame read, over one paced run in ``mode``."""
    names = [f"cam{i}" for i in range(cameras)]
    with tempfile.TemporaryDirectory() as tmp:
        doc = {
            "sources": [{"name": n, "url": str(clip), "realtime": True} for n in names],
            "model": {"device": "cpu", "max_batch": 1},
            "window": {"stride": 8},
            "events": {"background": checkpoint.class_names[0]},
            "sinks": {"events": {"path": str(Path(tmp) / "events.jsonl")}},
            "progress_interval_s": 3600,
        }
        if mode.startswith("web"):
            doc |= {"web": {"port": 0}, "media": {"dir": str(Path(tmp) / "media")}}
        sinks = (EveryFrame(names),) if mode.endswith("every-frame") else ()
        engine = StubEngine(len(checkpoint.class_names))
        threads = FFMPEG_THREADS if mode == "ffmpeg-threads" else contextlib.nullcontext()
        with threads:  # the decoders' thread counts are chosen when the pipeline is built
            pipeline = Pipeline(
                RunConfig.model_validate(doc),
                checkpoint,
                engine,  # type: ignore[arg-type]
                max_seconds=seconds,
                print_fn=lambda line: None,
                workers=2,
                threads_per_worker=1,
                sinks=sinks,
            )
        before = resource.getrusage(resource.RUSAGE_SELF)
        summary = pipeline.run()
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    frames = sum(s.frames_read for s in summary.sources)
    return cpu / max(frames, 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cameras", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fps", type=float, default=30.0, help="the cameras' frame rate")
    ap.add_argument("--modes", default=",".join(MODES[:3]), help=f"comma-separated, of {MODES}")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        raise SystemExit(f"error: --modes must be among {MODES}")
    print(f"# bench_capture_outputs: {machine()}, git {git_rev()}")
    model, _ = load_model(None, None, 0.25)
    checkpoint = Checkpoint(
        model, default_class_names(model.num_classes), DEFAULT_CONTRACT, "bench", "-"
    )
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_h264_clip(DEFAULT_VIDEO, Path(tmp) / "cam.mp4", 795, args.fps)
        if clip is None:
            raise SystemExit("error: the cameras need ffmpeg with libx264")
        ms: dict[str, list[float]] = {m: [] for m in modes}
        started = time.monotonic()
        for _ in range(args.rounds):
            for mode in modes:
                ms[mode].append(run(mode, clip, args.cameras, args.seconds, checkpoint))
    print(
        f"\n{args.cameras} paced {args.fps:g}-fps H.264 cameras (768x576), {args.seconds:g} s per run, "
        f"{args.rounds} rounds ({time.monotonic() - started:.0f} s)\n"
    )
    print(f"| mode | ms of CPU per frame, per round | median | ratio to {modes[0]} |")
    print("|---|---|---:|---:|")
    base = statistics.median(ms[modes[0]])
    for mode in modes:
        med = statistics.median(ms[mode])
        rounds = ", ".join(f"{v:.2f}" for v in ms[mode])
        print(f"| {mode} | {rounds} | {med:.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
