"""Configuration: shipped configs validate; every problem is a ConfigError naming its YAML path."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from streamdet import demo
from streamdet.config import RunConfig, load_config
from streamdet.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sources"),
    [
        (demo.config_path(), ["demo"]),
        ("webcam.yaml", ["webcam"]),
        ("rtsp.yaml", ["entrance", "parking", "loading-dock"]),
    ],
    ids=["demo", "webcam", "rtsp"],
)
def test_shipped_config_validates(
    monkeypatch: pytest.MonkeyPatch, name: str, sources: list[str]
) -> None:
    monkeypatch.setenv("CAM_PASSWORD", "pa55word")
    cfg = load_config(CONFIGS / name)
    assert [s.name for s in cfg.sources] == sources
    assert cfg.events.exit_threshold <= cfg.events.threshold


def test_rtsp_config_takes_the_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAM_PASSWORD", "pa55word")
    cfg = load_config(CONFIGS / "rtsp.yaml")
    assert all(s.url.startswith("rtsp://viewer:pa55word@192.0.2.") for s in cfg.sources)
    assert cfg.events.classes["fall"].threshold == 0.5


def test_rtsp_config_without_cam_password_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAM_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as raised:
        load_config(CONFIGS / "rtsp.yaml")
    message = str(raised.value)
    assert message.startswith(f"{CONFIGS / 'rtsp.yaml'}: ")
    assert "sources[0].url: environment variable CAM_PASSWORD is not set" in message
    assert "sources[2].url" in message


def test_webcam_camera_index_is_read_as_text() -> None:
    assert load_config(CONFIGS / "webcam.yaml").sources[0].url == "0"


# --- valid edge cases --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# only a comment\n", "---\n"],
    ids=["empty", "blank", "comment", "doc-marker"],
)
def test_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == RunConfig()


@pytest.mark.parametrize(
    ("url", "expected"),
    [("0", "0"), ("2", "2"), ("'0'", "0"), ("clip.mp4", "{folder}/clip.mp4")],
    ids=["int-0", "int-2", "quoted-0", "file"],
)
def test_camera_index_may_be_an_integer(tmp_path: Path, url: str, expected: str) -> None:
    cfg = load_config(write(tmp_path, f"sources:\n  - name: cam\n    url: {url}\n"))
    assert cfg.sources[0].url == expected.format(
        folder=tmp_path
    )  # a file: from the config's folder


def test_env_variables_are_substituted_in_every_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_TEST_USER", "alice")
    monkeypatch.setenv("SD_TEST_PASSWORD", "s3cr3t")
    monkeypatch.setenv("SD_TEST_LOGS", "/var/log/sd")
    path = write(
        tmp_path,
        (
            "sources:\n"
            "  - name: cam\n"
            "    url: rtsp://${SD_TEST_USER}:${SD_TEST_PASSWORD}@10.0.0.5/${SD_TEST_USER}\n"
            "sinks:\n"
            "  events:\n"
            "    path: ${SD_TEST_LOGS}/events.jsonl\n"
            "model:\n"
            "  weights: $SD_TEST_USER.safetensors\n"  # no braces: left alone
        ),
    )
    cfg = load_config(path)
    assert cfg.sources[0].url == "rtsp://alice:s3cr3t@10.0.0.5/alice"
    assert cfg.sinks.events.path == "/var/log/sd/events.jsonl"
    assert cfg.model.weights == str(tmp_path / "$SD_TEST_USER.safetensors")


def test_overrides_merge_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  width: 0.5\n  device: cuda\nwindow:\n  stride: 4\n")
    cfg = load_config(path, {"model": {"device": "cpu"}, "sources": [{"name": "cli", "url": "0"}]})
    assert (cfg.model.width, cfg.model.device, cfg.window.stride) == (0.5, "cpu", 4)
    assert [s.name for s in cfg.sources] == ["cli"]
    with pytest.raises(ConfigError, match="model.max_batch"):
        load_config(path, {"model": {"max_batch": 0}})


# --- invalid configs ---------------------------------------------------------------------------

# id -> (YAML text, fragments the message must contain)
INVALID: dict[str, tuple[str, list[str]]] = {
    "missing-url": ("sources:\n  - name: cam\n", ["sources[0].url: Field required"]),
    "missing-name": ("sources:\n  - url: '0'\n", ["sources[0].name: Field required"]),
    "unknown-top-level-key": ("sourcez: []\n", ["sourcez: unknown key"]),
    "unknown-nested-key": ("model:\n  widht: 0.5\n", ["model.widht: unknown key"]),
    "unknown-source-option": (
        "sources:\n  - name: a\n    url: x.mp4\n    options:\n      retries: 3\n",
        ["sources[0].options.retries: unknown key"],
    ),
    "wrong-type-number": (
        "model:\n  width: wide\n",
        ["model.width: Input should be a valid number"],
    ),
    "wrong-type-bool-as-number": ("model:\n  max_batch: yes\n", ["model.max_batch", "boolean"]),
    "wrong-type-list": ("sources: cam\n", ["sources: Input should be a valid list"]),
    "wrong-type-mapping": ("events: 0.5\n", ["events: Input should be a valid dictionary"]),
    "wrong-type-fraction-for-int": ("model:\n  max_batch: 2.5\n", ["model.max_batch"]),
    "url-boolean": ("sources:\n  - name: a\n    url: true\n", ["sources[0].url", "not a boolean"]),
    "bad-source-name": ("sources:\n  - name: front door\n    url: '0'\n", ["sources[0].name"]),
    "threshold-above-1": (
        "events:\n  threshold: 1.5\n",
        ["events.threshold: Input should be less than or equal to 1"],
    ),
    "threshold-nan": ("events:\n  threshold: .nan\n", ["events.threshold"]),
    "max-batch-zero": (
        "model:\n  max_batch: 0\n",
        ["model.max_batch: Input should be greater than or equal to 1"],
    ),
    "negative-timeout": (
        "sources:\n  - name: a\n    url: x.mp4\n    options:\n      open_timeout_s: -1\n",
        ["sources[0].options.open_timeout_s: Input should be greater than 0"],
    ),
    "window-length-not-16": ("window:\n  length: 8\n", ["window.length"]),
    "unknown-device": ("model:\n  device: tpu\n", ["model.device"]),
    "exit-above-threshold": (
        "events:\n  threshold: 0.3\n  exit_threshold: 0.5\n",
        ["events: exit_threshold (0.5) must be <= threshold (0.3)"],
    ),
    "class-exit-above-class-threshold": (
        "events:\n  classes:\n    fall:\n      threshold: 0.2\n",
        ["classes.fall: exit_threshold (0.4) must be <= threshold (0.2)"],
    ),
    "backoff-initial-above-max": (
        "sources:\n  - name: a\n    url: x.mp4\n    options:\n      backoff_initial_s: 60\n      backoff_max_s: 5\n",
        ["sources[0].options: backoff_initial_s must be <= backoff_max_s"],
    ),
    "duplicate-key": (
        "model:\n  width: 0.5\nmodel:\n  device: cpu\n",
        ["duplicate key 'model' at lines 1 and 3"],
    ),
    "duplicate-nested-key": (
        "sources:\n  - name: a\n    url: '0'\n    url: '1'\n",
        ["duplicate key 'url' at lines 3 and 4"],
    ),
    "nested-too-deep": (
        "model: " + "[" * 200 + "]" * 200 + "\n",
        ["nested more than 100 deep at line 1"],
    ),
    "duplicate-source-names": (
        "sources:\n  - {name: cam, url: '0'}\n  - {name: cam, url: '1'}\n",
        ["sources: source names must be unique, but ['cam'] repeat"],
    ),
    "several-problems-at-once": (
        "model:\n  width: -1\n  colour: red\nevents:\n  smoothing: 0\n",
        ["model.width", "model.colour: unknown key", "events.smoothing"],
    ),
    "top-level-list": (
        "- name: cam\n  url: '0'\n",
        ["expected a mapping at the top level, but got list"],
    ),
    "top-level-scalar": ("just text\n", ["expected a mapping at the top level, but got str"]),
    "malformed-yaml-indent": (
        "model:\n  width: 0.5\n   device: cpu\n",
        ["malformed YAML at line 3"],
    ),
    "malformed-yaml-unclosed": (
        "sources: [\n  {name: a, url: b}\n\nmodel: {}\n",
        ["malformed YAML at line"],
    ),
    "malformed-yaml-tab": ("model:\n\twidth: 0.5\n", ["malformed YAML at line 2"]),
    "env-variable-unset": (
        "sources:\n  - name: a\n    url: rtsp://u:${SD_TEST_UNSET_VAR}@h/s\n",
        ["sources[0].url: environment variable SD_TEST_UNSET_VAR is not set"],
    ),
}


@pytest.mark.parametrize(("text", "fragments"), INVALID.values(), ids=INVALID.keys())
def test_invalid_config_is_one_config_error_naming_each_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, fragments: list[str]
) -> None:
    monkeypatch.delenv("SD_TEST_UNSET_VAR", raising=False)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("make", "expectation"),
    [
        (lambda d: write(d, "window:\n  stride: 4\n"), contextlib.nullcontext()),
        (
            lambda d: d / "missing.yaml",
            pytest.raises(ConfigError, match="missing.yaml: config file not found"),
        ),
        (lambda d: d, pytest.raises(ConfigError, match="cannot read config")),
        (
            lambda d: (d / "latin1.yaml").write_bytes(b"name: caf\xe9\xff\n") and d / "latin1.yaml",
            pytest.raises(ConfigError, match="latin1.yaml: cannot read config"),
        ),
    ],
    ids=["readable", "missing-file", "directory", "not-utf8"],
)
def test_unreadable_config_file_is_a_config_error(
    tmp_path: Path, make: object, expectation: contextlib.AbstractContextManager
) -> None:
    with expectation:
        load_config(make(tmp_path))  # type: ignore[operator]
