"""Configuration: pydantic models mirroring the YAML tree.

Every model forbids unknown keys, so a typo is an error naming the key. ``${ENV_VAR}`` in any
string is replaced from the environment, so passwords stay out of config files.

Example:
    >>> cfg = load_config(None, {"sources": [{"name": "cam", "url": "0"}]})
    >>> cfg.window.length, cfg.sources[0].url
    (16, '0')
"""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yaml.composer import ComposerError
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from streamdet.device import Device, Precision
from streamdet.errors import ConfigError

try:
    from yaml.cyaml import CParser  # type: ignore[attr-defined]  # not in the stubs' __all__
except ImportError:  # PyYAML built without libyaml: the pure-Python parser, several times slower
    CParser = None  # type: ignore[assignment,misc]

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Limits on a config file. Real configs are a few kB: 200,000 rtsp sources are 16 MB and a
# million values. The limits end an alias bomb, or a video given as the config, within seconds,
# where they cost minutes and gigabytes.
MAX_CONFIG_BYTES = 32 * 1024 * 1024
MAX_YAML_VALUES = 2_000_000  # keys and values, lists and mappings; an alias counts all it repeats
MAX_YAML_DEPTH = 100  # lists and mappings nested in one another, through aliases too
_MAX_PROBLEMS = 10  # problems listed in one error line; the others are counted
_MAX_ECHO = 80  # characters of a key, value or YAML problem repeated in an error line


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

    open_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Give up opening a stream after this long."
    )
    read_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A single read blocking longer than this is a stall."
    )
    stall_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="No new frame for this long: the watchdog reopens the source.",
    )
    reconnect: bool = Field(
        True, description="Reopen a lost stream (cameras and URLs) with backoff."
    )
    backoff_initial_s: float = Field(0.5, gt=0, le=60, description="First reconnect delay.")
    backoff_max_s: float = Field(30.0, gt=0, le=3600, description="Reconnect delay cap.")
    fps: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Override the frame rate reported by the source (used for pacing).",
    )
    backend: Literal["auto", "pyav", "opencv"] = Field(
        "auto",
        description=(
            "Decoder: pyav (FFmpeg through PyAV: files and network streams, and the encoded "
            "packets event clips are cut from), opencv (webcams), or auto (pyav where it can)."
        ),
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> SourceOptions:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("backoff_initial_s must be <= backoff_max_s")
        return self


class GatingConfig(_Model):
    """Motion gating: a window none of whose new frames (those its source's previous window did
    not hold) shows activity above the source's learnt noise floor, once the last active frame
    is ``hangover_frames`` old, is not scored but taken as background (see
    ``streamdet.gating``)."""

    enabled: bool = Field(False, description="Skip the forward pass of quiet windows.")
    keepalive_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A quiet source is looked at once per this many s, and scored if its scene "
        "drifted from the one last scored.",
    )
    keepalive_max_s: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="A quiet source is scored at least this often, changed or not (null: 10 x "
        "keepalive_s).",
    )
    hangover_frames: int = Field(
        8,
        ge=0,
        le=1000,
        description="Windows are scored until the last active frame is this many frames old "
        "(8: it has reached the centre of a 16-frame window).",
    )
    sensitivity: float = Field(
        1.5, ge=0, le=100, description="Noise floor = median + sensitivity x MAD of the measure."
    )
    local_margin: float = Field(
        0.1, ge=0, le=10, description="Least block change above the floor (normalised units)."
    )
    global_margin: float = Field(
        0.08, ge=0, le=10, description="Least mean frame change above the floor (normalised)."
    )
    lag_frames: int = Field(
        4, ge=1, le=64, description="Each frame is compared with the one this many frames back."
    )

    @model_validator(mode="after")
    def _keepalive_order(self) -> GatingConfig:
        if self.keepalive_max_s is not None and self.keepalive_max_s < self.keepalive_s:
            raise ValueError("keepalive_max_s must be >= keepalive_s")
        return self


