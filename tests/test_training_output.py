"""What training shows and draws: the progress bar (tqdm on a terminal, plain lines in logs)
and the matplotlib plots of the run folder."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from streamdet.training import plots
from streamdet.training.trainer import _Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_one_tqdm_bar_per_epoch_reaching_its_total() -> None:
    term = _Terminal()
    bar = _Progress(True, stream=term)
    for epoch in range(2):
        for batch in range(1, 6):
            bar.update(epoch, 2, batch, 5, loss=1.0 / batch, acc=0.5, rate=12.0)
    bar.close()
    text = term.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "5/5" in text and "loss 0.200 acc 0.500 12.0 clips/s" in text
    assert text.count("\n") == 2  # each finished epoch's bar is left on its own line


def test_a_resumed_epoch_starts_its_bar_where_the_batches_left_off() -> None:
    term = _Terminal()
    bar = _Progress(True, stream=term)
    bar.update(0, 1, 4, 10, loss=1.0, acc=0.1, rate=1.0)
    bar.close()
    assert "4/10" in term.getvalue() and "1/10" not in term.getvalue()


def test_progress_in_a_log_is_plain_lines_without_carriage_returns() -> None:
    log = io.StringIO()
    bar = _Progress(True, stream=log, every_s=3600)
    for batch in range(1, 4):
        bar.update(0, 1, batch, 3, loss=0.5, acc=0.25, rate=3.0)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # The first batch, then the epoch's last (the rest are within every_s).
    assert lines == [
        "epoch 1/1 1/3 loss 0.500 acc 0.250 3.0 clips/s",
        "epoch 1/1 3/3 loss 0.500 acc 0.250 3.0 clips/s",
    ]


def test_disabled_progress_writes_nothing() -> None:
    term = _Terminal()
    _Progress(False, stream=term).update(0, 1, 1, 1, loss=0.5, acc=0.5, rate=1.0)
    assert term.getvalue() == ""


needs_matplotlib = pytest.mark.skipif(not plots.AVAILABLE, reason=plots.INSTALL_HINT)


@needs_matplotlib
def test_curves_are_a_png_that_shows_both_panels(tmp_path) -> None:
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 2.2 / e,
            "train_acc": 0.2 * e,
            "val_acc": 0.18 * e,
        }
        for e in range(1, 5)
    ]
    path = tmp_path / "curves.png"
    plots.plot_curves(history, path)
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] > img.shape[0] > 200  # two panels side by side
    assert (img < 250).any(axis=2).mean() > 0.02  # something drawn, not a blank page
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left


@needs_matplotlib
def test_confusion_cells_are_shaded_by_row_share(tmp_path) -> None:
    confusion = np.array([[9, 1], [0, 10]])
    path = tmp_path / "cm.png"
    plots.plot_confusion(confusion, ["walk", "run"], path, title="t")
    img = cv2.imread(str(path))
    assert img is not None
    # The most saturated blue is on the diagonal: the darkest pixels are bluish, not grey.
    dark = img[img.sum(axis=2) < 250]
    assert len(dark) and (dark[:, 0] > dark[:, 2]).mean() > 0.5
