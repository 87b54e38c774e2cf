"""The training loop: resumable, seeded, with a metrics CSV, plots and a best-by-validation model.

A run folder (``out_dir``) holds:

- ``last.pt``: full resume state (model, optimiser, schedule, position inside the epoch, history),
  written every ``checkpoint_minutes`` and at every epoch end;
- ``best.safetensors``: the model with the best validation accuracy so far (a normal streamdet
  checkpoint: classes and preprocessing inside);
- ``metrics.csv``, ``curves.png``, ``confusion.png`` (latest epoch), ``confusion_best.png``.

Restarting the same command resumes from ``last.pt`` (or from ``compact_state`` when the run
folder is gone), continuing the same data order and learning-rate schedule.

Example:
    >>> from streamdet.training.config import TrainConfig
    >>> cfg = TrainConfig.model_validate({"out_dir": "/tmp/doc_run", "epochs": 1, "batch_size": 2,
    ...     "num_workers": 0, "model": {"width": 0.0625},
    ...     "data": {"clips_per_epoch": 2, "val_clips": 2}})
    >>> result = train(cfg, resume=None, progress=False)
    >>> result.epochs_done
    1
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from streamdet.data import synthetic
from streamdet.data.datasets import (
    Augment,
    ResumableSampler,
    SyntheticClips,
    VideoFolderClips,
    curriculum,
    scan_folder,
)
from streamdet.device import Amp, select_device
from streamdet.errors import ConfigError, StreamdetError, WeightsError
from streamdet.models.c3d import C3D_BN
from streamdet.models.weights import import_sports1m, save_checkpoint
from streamdet.preprocess import DEFAULT_CONTRACT
from streamdet.training import plots
from streamdet.training.config import TrainConfig

STATE_FORMAT = "streamdet-train-state/1"
METRIC_FIELDS = (
    "epoch",
    "step",
    "clips_seen",
    "lr",
    "difficulty",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "elapsed_s",
    "clips_per_s",
)


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    steps: int
    best_acc: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class EvalResult:
    """Clip classification results on one data set."""

    loss: float
    accuracy: float
    confusion: np.ndarray  # (true, predicted) counts
    class_names: tuple[str, ...]

    @property
    def per_class_accuracy(self) -> dict[str, float]:
        totals = self.confusion.sum(axis=1)
        return {
            name: (float(self.confusion[i, i] / totals[i]) if totals[i] else float("nan"))
            for i, name in enumerate(self.class_names)
        }


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == Amp.OFF:
        return None
    if amp == Amp.FP16:
        return torch.float16
    if amp == Amp.BF16:
        return torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _worker_init(_: int) -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    class_names: tuple[str, ...],
    *,
    device: torch.device | None = None,
    amp: torch.dtype | None = None,
) -> EvalResult:
    """Top-1 accuracy, mean loss and confusion matrix of ``model`` over ``batches``."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    n = len(class_names)
    confusion = np.zeros((n, n), np.int64)
    loss_sum, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1)
        np.add.at(confusion, (y.cpu().numpy(), pred.cpu().numpy()), 1)
        count += int(y.numel())
    model.train(was_training)
    acc = float(np.trace(confusion) / count) if count else float("nan")
    return EvalResult(loss_sum / max(count, 1), acc, confusion, tuple(class_names))


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class _Data:
    class_names: tuple[str, ...]
    steps_per_epoch: int
    train_for_epoch: Callable[[int], Dataset]
    shuffle: bool
    val: Dataset | None
    difficulty: Callable[[int], float]