class SourceConfig(_Model):
    """One video source."""

    name: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$", description="Unique name."
    )
    url: str = Field(
        ...,
        min_length=1,
        description="Camera index (0), video file path, or rtsp:// / http(s):// URL.",
    )
    realtime: bool | None = Field(
        None,
        description=(
            "Files only: true paces frames at the file's fps like a camera (frames may be skipped "
            "when inference lags); false reads as fast as possible and skips nothing. Default false."
        ),
    )
    options: SourceOptions = Field(
        default_factory=SourceOptions, description="Opening and watchdog settings."
    )
    gating: GatingConfig | None = Field(
        None, description="This source's motion gating, in place of window.gating (null: that)."
    )

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
    num_classes: int = Field(
        8, ge=1, le=100_000, description="Output classes (used without weights)."
    )
    weights: str | None = Field(
        None, description="Checkpoint (.safetensors, or a plain .pt state dict)."
    )
    device: Device = Field(Device.AUTO, description="auto = CUDA when present, else CPU.")
    precision: Precision = Field(
        Precision.AUTO, description="Numeric path; auto picks the fastest one checked against fp32."
    )
    max_batch: int = Field(
        8,
        ge=1,
        le=1024,
        description="Most windows run in one forward pass (CUDA; a CPU runs one at a time).",
    )
    threads: int | None = Field(
        None, ge=1, le=512, description="Torch intra-op threads in all (null: one per core)."
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Inference workers: threads running forward passes side by side, sharing the torch threads "
        "(null: on a CPU, one per source up to one per thread, and one per thread for a file replayed as fast as "
        "possible; one on CUDA or with compile).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model: faster, but tens of seconds to start "
        "(a few minutes on CUDA; cached after).",
    )
    cuda_graphs: bool = Field(
        False,
        description="CUDA: replay CUDA graphs for batches of 1, 2, 4, ... up to max_batch (fewer kernel "
        "launches, which pay off at batch 1; see benchmarks/RESULTS.md, 'GPU: NVIDIA H100'). "
        "Ignored on a CPU.",
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
            raise ValueError(
                f"workers: {self.workers} workers cannot share a torch.compile'd model "
                "(compile: true): set workers to 1 or null"
            )
        return self


class WindowConfig(_Model):
    """Sliding windows over each source's frames."""

    length: Literal[16] = Field(16, description="Frames per window (C3D takes 16).")
    stride: int = Field(8, ge=1, le=256, description="A new window every `stride` sampled frames.")
    gating: GatingConfig = Field(
        default_factory=GatingConfig, description="Motion gating of every source (default off)."
    )


class ClassEventConfig(_Model):
    """Per-class override of the event thresholds."""

    threshold: float | None = Field(None, ge=0, le=1, description="Enter threshold for this class.")
    exit_threshold: float | None = Field(
        None, ge=0, le=1, description="Exit threshold for this class."
    )


class EventsConfig(_Model):
    """Turning window scores into events."""

    threshold: float = Field(0.6, ge=0, le=1, description="Smoothed score that opens an event.")
    exit_threshold: float = Field(
        0.4, ge=0, le=1, description="Smoothed score below which it ends."
    )
    smoothing: int = Field(3, ge=1, le=100, description="Moving average over this many windows.")
    open_windows: int = Field(
        2, ge=1, le=100, description="Consecutive windows above threshold to open."
    )
    min_duration_s: float = Field(
        0.0, ge=0, le=3600, description="Shorter events are never reported."
    )
    background: str | None = Field(
        "none", description="Class that never makes events (null: none)."
    )
    update_min_delta: float = Field(
        0.05, ge=0, le=1, description="Peak rise that triggers an update line."
    )
    update_min_interval_s: float = Field(
        1.0, ge=0, le=3600, description="Least time between update lines."
    )
    classes: dict[str, ClassEventConfig] = Field(
        default_factory=dict, description="Per-class overrides."
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> EventsConfig:
        if self.exit_threshold > self.threshold:
            raise ValueError(
                f"exit_threshold ({self.exit_threshold}) must be <= threshold ({self.threshold})"
            )
        for label, rule in self.classes.items():
            enter = rule.threshold if rule.threshold is not None else self.threshold
            exit_ = rule.exit_threshold if rule.exit_threshold is not None else self.exit_threshold
            if exit_ > enter:
                raise ValueError(
                    f"classes.{_shorten(str(label))}: exit_threshold ({exit_}) "
                    f"must be <= threshold ({enter})"
                )
        return self


class EventLogConfig(_Model):
    """The JSONL event log."""

    path: str | None = Field("events.jsonl", description="JSONL file (null: no log).")
    rotate_mb: float | None = Field(
        None, gt=0, le=1_000_000, description="Rotate past this size (MB)."
    )


class OverlayConfig(_Model):
    """Annotated frames."""

    video: str | None = Field(None, description="Write an annotated video file here.")
    display: bool = Field(False, description="Show a window (needs a screen).")
    top_k: int = Field(3, ge=1, le=20, description="Classes drawn with score bars.")


_MQTT_TOPIC_PART = r"^[^#+/\x00]+(/[^#+/\x00]+)*$"  # levels without wildcards or empty ones


class MqttTlsConfig(_Model):
    """TLS to the broker (the system's CAs when ``ca_certs`` is not given)."""

    ca_certs: str | None = Field(
        None, description="CA bundle (PEM) the broker's cert is checked by."
    )
    certfile: str | None = Field(None, description="Client certificate (PEM), for mutual TLS.")
    keyfile: str | None = Field(None, description="Client key (PEM), with certfile.")
    insecure: bool = Field(
        False,
        description="Skip the check that the broker's cert names host (test setups); its chain "
        "is still checked.",
    )

    @model_validator(mode="after")
    def _key_with_cert(self) -> MqttTlsConfig:
        if self.keyfile and not self.certfile:
            raise ValueError("keyfile needs certfile")
        return self


class MqttConfig(_Model):
    """Events, source status and figures to an MQTT broker (Frigate-style topics)."""

    host: str = Field(..., min_length=1, max_length=253, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    topic_prefix: str = Field(
        "streamdet",
        min_length=1,
        max_length=200,
        pattern=_MQTT_TOPIC_PART,
        description="First level of every topic.",
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="MQTT client id (default streamdet-<hostname>); unique per instance.",
    )
    user: str | None = Field(None, min_length=1, description="Broker user name.")
    password: SecretStr | None = Field(None, description="Broker password (use ${ENV_VAR}).")
    tls: MqttTlsConfig | None = Field(None, description="TLS settings (none: plain TCP).")
    qos: int = Field(1, ge=0, le=2, description="QoS of event and state messages.")
    ha_discovery: bool = Field(True, description="Publish Home Assistant discovery configs.")
    discovery_prefix: str = Field(
        "homeassistant",
        min_length=1,
        max_length=200,
        pattern=_MQTT_TOPIC_PART,
        description="Home Assistant's discovery prefix.",
    )
    stats_interval_s: float = Field(60.0, gt=0, le=86400, description="Seconds between stats.")
    max_queued: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Messages kept while the broker is away (the oldest are dropped first).",
    )

    @model_validator(mode="after")
    def _user_and_password(self) -> MqttConfig:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together: give both or neither")
        return self


WebhookEvent = Literal["new", "update", "end", "clip", "snapshot"]
# Headers a webhook request gets from streamdet (lower case), which a config may not set.
_WEBHOOK_OWN_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        "connection",
    }
)


