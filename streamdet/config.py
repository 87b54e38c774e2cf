"""Configuration: pydantic models mirroring the YAML tree.

Every model forbids unknown keys, so a typo is an error naming the key. ``${ENV_VAR}`` in any
string is replaced from the environment, so passwords stay out of config files.

Example:
    >>> cfg = load_config(None, {"sources": [{"name": "cam", "url": "0"}]})
    >>> cfg.window.length, cfg.sources[0].url
    (16, '0')
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streamdet.errors import ConfigError

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


_NUMBER_TYPES = (int, float, int | None, float | None)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `max_batch: yes` would silently mean 1.
        if isinstance(value, bool) and info.field_name is not None:
            if cls.model_fields[info.field_name].annotation in _NUMBER_TYPES:
                raise ValueError(f"Input should be a number, not a boolean ({str(value).lower()})")
        return value


class SourceOptions(_Model):
    """How a source is opened and watched."""

    open_timeout_s: float = Field(10.0, gt=0, le=300, description="Give up opening a stream after this long.")
    read_timeout_s: float = Field(5.0, gt=0, le=300, description="A single read blocking longer than this is a stall.")
    stall_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="No new frame for this long: the watchdog reopens the source."
    )
    reconnect: bool = Field(True, description="Reopen a lost stream (cameras and URLs) with backoff.")
    backoff_initial_s: float = Field(0.5, gt=0, le=60, description="First reconnect delay.")
    backoff_max_s: float = Field(30.0, gt=0, le=3600, description="Reconnect delay cap.")
    fps: float | None = Field(
        None, gt=0, le=1000, description="Override the frame rate reported by the source (used for pacing)."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> SourceOptions:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("backoff_initial_s must be <= backoff_max_s")
        return self


class SourceConfig(_Model):
    """One video source."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$", description="Unique name.")
    url: str = Field(
        ..., min_length=1, description="Camera index (0), video file path, or rtsp:// / http(s):// URL."
    )
    realtime: bool | None = Field(
        None,
        description=(
            "Files only: true paces frames at the file's fps like a camera (frames may be skipped "
            "when inference lags); false reads as fast as possible and skips nothing. Default false."
        ),
    )
    options: SourceOptions = Field(default_factory=SourceOptions, description="Opening and watchdog settings.")

    @field_validator("url", mode="before")
    @classmethod
    def _url_as_text(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("url must be a camera index, a file path or a URL, not a boolean")
        return str(value) if isinstance(value, int) else value


class ModelConfig(_Model):
    """The classifier."""

    arch: Literal["c3d_bn"] = Field("c3d_bn", description="Network architecture.")
    width: float = Field(1.0, gt=0, le=4, description="Channel multiplier (1.0 = published C3D).")
    num_classes: int = Field(8, ge=1, le=100_000, description="Output classes (used without weights).")
    weights: str | None = Field(None, description="Checkpoint (.safetensors, or a plain .pt state dict).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="Numeric path; auto picks the fastest one checked against fp32."
    )
    max_batch: int = Field(8, ge=1, le=1024, description="Most windows run in one forward pass (CUDA; a CPU runs one at a time).")
    threads: int | None = Field(
        None, ge=1, le=512, description="Torch intra-op threads in all (null: one per core)."
    )
    workers: int | None = Field(
        None, ge=1, le=512,
        description="Inference workers: threads running forward passes side by side, sharing the torch threads "
        "(null: on a CPU, one per source up to one per thread, and one per thread for a file replayed as fast as "
        "possible; one on CUDA or with compile).",
    )
    compile: bool = Field(False, description="torch.compile the model: faster, but tens of seconds to start "
                          "(a few minutes on CUDA; cached after).")
    cuda_graphs: bool = Field(
        False,
        description="CUDA: replay CUDA graphs for batches of 1, 2, 4, ... up to max_batch (fewer kernel "
        "launches: 1.8x at batch 1 on an H100). Ignored on a CPU.",
    )
    calibration: str | None = Field(
        None,
        description=(
            "Video file whose first windows check reduced precision against fp32 and calibrate int8 "
            "(default: the first file source, else random clips)."
        ),
    )

    @model_validator(mode="after")
    def _workers_need_a_concurrent_engine(self) -> ModelConfig:
        if self.workers is not None and self.workers > 1 and self.compile:
            raise ValueError(f"workers: {self.workers} workers cannot share a torch.compile'd model "
                             "(compile: true): set workers to 1 or null")
        return self


class WindowConfig(_Model):
    """Sliding windows over each source's frames."""

    length: Literal[16] = Field(16, description="Frames per window (C3D takes 16).")
    stride: int = Field(8, ge=1, le=256, description="A new window every `stride` sampled frames.")


class ClassEventConfig(_Model):
    """Per-class override of the event thresholds."""

    threshold: float | None = Field(None, ge=0, le=1, description="Enter threshold for this class.")
    exit_threshold: float | None = Field(None, ge=0, le=1, description="Exit threshold for this class.")


class EventsConfig(_Model):
    """Turning window scores into events."""

    threshold: float = Field(0.6, ge=0, le=1, description="Smoothed score that opens an event.")
    exit_threshold: float = Field(0.4, ge=0, le=1, description="Smoothed score below which it ends.")
    smoothing: int = Field(3, ge=1, le=100, description="Moving average over this many windows.")
    open_windows: int = Field(2, ge=1, le=100, description="Consecutive windows above threshold to open.")
    min_duration_s: float = Field(0.0, ge=0, le=3600, description="Shorter events are never reported.")
    background: str | None = Field("none", description="Class that never makes events (null: none).")
    update_min_delta: float = Field(0.05, ge=0, le=1, description="Peak rise that triggers an update line.")
    update_min_interval_s: float = Field(1.0, ge=0, le=3600, description="Least time between update lines.")
    classes: dict[str, ClassEventConfig] = Field(default_factory=dict, description="Per-class overrides.")

    @model_validator(mode="after")
    def _hysteresis(self) -> EventsConfig:
        if self.exit_threshold > self.threshold:
            raise ValueError(f"exit_threshold ({self.exit_threshold}) must be <= threshold ({self.threshold})")
        for label, rule in self.classes.items():
            enter = rule.threshold if rule.threshold is not None else self.threshold
            exit_ = rule.exit_threshold if rule.exit_threshold is not None else self.exit_threshold
            if exit_ > enter:
                raise ValueError(f"classes.{label}: exit_threshold ({exit_}) must be <= threshold ({enter})")
        return self


class EventLogConfig(_Model):
    """The JSONL event log."""

    path: str | None = Field("events.jsonl", description="JSONL file (null: no log).")
    rotate_mb: float | None = Field(None, gt=0, le=1_000_000, description="Rotate past this size (MB).")


class OverlayConfig(_Model):
    """Annotated frames."""

    video: str | None = Field(None, description="Write an annotated video file here.")
    display: bool = Field(False, description="Show a window (needs a screen).")
    top_k: int = Field(3, ge=1, le=20, description="Classes drawn with score bars.")


class SinksConfig(_Model):
    """Where results go."""

    events: EventLogConfig = Field(default_factory=EventLogConfig, description="Event log.")
    overlay: OverlayConfig = Field(default_factory=OverlayConfig, description="Annotated output.")


class RunConfig(_Model):
    """Top level of a streamdet YAML file."""

    sources: list[SourceConfig] = Field(default_factory=list, description="Video sources.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Classifier.")
    window: WindowConfig = Field(default_factory=WindowConfig, description="Windowing.")
    events: EventsConfig = Field(default_factory=EventsConfig, description="Event tracker.")
    sinks: SinksConfig = Field(default_factory=SinksConfig, description="Outputs.")
    progress_interval_s: float = Field(5.0, gt=0, le=3600, description="Seconds between progress lines.")
    truth: str | None = Field(
        None, description="Ground-truth events JSON for the first source: event F1 is printed at exit."
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, but {dupes} repeat")
        return sources


def _substitute_env(value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, str):
        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _ENV_PATTERN.sub(repl, value)
    if isinstance(value, Mapping):
        return {k: _substitute_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; every failure is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, but got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Load, merge and validate a run configuration.

    Args:
        path: YAML file, or None for defaults only.
        overrides: nested mapping merged over the file (command-line options).

    Raises:
        ConfigError: listing every problem with its YAML path, e.g. ``sources[0].url: Field required``.
    """
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = _deep_merge(data, overrides)
    where = f"{path}: " if path is not None else ""
    problems: list[str] = []
    data = _substitute_env(data, "", problems)
    if problems:
        raise ConfigError(where + "; ".join(problems))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        details = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            details.append(f"{_format_loc(tuple(err['loc']))}: {msg}")
        raise ConfigError(where + "; ".join(details)) from None
