"""PNG plots drawn with OpenCV: training curves and a confusion matrix.

OpenCV is already a dependency and draws headless, so training needs no plotting library.

Example:
    >>> import numpy as np
    >>> plot_confusion(np.eye(2, dtype=int), ["a", "b"], "/tmp/doc_cm.png")
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_COLORS = [(200, 90, 30), (40, 140, 240), (60, 170, 60), (40, 40, 210)]  # BGR


def _write(img: np.ndarray, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    if not cv2.imwrite(str(tmp), img):
        raise OSError(f"{path}: cannot write PNG")
    os.replace(tmp, path)


def _panel(
    img: np.ndarray,
    box: tuple[int, int, int, int],
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    title: str,
    y_range: tuple[float, float] | None = None,
) -> None:
    x0, y0, x1, y1 = box
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    cv2.putText(img, title, (x0, y0 - 8), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not xs or not values:
        return
    lo, hi = y_range if y_range else (min(values), max(values))
    if hi - lo < 1e-9:
        hi = lo + 1.0
    xmin, xmax = min(xs), max(xs)
    if xmax - xmin < 1e-9:
        xmax = xmin + 1.0

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (
            int(x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)),
            int(y1 - (y - lo) / (hi - lo) * (y1 - y0)),
        )

    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        _, py = to_px(xmin, v)
        cv2.line(img, (x0, py), (x1, py), (220, 220, 220), 1)
        cv2.putText(img, f"{v:.2f}", (x0 - 42, py + 4), _FONT, 0.35, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.putText(img, f"{xmin:g}", (x0, y1 + 14), _FONT, 0.35, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.putText(img, f"{xmax:g}", (x1 - 20, y1 + 14), _FONT, 0.35, (80, 80, 80), 1, cv2.LINE_AA)
    for k, (name, vs) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [
            to_px(x, v) for x, v in zip(xs, vs, strict=False) if v is not None and math.isfinite(v)
        ]
        if len(pts) > 1:
            cv2.polylines(img, [np.array(pts, np.int32)], False, color, 2, cv2.LINE_AA)
        for p in pts[-1:]:
            cv2.circle(img, p, 3, color, -1)
        cv2.putText(img, name, (x0 + 8 + 110 * k, y0 + 16), _FONT, 0.45, color, 1, cv2.LINE_AA)


def plot_curves(history: Sequence[dict[str, float]], path: str | os.PathLike[str]) -> None:
    """Loss and accuracy (train and validation) against epoch."""
    img = np.full((320, 860, 3), 255, np.uint8)
    xs = [float(r["epoch"]) for r in history]
    _panel(
        img,
        (60, 40, 410, 280),
        xs,
        {"train": [r["train_loss"] for r in history], "val": [r["val_loss"] for r in history]},
        "loss",
    )
    _panel(
        img,
        (490, 40, 840, 280),
        xs,
        {"train": [r["train_acc"] for r in history], "val": [r["val_acc"] for r in history]},
        "accuracy",
        (0.0, 1.0),
    )
    cv2.putText(img, "epoch", (420, 310), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    _write(img, path)


def plot_confusion(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts in cells."""
    n = len(class_names)
    cell = max(28, min(60, 480 // max(n, 1)))
    left, top = 130, 60
    img = np.full((top + n * cell + 120, left + n * cell + 20, 3), 255, np.uint8)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, np.maximum(rows, 1))
    for i in range(n):
        for j in range(n):
            shade = int(255 - 200 * norm[i, j])
            p0 = (left + j * cell, top + i * cell)
            cv2.rectangle(img, p0, (p0[0] + cell, p0[1] + cell), (255, shade, shade), -1)
            cv2.rectangle(img, p0, (p0[0] + cell, p0[1] + cell), (200, 200, 200), 1)
            text = str(int(confusion[i, j]))
            color = (255, 255, 255) if norm[i, j] > 0.6 else (0, 0, 0)
            cv2.putText(
                img, text, (p0[0] + 4, p0[1] + cell // 2 + 4), _FONT, 0.38, color, 1, cv2.LINE_AA
            )
        cv2.putText(
            img,
            str(class_names[i])[:16],
            (4, top + i * cell + cell // 2 + 4),
            _FONT,
            0.4,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    for j in range(n):
        org = (left + j * cell + cell // 3, top + n * cell + 8)
        label = np.full((14, 110, 3), 255, np.uint8)
        cv2.putText(label, str(class_names[j])[:16], (0, 11), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rotated = cv2.rotate(label, cv2.ROTATE_90_CLOCKWISE)
        h, w = rotated.shape[:2]
        y, x = org[1], org[0]
        img[y : y + h, x : x + w] = np.minimum(
            img[y : y + h, x : x + w], rotated[: img.shape[0] - y, : img.shape[1] - x]
        )
    acc = float(np.trace(confusion) / max(confusion.sum(), 1))
    cv2.putText(
        img,
        f"{title}  top-1 {acc:.3f}  (rows: true, cols: predicted)",
        (8, 24),
        _FONT,
        0.45,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    _write(img, path)
