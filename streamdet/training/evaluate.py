"""Clip-level evaluation of a checkpoint: top-1, per-class accuracy, confusion matrix.

Example:
    >>> r = evaluate_checkpoint("streamdet/demo/c3d_bn_demo.safetensors", synthetic_clips=16)  # doctest: +SKIP
    >>> r.accuracy  # doctest: +SKIP
    0.9375
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from streamdet.data import synthetic
from streamdet.data.datasets import SyntheticClips, VideoFolderClips, _read_split, scan_folder
from streamdet.device import select_device
from streamdet.errors import ConfigError
from streamdet.models.weights import load_checkpoint
from streamdet.training.trainer import (
    EvalResult,
    _worker_init,
    autocast_dtype,
    evaluate,
)


def evaluate_checkpoint(
    weights: str | os.PathLike[str],
    *,
    folder: str | os.PathLike[str] | None = None,
    split_list: str | os.PathLike[str] | None = None,
    synthetic_clips: int | None = None,
    seed: int = 2_000_003,
    difficulty: float = 1.0,
    background_videos: Sequence[str] = (),
    batch_size: int = 16,
    workers: int = 1,
    threads: int | None = None,
    device: str = "auto",
    amp: str = "off",
) -> EvalResult:
    """Evaluate ``weights`` on a UCF101-style ``folder`` or on held-out synthetic clips.

    Folder videos are evaluated on their centre clip; the checkpoint's class names must be the
    folder's class names (videos of other classes are an error). Synthetic clips use ``seed``,
    which training never uses by default (training 0, validation 1000003).

    Raises:
        ConfigError: neither or both sources, class names that do not fit, a batch size below 1,
            workers below 0 or threads below 1.
        WeightsError: unreadable checkpoint.
        SourceError: a background video that cannot be read.
    """
    if (folder is None) == (synthetic_clips is None):
        raise ConfigError("give exactly one of a folder or a number of synthetic clips")
    for name, value, low in (
        ("batch size", batch_size, 1),
        ("workers", workers, 0),
        ("threads", threads, 1),
    ):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, but got {value}")
    if threads:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(weights)
    names = ckpt.class_names
    dataset: Dataset
    if folder is not None:
        if split_list:
            items = _read_split(Path(split_list), Path(folder), names)
        else:
            found, train_items, val_items = scan_folder(folder, classes=names, val_fraction=0.0)
            items = train_items + val_items
        dataset = VideoFolderClips(items, names, contract=ckpt.contract)
    else:
        if tuple(names) != synthetic.CLASSES:
            raise ConfigError(
                f"{weights}: classes {list(names)} are not the synthetic classes {list(synthetic.CLASSES)}"
            )
        if synthetic_clips is not None and synthetic_clips < 1:
            raise ConfigError(f"synthetic clips must be >= 1, but got {synthetic_clips}")
        dataset = SyntheticClips(
            seed,
            int(synthetic_clips or 0),
            difficulty=difficulty,
            background_videos=background_videos,
            contract=ckpt.contract,
        )
    dev = select_device(device)
    model = ckpt.model.to(dev)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
    )
    return evaluate(model, loader, names, device=dev, amp=autocast_dtype(amp, dev))