def _new_and_end() -> list[WebhookEvent]:
    return ["new", "end"]


class WebhookConfig(_Model):
    """One HTTP endpoint that gets event lines, signed as Standard Webhooks say."""

    url: str = Field(..., min_length=1, max_length=2048, description="http:// or https:// URL.")
    events: list[WebhookEvent] = Field(
        default_factory=_new_and_end, min_length=1, description="Line types sent."
    )
    sources: list[str] | None = Field(None, description="Only these sources (default: all).")
    labels: list[str] | None = Field(None, description="Only these labels (default: all).")
    min_score: float = Field(0.0, ge=0, le=1, description="Only events scoring at least this.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    secret: SecretStr | None = Field(
        None, description="Signing secret (whsec_<base64> or any text; use ${ENV_VAR})."
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="Per request.")
    max_attempts: int = Field(6, ge=1, le=100, description="Tries per line, with backoff.")
    max_queued: int = Field(
        1000, ge=1, le=1_000_000, description="Lines waiting for this endpoint (then dropped)."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        from streamdet.redaction import redact_url

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  # raises on a port that is not a number or out of range
        except ValueError:
            raise ValueError(f"not a valid URL: {redact_url(url)}") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host: {redact_url(url)}")
        return url

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        # Values are never echoed: an Authorization header is a secret.
        for name, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{_shorten(name)!r} is not a valid header name")
            if name.lower() in _WEBHOOK_OWN_HEADERS:
                raise ValueError(f"{name!r} is set by streamdet and cannot be given")
            if any(c in value for c in "\r\n\x00"):
                raise ValueError(f"the value of {name!r} holds a line break or NUL")
        return headers

    @field_validator("secret")
    @classmethod
    def _usable_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        # Standard Webhooks serialize a key as whsec_<base64>; other text is the key's bytes.
        if secret is None:
            return None
        text = secret.get_secret_value()
        if not text:
            raise ValueError("is empty (leave it out to send unsigned requests)")
        if text.startswith("whsec_"):
            try:
                key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
            except ValueError:
                key = b""
            if not key:
                raise ValueError("starts with whsec_ but what follows is not base64 of a key")
        return secret


class SinksConfig(_Model):
    """Where results go."""

    events: EventLogConfig = Field(default_factory=EventLogConfig, description="Event log.")
    overlay: OverlayConfig = Field(default_factory=OverlayConfig, description="Annotated output.")
    mqtt: MqttConfig | None = Field(None, description="MQTT broker (none: no MQTT).")
    webhooks: list[WebhookConfig] = Field(default_factory=list, description="HTTP endpoints.")


class ClipsConfig(_Model):
    """A clip per event, stream-copied from the camera's own encoding."""

    enabled: bool = Field(True, description="Write a clip per event.")
    pre_capture_s: float = Field(5.0, ge=0, le=60, description="Seconds before the event.")
    post_capture_s: float = Field(5.0, ge=0, le=300, description="Seconds after the event.")
    max_clip_s: float = Field(120.0, gt=0, le=3600, description="Longest clip.")


class SnapshotsConfig(_Model):
    """A JPEG of each event's best frame."""

    enabled: bool = Field(True, description="Write a snapshot per event.")
    height: int | None = Field(None, ge=16, le=4320, description="Resize to this height.")
    quality: int = Field(80, ge=1, le=100, description="JPEG quality.")
    overlay: bool = Field(False, description="Draw the event's label and score on it.")


class RetainConfig(_Model):
    """How long media is kept."""

    days: float | None = Field(7.0, gt=0, le=36500, description="Delete media older than this.")
    max_gb: float | None = Field(None, gt=0, description="Keep the folder under this size.")


class MediaConfig(_Model):
    """Event clips and snapshots."""

    dir: str = Field("streamdet-out/media", min_length=1, description="Folder for media files.")
    clips: ClipsConfig = Field(default_factory=ClipsConfig, description="Clips.")
    snapshots: SnapshotsConfig = Field(default_factory=SnapshotsConfig, description="Snapshots.")
    retain: RetainConfig = Field(default_factory=RetainConfig, description="Retention.")


class WebConfig(_Model):
    """The live web page, the events API, health checks and Prometheus metrics."""

    host: str = Field("127.0.0.1", min_length=1, description="Address to bind.")
    port: int = Field(8080, ge=0, le=65535, description="Port (0: any free one, printed).")
    token: SecretStr | None = Field(None, description="Bearer token every request must carry.")
    auth: Literal["token", "none"] | None = Field(
        None, description="'none' allows a non-loopback bind without a token."
    )
    public: list[Literal["healthz", "readyz", "metrics"]] = Field(
        default_factory=list, description="Endpoints answered without the token."
    )
    mjpeg_fps: float = Field(5.0, gt=0, le=30, description="Frames per second of live streams.")
    max_clients: int = Field(20, ge=1, le=1000, description="Concurrent live streams.")


class RunConfig(_Model):
    """Top level of a streamdet YAML file."""

    sources: list[SourceConfig] = Field(default_factory=list, description="Video sources.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Classifier.")
    window: WindowConfig = Field(default_factory=WindowConfig, description="Windowing.")
    events: EventsConfig = Field(default_factory=EventsConfig, description="Event tracker.")
    sinks: SinksConfig = Field(default_factory=SinksConfig, description="Outputs.")
    media: MediaConfig | None = Field(None, description="Event clips and snapshots (none: off).")
    web: WebConfig | None = Field(None, description="Web page and HTTP API (none: off).")
    progress_interval_s: float = Field(
        5.0, gt=0, le=3600, description="Seconds between progress lines."
    )
    decode: Literal["cpu", "gpu"] = Field(
        "cpu",
        description=(
            "Where sources are decoded: cpu (FFmpeg; frames preprocessed on the CPU) or gpu "
            "(NVDEC through PyNvVideoCodec; frames stay on the GPU up to the model). gpu without "
            "a CUDA device or PyNvVideoCodec: one warning, then cpu."
        ),
    )
    truth: str | None = Field(
        None,
        description="Ground-truth events JSON for the first source: event F1 is printed at exit.",
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        counts = Counter(s.name for s in sources)  # one pass: list.count per name is quadratic
        dupes = sorted(name for name, count in counts.items() if count > 1)
        if dupes:
            raise ValueError(f"source names must be unique, but {_some(dupes)} repeat")
        return sources

    def gating_of(self, source: SourceConfig) -> GatingConfig:
        """The motion gating ``source`` gets: its own, else ``window.gating``."""
        return source.gating if source.gating is not None else self.window.gating

    @model_validator(mode="after")
    def _gating_needs_a_background(self) -> RunConfig:
        gated = [s.name for s in self.sources if self.gating_of(s).enabled]
        if gated and self.events.background is None:
            raise ValueError(
                f"gating is enabled for {_some(gated)}, but events.background is null: a gated "
                "window is scored as the background class, so name one"
            )
        return self

    @model_validator(mode="after")
    def _webhook_sources_exist(self) -> RunConfig:
        names = {s.name for s in self.sources}
        for i, hook in enumerate(self.sinks.webhooks):
            unknown = sorted(set(hook.sources or ()) - names) if self.sources else []
            if unknown:
                raise ValueError(f"sinks.webhooks[{i}].sources: unknown source(s) {_some(unknown)}")
        return self


def _shorten(text: str, limit: int = _MAX_ECHO) -> str:
    """``text``, cut to ``limit`` characters: a message repeats a key or value, never a megabyte."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _some(items: list[str], limit: int = 5) -> str:
    """``['a', 'b']``, or the first ``limit`` items and how many more."""
    if len(items) <= limit:
        return str(items)
    return f"{items[:limit]} and {len(items) - limit:,} more"


def _two_places(first: Any, second: Any) -> str:
    """``lines 2 and 5``, or ``line 2, columns 3 and 9``, from two YAML marks."""
    if first.line != second.line:
        return f"lines {first.line + 1} and {second.line + 1}"
    return f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"


class _Problems:
    """What is wrong, for one error line: the first few problems in full, the others counted."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.shown) < _MAX_PROBLEMS:
            self.shown.append(text)

    def __str__(self) -> str:
        more = self.count - len(self.shown)
        return "; ".join(self.shown) + (f"; and {more:,} more" if more else "")


class _YamlRuleError(Exception):
    """Well-formed YAML that a config may not hold (over a limit, or a key given twice)."""


_STR_TAG = "tag:yaml.org,2002:str"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Anchor(NamedTuple):
    node: Node
    values: int  # values the node holds, its aliases expanded
    height: int  # lists and mappings nested in it, itself included (0 for a scalar)


class _BoundedComposer:
    """Builds YAML nodes from parser events, like ``yaml.composer.Composer``, within limits.

    It counts every value as it comes, an alias as all the values it repeats, so an alias bomb
    ends at MAX_YAML_VALUES before anything is expanded (``yaml.safe_load`` shares aliased
    objects, but everything after it copies them: 10**9 strings). It refuses a list or mapping
    nested deeper than MAX_YAML_DEPTH before recursing into it (libyaml's composer crashes the
    process at 100,000 levels, PyYAML's raises RecursionError at 500), an alias inside its own
    anchor, and a key given twice in one mapping, of which YAML loaders silently keep the last.
    The parser and the resolver it is mixed with provide ``get_event``, ``check_event`` and
    ``resolve``.
    """

    get_event: Any
    check_event: Any
    resolve: Any
    construct_object: Any

    def compose_single_document(self) -> Node | None:
        """The document's root node, or None for an empty stream."""
        self._values = 0
        self._anchors: dict[str, _Anchor | None] = {}  # None while its node is being composed
        self.get_event()  # StreamStartEvent
        node = None
        if not self.check_event(StreamEndEvent):
            self.get_event()  # DocumentStartEvent
            node = self._compose(self.get_event(), 1)[0]
            self.get_event()  # DocumentEndEvent
        if not self.check_event(StreamEndEvent):
            raise ComposerError(
                None,
                None,
                "expected a single document, but found another",
                self.get_event().start_mark,
            )
        return node

    def _compose(self, event: Any, depth: int) -> tuple[Node, int]:
        """The node that starts with ``event`` at nesting ``depth``, and its height."""
        if isinstance(event, AliasEvent):
            return self._alias(event, depth)
        anchor = event.anchor
        if anchor is not None:
            if anchor in self._anchors:
                raise ComposerError(
                    None, None, f"found a second anchor {_shorten(anchor)!r}", event.start_mark
                )
            self._anchors[anchor] = None
        before = self._values
        self._count(1, event)
        if isinstance(event, ScalarEvent):
            # libyaml's marks are a type of their own with the fields of PyYAML's
            node: Node = ScalarNode(
                self._tag(ScalarNode, event, event.value),
                event.value,
                event.start_mark,  # type: ignore[arg-type]
                event.end_mark,  # type: ignore[arg-type]
                style=event.style,
            )
            height = 0
        elif isinstance(event, SequenceStartEvent):
            node, height = self._sequence(event, depth)
        else:
            node, height = self._mapping(event, depth)
        if anchor is not None:
            self._anchors[anchor] = _Anchor(node, self._values - before, height)
        return node, height

    def _sequence(self, start: Any, depth: int) -> tuple[Node, int]:
        self._check_depth(depth, start)
        node = SequenceNode(
            self._tag(SequenceNode, start, None),
            [],
            start.start_mark,
            None,
            flow_style=start.flow_style,
        )
        height = 0
        while not isinstance(event := self.get_event(), SequenceEndEvent):
            item, item_height = self._compose(event, depth + 1)
            node.value.append(item)
            height = max(height, item_height)
        node.end_mark = event.end_mark
        return node, height + 1

    def _mapping(self, start: Any, depth: int) -> tuple[Node, int]:
        self._check_depth(depth, start)
        node = MappingNode(
            self._tag(MappingNode, start, None),
            [],
            start.start_mark,
            None,
            flow_style=start.flow_style,
        )
        height = 0
        seen: dict[tuple[str, str], Any] = {}  # (tag, text) of each scalar key -> its first mark
        while not isinstance(event := self.get_event(), MappingEndEvent):
            key, key_height = self._compose(event, depth + 1)
            if isinstance(key, ScalarNode):
                first = seen.setdefault((key.tag, key.value), event.start_mark)
                if first is not event.start_mark:
                    raise _YamlRuleError(
                        f"duplicate key {_shorten(key.value)!r} at "
                        f"{_two_places(first, event.start_mark)}"
                    )
            value, value_height = self._compose(self.get_event(), depth + 1)
            node.value.append((key, value))
            height = max(height, key_height, value_height)
        node.end_mark = event.end_mark
        return node, height + 1

    def _alias(self, event: Any, depth: int) -> tuple[Node, int]:
        if event.anchor not in self._anchors:
            raise ComposerError(
                None, None, f"found undefined alias {_shorten(event.anchor)!r}", event.start_mark
            )
        anchor = self._anchors[event.anchor]
        if anchor is None:
            raise ComposerError(
                None,
                None,
                f"alias {_shorten(event.anchor)!r} is inside its own "
                "anchor (recursive aliases are not supported)",
                event.start_mark,
            )
        self._count(anchor.values, event)
        if anchor.height:
            self._check_depth(depth + anchor.height - 1, event)
        return anchor.node, anchor.height

    def _tag(self, kind: type[Node], event: Any, value: str | None) -> str:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.resolve(kind, value, event.implicit)
        return str(tag)

    def _count(self, values: int, event: Any) -> None:
        self._values += values
        if self._values > MAX_YAML_VALUES:
            raise _YamlRuleError(
                f"more than {MAX_YAML_VALUES:,} values by line "
                f"{event.start_mark.line + 1}, counting each alias as all the "
                "values it repeats (an alias bomb?)"
            )

    def _check_depth(self, depth: int, event: Any) -> None:
        if depth > MAX_YAML_DEPTH:
            raise _YamlRuleError(
                f"lists and mappings nested more than {MAX_YAML_DEPTH} deep at "
                f"line {event.start_mark.line + 1}"
            )

    def construct_value(self, node: Node) -> Any:
        """``node`` as ``yaml.safe_load`` makes it, recursing at most MAX_YAML_DEPTH deep.

        Strings, lists and mappings of scalar keys are made here, several times faster than by
        SafeConstructor's general path, which dispatches and checks per node; everything
        else (numbers, booleans, timestamps, merge keys ``<<``) by SafeConstructor. An aliased
        node is made each time it is used, as the steps after loading would copy it anyway.
        """
        if node.tag == _STR_TAG:
            return node.value
        if node.tag == _SEQ_TAG:
            return [self.construct_value(item) for item in node.value]
        if node.tag == _MAP_TAG and all(
            isinstance(key, ScalarNode) and key.tag != _MERGE_TAG for key, _ in node.value
        ):
            return {
                self.construct_value(key): self.construct_value(value) for key, value in node.value
            }
        return self.construct_object(node, deep=True)


class _PyLoader(_BoundedComposer, Reader, Scanner, Parser, SafeConstructor, Resolver):
    """The bounded loader on PyYAML's pure-Python parser."""

    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)


_LOADER: Any = _PyLoader

if CParser is not None:

    class _CLoader(_BoundedComposer, CParser, SafeConstructor, Resolver):
        """The bounded loader on libyaml's parser: large configs compose several times faster."""

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _LOADER = _CLoader


def _parse_yaml(text: str) -> Any:
    """The single YAML document in ``text`` as Python objects, ``yaml.safe_load``'s types."""
    loader = _LOADER(text)
    try:
        node = loader.compose_single_document()
        return None if node is None else loader.construct_value(node)
    finally:
        loader.dispose()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a config is built.

    Loading makes millions of objects that live on, and each full collection walks them all, so
    a large config loads in about half the CPU time without it. Nothing built here is a cycle to
    collect.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _substitute_env(value: Any, path: str, problems: _Problems) -> Any:
    if isinstance(value, str):
        if "${" not in value:
            return value

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                problems.add(f"{path}: environment variable {_shorten(name)} is not set")
                return ""
            return os.environ[name]

        return _ENV_PATTERN.sub(repl, value)
    if isinstance(value, Mapping):
        prefix = f"{path}." if path else ""
        return {
            k: _substitute_env(v, prefix + _shorten(str(k)), problems) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{_shorten(str(part))}" if out else _shorten(str(part))
    return out or "<root>"


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_text(path: Path) -> str:
    """The file's text, at most MAX_CONFIG_BYTES of it; every failure is a ConfigError."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file too large: over {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__})") from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; every failure is a ConfigError naming the file.

    Raises:
        ConfigError: also for a key given twice in one mapping, and past MAX_CONFIG_BYTES,
            MAX_YAML_VALUES or MAX_YAML_DEPTH.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        data = _parse_yaml(text)
    except _YamlRuleError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _shorten(getattr(exc, "problem", None) or "invalid YAML", 2 * _MAX_ECHO)
        if "maximum nesting depth" in problem and mark:
            # PyYAML >= 6.0.4's parser has a depth limit of its own, above ours, that it can
            # reach reading ahead in a flow collection before our composer sees the depth.
            raise ConfigError(
                f"{path}: lists and mappings nested more than {MAX_YAML_DEPTH} deep at "
                f"line {mark.line + 1}"
            ) from None
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, but got {type(data).__name__}"
        )
    return data


def _resolve_input_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative input paths of a config file's ``data`` relative to ``folder`` (the
    file's), in place: file sources (``file://`` dropped), ``model.weights``,
    ``model.calibration``, ``truth`` and the MQTT TLS files; ``~`` is expanded. A value of another type is left for
    validation to report."""
    from streamdet.sources.opening import SourceKind, source_kind  # cv2: only to read a file

    def resolve(path: str) -> str:
        found = Path(path).expanduser()
        return str(found if found.is_absolute() else folder / found)

    sources = data.get("sources")
    for source in sources if isinstance(sources, list) else ():
        url = source.get("url") if isinstance(source, dict) else None
        if isinstance(url, str) and url and source_kind(url) is SourceKind.FILE:
            source["url"] = resolve(url.removeprefix("file://"))
    model = data.get("model")
    if isinstance(model, dict):
        for key in ("weights", "calibration"):
            if isinstance(model.get(key), str) and model[key]:
                model[key] = resolve(model[key])
    if isinstance(data.get("truth"), str) and data["truth"]:
        data["truth"] = resolve(data["truth"])
    sinks = data.get("sinks")
    mqtt = sinks.get("mqtt") if isinstance(sinks, dict) else None
    tls = mqtt.get("tls") if isinstance(mqtt, dict) else None
    if isinstance(tls, dict):
        for key in ("ca_certs", "certfile", "keyfile"):
            if isinstance(tls.get(key), str) and tls[key]:
                tls[key] = resolve(tls[key])


def load_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Load, merge and validate a run configuration.

    Relative input paths in the file (file sources, ``model.weights``, ``model.calibration``,
    ``truth``) are relative to the file's folder: they are resolved as the file is read, before
    ``overrides`` are merged, so that every command sees the same configuration. Paths in
    ``overrides`` stay as given (relative to the current folder). ``${ENV_VAR}`` is replaced
    first, so a variable holding an absolute path stays absolute.

    Args:
        path: YAML file, or None for defaults only.
        overrides: nested mapping merged over the file (command-line options).

    Raises:
        ConfigError: listing the problems with their YAML paths, e.g. ``sources[0].url: Field
            required`` (the first ten, then how many more).
    """
    with _gc_paused():
        return _load_config(path, overrides)


def _load_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None
) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    where = f"{path}: " if path is not None else ""
    problems = _Problems()
    data = _substitute_env(data, "", problems)
    extra = _substitute_env(dict(overrides or {}), "", problems)
    if problems.count:
        raise ConfigError(f"{where}{problems}")
    if path is not None:
        _resolve_input_paths(data, Path(path).resolve().parent)
    data = _deep_merge(data, extra)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False, include_context=False, include_input=False):
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.add(f"{_format_loc(tuple(err['loc']))}: {msg}")
        raise ConfigError(f"{where}{problems}") from None
