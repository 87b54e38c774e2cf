"""PNG plots drawn with matplotlib: training curves and a confusion matrix.

matplotlib is optional (``pip install 'streamdet[train]'``): without it :data:`AVAILABLE` is
False and training writes its metrics CSV without plots. It draws with the headless Agg backend,
so no display is needed, and each PNG is written to a temporary name and renamed, so a reader
never sees half a file.

Example:
    >>> import numpy as np
    >>> if AVAILABLE:
    ...     plot_confusion(np.eye(2, dtype=int), ["a", "b"], "/tmp/doc_cm.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot's import
    from matplotlib import pyplot as plt
except ImportError:  # pragma: no cover - exercised only where the extra is not installed
    plt = None  # type: ignore[assignment]

AVAILABLE = plt is not None
INSTALL_HINT = "plots need matplotlib: pip install 'streamdet[train]'"


def _require() -> Any:
    if plt is None:
        raise ImportError(INSTALL_HINT)
    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, format="png", dpi=100)
    finally:
        _require().close(fig)
    os.replace(tmp, path)


def plot_curves(history: Sequence[dict[str, float]], path: str | os.PathLike[str]) -> None:
    """Loss and accuracy (train and validation) against epoch, side by side."""
    pyplot = _require()
    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, acc_ax) = pyplot.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        for split in ("train", "val"):
            ax.plot(epochs, [r[f"{split}_{key}"] for r in history], marker=".", label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(0.0, 1.0)
    _save(fig, path)


def plot_confusion(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts in cells."""
    pyplot = _require()
    n = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, np.maximum(rows, 1))
    side = max(3.5, 0.55 * n + 2.0)
    fig, ax = pyplot.subplots(figsize=(side, side), layout="constrained")
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            color = "white" if norm[i, j] > 0.6 else "black"
            ax.text(
                j, i, str(int(confusion[i, j])), ha="center", va="center", color=color, fontsize=8
            )
    ticks = range(n)
    ax.set_xticks(ticks, [str(c)[:16] for c in class_names], rotation=90)
    ax.set_yticks(ticks, [str(c)[:16] for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = float(np.trace(confusion) / max(confusion.sum(), 1))
    ax.set_title(f"{title}  top-1 {acc:.3f}".strip(), fontsize=10)
    _save(fig, path)