def build_data(cfg: TrainConfig) -> _Data:
    d = cfg.data
    if d.kind == "synthetic":
        names = synthetic.CLASSES
    else:
        assert d.root is not None
        names_list, train_items, val_items = scan_folder(
            d.root,
            classes=d.classes,
            train_list=d.train_list,
            val_list=d.val_list,
            val_fraction=d.val_fraction,
            seed=cfg.seed,
            extensions=d.extensions,
        )
        names = tuple(names_list)
    unknown = [c for c in cfg.augment.no_flip_classes if c not in names]
    if unknown:
        raise ConfigError(
            f"augment.no_flip_classes: {unknown} are not classes of this data ({list(names)})"
        )
    augment = Augment(
        hflip=cfg.augment.hflip,
        no_flip=frozenset(names.index(c) for c in cfg.augment.no_flip_classes),
        brightness=cfg.augment.brightness,
        contrast=cfg.augment.contrast,
    )
    if d.kind == "synthetic":
        cur = curriculum(d.clips_per_epoch, d.difficulty_start, d.difficulty, d.curriculum_epochs)

        def train_for_epoch(epoch: int) -> Dataset:
            return SyntheticClips(
                d.seed,
                d.clips_per_epoch,
                start=epoch * d.clips_per_epoch,
                difficulty=cur,
                background_videos=d.background_videos,
                augment=augment,
            )

        val: Dataset | None = SyntheticClips(
            d.val_seed, d.val_clips, difficulty=d.difficulty, background_videos=d.background_videos
        )
        n_train = d.clips_per_epoch
        return _Data(
            names,
            max(1, n_train // cfg.batch_size),
            train_for_epoch,
            False,
            val,
            lambda epoch: cur(epoch * d.clips_per_epoch),
        )

    folder_train = VideoFolderClips(
        train_items,
        names,
        train=True,
        clips_per_video=d.clips_per_video,
        seed=cfg.seed,
        augment=augment,
    )

    def folder_for_epoch(epoch: int) -> Dataset:
        folder_train.epoch = epoch
        return folder_train

    val = VideoFolderClips(val_items, names) if val_items else None
    return _Data(
        names,
        max(1, len(folder_train) // cfg.batch_size),
        folder_for_epoch,
        True,
        val,
        lambda epoch: float("nan"),
    )


# --------------------------------------------------------------------------------------------
# State


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    o = cfg.optim
    total = cfg.epochs * steps_per_epoch
    warmup = int(o.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "step":
            return o.gamma ** (step // (o.step_epochs * steps_per_epoch))
        u = min(1.0, (step - warmup) / max(1, total - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * u))

    return factor


def build_model(cfg: TrainConfig, num_classes: int) -> C3D_BN:
    torch.manual_seed(cfg.seed)
    if cfg.model.sports1m:
        model = import_sports1m(cfg.model.sports1m, num_classes=num_classes, seed=cfg.seed)
        if cfg.model.dropout:
            model.dropout = nn.Dropout(cfg.model.dropout)
        return model
    return C3D_BN(num_classes=num_classes, width=cfg.model.width, dropout=cfg.model.dropout)


def _build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and BN
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=o.lr)


def _compact_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    out = {"param_groups": state["param_groups"], "state": {}}
    for k, v in state["state"].items():
        out["state"][k] = {
            name: (
                t.to(torch.bfloat16)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim > 0
                else t
            )
            for name, t in v.items()
        }
    return out


def _atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` whole or not at all; StreamdetError when it cannot (a full disk)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)  # RuntimeError from its zip writer when the file cannot be written
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a partial file: the last good checkpoint stays
        reason = (
            exc.strerror
            if isinstance(exc, OSError) and exc.strerror
            else " ".join(str(exc).split())[:200]
        )
        raise StreamdetError(f"{path}: cannot save ({reason})") from exc


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a resume file (``last.pt`` or a compact state) safely (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: resume file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: unreadable resume file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise WeightsError(f"{path}: not a streamdet training state (format {STATE_FORMAT!r})")
    return state


def _check_compatible(
    state: dict[str, Any], cfg: TrainConfig, names: tuple[str, ...], path: Path
) -> None:
    old = state["config"]
    problems = []
    if tuple(state["class_names"]) != names:
        problems.append(f"classes {state['class_names']} != {list(names)}")
    if old["model"]["width"] != cfg.model.width:
        problems.append(f"model.width {old['model']['width']} != {cfg.model.width}")
    if old["batch_size"] != cfg.batch_size:
        problems.append(f"batch_size {old['batch_size']} != {cfg.batch_size}")
    if (
        old["data"]["kind"] != cfg.data.kind
        or old["data"]["clips_per_epoch"] != cfg.data.clips_per_epoch
    ):
        problems.append("data.kind or data.clips_per_epoch changed")
    if problems:
        raise ConfigError(f"{path}: cannot resume with this config: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """Training progress: a tqdm bar per epoch on a terminal; a plain line every ``every_s``
    seconds otherwise, since a redirected bar fills logs with carriage returns."""

    def __init__(self, enabled: bool, stream: Any = None, every_s: float = 30.0) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self._last = -math.inf  # the first update is always shown
        self._bar: tqdm | None = None
        self._epoch = -1

    def update(
        self,
        epoch: int,
        epochs: int,
        batch: int,
        batches: int,
        loss: float,
        acc: float,
        rate: float,
    ) -> None:
        if not self.enabled:
            return
        stats = f"loss {loss:.3f} acc {acc:.3f} {rate:.1f} clips/s"
        if self.tty:
            self._update_bar(epoch, epochs, batch, batches, stats)
            return
        now = time.monotonic()
        if now - self._last < self.every_s and batch < batches:
            return
        self._last = now
        self.stream.write(f"epoch {epoch + 1}/{epochs} {batch}/{batches} {stats}\n")
        self.stream.flush()

    def _update_bar(self, epoch: int, epochs: int, batch: int, batches: int, stats: str) -> None:
        if self._bar is None or epoch != self._epoch:
            self.close()
            # A resumed epoch starts part way: the bar starts where the batches left off.
            self._bar = tqdm(
                total=batches,
                initial=batch - 1,
                file=self.stream,
                unit="batch",
                desc=f"epoch {epoch + 1}/{epochs}",
                dynamic_ncols=True,
                leave=True,
            )
            self._epoch = epoch
        self._bar.set_postfix_str(stats, refresh=False)
        self._bar.update(batch - self._bar.n)
        if batch >= batches:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _write_metrics(history: list[dict[str, float]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Training


def train(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike[str] | None = "auto",
    max_steps: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    stop_event: threading.Event | None = None,
) -> TrainResult:
    """Train (or continue training) the run described by ``cfg``.

    Args:
        cfg: the run.
        resume: ``"auto"`` continues ``out_dir/last.pt`` (or ``cfg.compact_state``) when present;
            a path resumes from that file; ``None`` starts afresh.
        max_steps: stop (with a checkpoint) after this many optimiser steps in this call.
        max_minutes: stop (with a checkpoint) after this much wall time in this call.
        progress: show the progress bar / progress lines.
        log: where one-line messages go.
        stop_event: set it (or send SIGTERM/SIGINT in the main thread) to stop with a checkpoint.

    Raises:
        ConfigError: bad data folder, config that does not fit the resume state, no CUDA.
        WeightsError: unreadable resume file or Sports-1M weights.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    amp = autocast_dtype(cfg.amp, device)
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out_dir {out}: cannot create it ({exc.strerror or exc})") from exc
    data = build_data(cfg)
    names = data.class_names
    model = build_model(cfg, len(names)).to(device)
    optimizer = _build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, data.steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    epoch, batch_done, step = 0, 0, 0
    best_acc, best_epoch, elapsed = -1.0, -1, 0.0
    history: list[dict[str, float]] = []
    resume_path: Path | None = None
    if resume == "auto":
        for candidate in (out / "last.pt", Path(cfg.compact_state) if cfg.compact_state else None):
            if candidate is not None and candidate.is_file():
                resume_path = candidate
                break
    elif resume is not None:
        resume_path = Path(resume)
    if resume_path is not None:
        state = load_state(resume_path)
        _check_compatible(state, cfg, names, resume_path)
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
        )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        epoch, batch_done, step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        best_acc, best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        elapsed = float(state.get("elapsed_s", 0.0))
        history = list(state.get("history", []))
        log(
            f"resumed from {resume_path}: epoch {epoch + 1}, batch {batch_done}, step {step}, best val acc {best_acc:.3f}"
        )

    def snapshot(compact: bool = False) -> dict[str, Any]:
        model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        opt_state = optimizer.state_dict()
        if compact:
            opt_state = _compact_optimizer_state(opt_state)
        return {
            "format": STATE_FORMAT,
            "config": cfg.model_dump(mode="json"),
            "class_names": list(names),
            "epoch": epoch,
            "batch": batch_done,
            "step": step,
            "model": model_state,
            "optimizer": opt_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "torch_rng": torch.get_rng_state(),
            "best_acc": best_acc,
            "best_epoch": best_epoch,
            "elapsed_s": elapsed + (time.monotonic() - t_start),
            "history": history,
        }

    stop = stop_event or threading.Event()
    previous_handlers: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[sig] = signal.signal(sig, lambda *_: stop.set())

    bar = _Progress(progress)
    t_start = time.monotonic()
    last_ckpt = t_start
    steps_this_call = 0
    stopped = False
    loader_kwargs: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "worker_init_fn": _worker_init if cfg.num_workers else None,
        "pin_memory": device.type == "cuda",
    }
    if cfg.num_workers:
        loader_kwargs["prefetch_factor"] = 4
    try:
        model.train()
        while epoch < cfg.epochs and not stopped:
            dataset = data.train_for_epoch(epoch)
            sampler = ResumableSampler(
                len(dataset),  # type: ignore[arg-type]  # a map-style dataset has a length
                shuffle=data.shuffle,
                seed=cfg.seed,
                epoch=epoch,
                skip=batch_done * cfg.batch_size,
            )
            loader = DataLoader(dataset, sampler=sampler, drop_last=True, **loader_kwargs)
            loss_sum, correct, seen = 0.0, 0, 0
            t_epoch = time.monotonic()
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    logits = model(x)
                loss = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                steps_this_call += 1
                batch_done += 1
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                rate = seen / max(time.monotonic() - t_epoch, 1e-6)
                bar.update(
                    epoch,
                    cfg.epochs,
                    batch_done,
                    data.steps_per_epoch,
                    loss_sum / seen,
                    correct / seen,
                    rate,
                )
                now = time.monotonic()
                out_of_time = max_minutes is not None and now - t_start >= max_minutes * 60
                if (
                    (max_steps is not None and steps_this_call >= max_steps)
                    or out_of_time
                    or stop.is_set()
                ):
                    stopped = True
                    break
                if now - last_ckpt >= cfg.checkpoint_minutes * 60:
                    _atomic_save(snapshot(), out / "last.pt")
                    last_ckpt = now
            if stopped and batch_done < data.steps_per_epoch:
                break
            # ---- epoch end: validate, record, checkpoint
            row: dict[str, float] = {
                "epoch": epoch + 1,
                "step": step,
                "clips_seen": step * cfg.batch_size,
                "lr": optimizer.param_groups[0]["lr"],
                "difficulty": data.difficulty(epoch),
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "val_loss": float("nan"),
                "val_acc": float("nan"),
                "elapsed_s": elapsed + (time.monotonic() - t_start),
                "clips_per_s": seen / max(time.monotonic() - t_epoch, 1e-6),
            }
            result = None
            if data.val is not None:
                val_loader = DataLoader(data.val, shuffle=False, **loader_kwargs)
                result = evaluate(model, val_loader, names, device=device, amp=amp)
                row["val_loss"], row["val_acc"] = result.loss, result.accuracy
            history.append(row)
            score = row["val_acc"] if result is not None else row["train_acc"]
            improved = score > best_acc
            if improved:
                best_acc, best_epoch = score, epoch + 1
                save_checkpoint(
                    out / "best.safetensors",
                    model,
                    class_names=names,
                    contract=DEFAULT_CONTRACT,
                    extra={"run": cfg.name, "epoch": epoch + 1, "step": step, "val_acc": score},
                )
            epoch += 1
            batch_done = 0
            _write_metrics(history, out / "metrics.csv")
            with contextlib.suppress(Exception):  # plots are a convenience: never stop training
                if not plots.AVAILABLE:
                    raise ImportError(plots.INSTALL_HINT)
                plots.plot_curves(history, out / "curves.png")
                if result is not None:
                    plots.plot_confusion(
                        result.confusion, names, out / "confusion.png", title=f"epoch {epoch}"
                    )
                    if improved:
                        plots.plot_confusion(
                            result.confusion,
                            names,
                            out / "confusion_best.png",
                            title=f"best: epoch {epoch}",
                        )
            _atomic_save(snapshot(), out / "last.pt")
            if cfg.compact_state:
                _atomic_save(snapshot(compact=True), Path(cfg.compact_state))
            last_ckpt = time.monotonic()
            log(
                f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}, "
                f"val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f} (best {best_acc:.3f} at epoch {best_epoch})"
            )
        if stopped:
            _atomic_save(snapshot(), out / "last.pt")
            log(f"stopped at epoch {epoch + 1}, batch {batch_done}; state in {out / 'last.pt'}")
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return TrainResult(out, epoch, step, best_acc, best_epoch, history, stopped)
