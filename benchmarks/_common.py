"""Shared helpers of the benchmarks: real windows from a video, the model, summary statistics."""

from __future__ import annotations

import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import torch

from streamdet.models.c3d import C3D_BN
from streamdet.models.weights import load_or_random
from streamdet.windows import video_windows

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VIDEO = REPO / "tests" / ".assets" / "vtest.avi"


def real_windows(video: str | Path, n: int, *, stride: int = 8, skip: int = 0) -> torch.Tensor:
    """``n`` preprocessed (3, 16, 112, 112) windows of ``video``, one every ``stride`` frames.

    :func:`streamdet.windows.video_windows` after skipping ``skip`` frames, rewound when the
    video ends so that there are always ``n`` to time.
    """
    return video_windows(video, n, stride=stride, skip=skip, loop=True)


def load_model(
    weights: str | None, num_classes: int | None, width: float | None
) -> tuple[C3D_BN, str]:
    """The model to benchmark and a description: a checkpoint, or seeded random weights.

    ``num_classes`` and ``width`` as :func:`~streamdet.models.weights.load_or_random` takes them.
    """
    ckpt = load_or_random(weights, num_classes=num_classes, width=width)
    if not ckpt.is_random:
        return ckpt.model, f"checkpoint {weights} (sha256 {ckpt.sha256[:12]})"
    model = ckpt.model
    # Random-init BN statistics are identities; make them non-trivial so folding is exercised.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model, f"random init (seed 0), width {model.width}, {ckpt.num_classes} classes"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"cv2 {cv2.__version__}, load average at start {' '.join(load)}, {kernels_start_up()}"
    )


def kernels_start_up() -> str:
    """Load streamdet's compiled kernels now (Numba: compiled the first time, then read from its
    cache) and say how long that took, so no timed section pays for it."""
    from streamdet import kernels

    t0 = time.perf_counter()
    loaded = kernels.get() is not None
    if not loaded:
        return "compiled kernels unavailable (OpenCV and ATen routes)"
    return f"compiled kernels loaded in {time.perf_counter() - t0:.1f} s (Numba; cached after the first compile)"


def git_rev() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.SubprocessError):
        return "?"


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def clips_per_s(
    run: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    n: int,
    batch: int = 1,
    callers: int = 1,
    threads: int | None = None,
) -> float:
    """``run`` alone on ``n`` clips of ``windows`` in batches of ``batch``, from ``callers``
    threads side by side, each on ``threads`` torch threads when given (as streamdet's inference
    workers call the engine); clips per second."""
    taken = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal taken
        if threads is not None:
            torch.set_num_threads(threads)
        while True:
            with lock:
                first = taken
                b = min(batch, n - first)
                taken += max(b, 0)
            if b <= 0:
                return
            run(windows[torch.arange(first, first + b) % windows.shape[0]])

    t0 = time.perf_counter()
    if callers == 1 and threads is None:
        work()
    else:
        pool = [threading.Thread(target=work) for _ in range(callers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    return n / (time.perf_counter() - t0)
