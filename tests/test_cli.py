"""The ``streamdet`` command line: help, version, info, validate, and one ``error:`` line per mistake."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from streamdet import __version__
from streamdet.cli import COMMANDS, main
from streamdet.models.c3d import C3D_BN, count_flops
from streamdet.models.weights import file_sha256, save_checkpoint
from streamdet.preprocess import PreprocessContract

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = 0.0625
CLASSES = ["none", "fall", "fight"]
SUBPROCESS_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def small_model() -> C3D_BN:
    torch.manual_seed(0)
    return C3D_BN(num_classes=len(CLASSES), width=SMALL).eval()


@pytest.fixture
def checkpoint(tmp_path: Path, small_model: C3D_BN) -> Path:
    path = tmp_path / "small.safetensors"
    contract = PreprocessContract(
        channel_order="BGR", mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), fps=15.0
    )
    save_checkpoint(path, small_model, class_names=CLASSES, contract=contract)
    return path


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def streamdet_command() -> list[str]:
    """The installed console script; ``python -m streamdet`` where it is not installed."""
    script = shutil.which("streamdet")
    return [script] if script else [sys.executable, "-m", "streamdet"]


def run_console(
    args: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings would show, as for a user
    return subprocess.run(
        [*streamdet_command(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_error_line(code: int, out: str, err: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")


# --- help, version, info, validate -------------------------------------------------------------


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["--help"], capsys)
    assert code == 0 and err == ""
    for command in ("info", "validate", "run"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command


def test_every_command_is_in_the_one_table_and_its_handler_exists(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """train, eval, eval-events and export were registered by another module's add_commands."""
    code, out, _ = run_main(["--help"], capsys)
    listed = re.findall(r"^    (\S+)\s", out, re.MULTILINE)
    assert code == 0 and listed == [c.name for c in COMMANDS]
    for command in COMMANDS:
        module, function = command.handler.split(":")
        assert callable(getattr(importlib.import_module(module), function)), command.handler


def test_help_imports_no_handler_module() -> None:
    """Handlers are imported when their command runs, not to build the parser."""
    check = (
        "import sys; from streamdet.cli import main; main(['--help']); "
        "print(sorted(m for m in ('torch', 'streamdet.training.commands', 'streamdet.runner') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"streamdet {__version__}"


def test_info_without_weights_describes_the_published_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Builds the full-width model (no forward pass)."""
    code, out, err = run_main(["info"], capsys)
    assert code == 0, err
    assert re.search(r"^parameters:\s+78,034,056$", out, re.MULTILINE)
    assert re.search(r"^GFLOP/clip:\s+77\.09$", out, re.MULTILINE)
    assert re.search(r"^device:\s+(cpu|cuda)", out, re.MULTILINE)
    assert "resize 128x171, centre crop 112, RGB" in out
    assert re.search(r"^classes:\s+8 ", out, re.MULTILINE)


def test_info_with_width_and_classes_matches_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    model = C3D_BN(num_classes=4, width=0.125)
    code, out, err = run_main(["info", "--width", "0.125", "--num-classes", "4"], capsys)
    assert code == 0, err
    assert f"parameters:   {sum(p.numel() for p in model.parameters()):,}" in out
    assert f"GFLOP/clip:   {count_flops(model) / 1e9:.2f}" in out
    assert "class_0, class_1, class_2, class_3" in out


def test_info_with_weights_describes_the_checkpoint(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, small_model: C3D_BN
) -> None:
    code, out, err = run_main(["info", "--weights", str(checkpoint)], capsys)
    assert code == 0, err
    assert f"sha256 {file_sha256(checkpoint)[:16]}" in out
    assert re.search(r"^width:\s+0\.0625$", out, re.MULTILINE)
    assert "classes:      3 (none, fall, fight)" in out
    assert f"parameters:   {sum(p.numel() for p in small_model.parameters()):,}" in out
    assert "BGR" in out and "15 fps" in out  # the checkpoint's own contract, not the default


def test_info_describes_a_plain_state_dict_of_the_width_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, small_model: C3D_BN
) -> None:
    """info ignored --width with --weights, so a .pt narrower than 1.0 could not be described."""
    weights = tmp_path / "model.pt"
    torch.save(small_model.state_dict(), weights)
    code, out, err = run_main(["info", "--weights", str(weights), "--width", "0.0625"], capsys)
    assert code == 0, err
    assert re.search(r"^width:\s+0\.0625$", out, re.MULTILINE)
    assert re.search(r"^classes:\s+3 \(class_0, class_1, class_2\)$", out, re.MULTILINE)


def test_validate_accepts_a_config_and_hides_passwords(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAM_PASSWORD", "hunter2secret")
    code, out, err = run_main(["validate", str(CONFIGS / "rtsp.yaml")], capsys)
    assert code == 0, err
    assert "valid (3 source(s)" in out
    assert "entrance=rtsp://viewer:***@192.0.2.10:554/stream1" in out
    assert "hunter2secret" not in out + err


def test_validate_lists_twenty_sources_then_counts_the_rest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """validate printed every source on one line: 10 MB for 200,000 sources."""
    sources = "".join(f"  - {{name: cam{i}, url: 'rtsp://192.0.2.{i}/s'}}\n" for i in range(25))
    code, out, err = run_main(["validate", _config(tmp_path, "sources:\n" + sources)], capsys)
    assert code == 0, err
    assert "valid (25 source(s): cam0=rtsp://192.0.2.0/s, " in out
    assert "cam19=rtsp://192.0.2.19/s, ... and 5 more)" in out
    assert "cam20" not in out


# --- user errors: one line, exit 2 -------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _truncated_checkpoint(tmp_path: Path, checkpoint: Path) -> str:
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(checkpoint.read_bytes()[:5000])
    return str(path)


class _TouchOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def _crafted_pickle(tmp_path: Path) -> str:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _TouchOnUnpickle(tmp_path / "pwned")}, f)
    return str(path)


def _tiny_video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(8):
        writer.write(np.full((48, 64, 3), i * 30, np.uint8))
    writer.release()
    return path


def _wrong_class_count_run(tmp_path: Path, small_model: C3D_BN) -> list[str]:
    """A plain state dict of 3 classes where the config says 5."""
    weights = tmp_path / "three_classes.pt"
    torch.save(small_model.state_dict(), weights)
    video = _tiny_video(tmp_path)
    config = _config(
        tmp_path,
        (
            f"sources:\n  - name: clip\n    url: {video}\n"
            f"model:\n  weights: {weights}\n  num_classes: 5\n  width: {SMALL}\n  device: cpu\n"
            "sinks:\n  events:\n    path: null\n"
        ),
    )
    return ["run", config, "--max-seconds", "5"]


# id -> (argv from (tmp_path, checkpoint, small model), text the error line must contain)
USER_ERRORS: dict[str, tuple[Callable[[Path, Path, C3D_BN], list[str]], str]] = {
    "missing-config": (lambda d, c, m: ["validate", str(d / "nope.yaml")], "config file not found"),
    "config-is-a-directory": (lambda d, c, m: ["validate", str(d)], "cannot read config"),
    "malformed-yaml": (
        lambda d, c, m: ["validate", _config(d, "model:\n  width: 1\n   device: cpu\n")],
        "malformed YAML at line 3",
    ),
    "top-level-not-a-mapping": (lambda d, c, m: ["validate", _config(d, "- a\n- b\n")], "mapping"),
    "unknown-key": (
        lambda d, c, m: ["validate", _config(d, "modle:\n  width: 1\n")],
        "modle: unknown key",
    ),
    "wrong-type": (
        lambda d, c, m: ["validate", _config(d, "model:\n  max_batch: lots\n")],
        "model.max_batch",
    ),
    "out-of-range": (
        lambda d, c, m: ["validate", _config(d, "events:\n  threshold: 2\n")],
        "events.threshold",
    ),
    "exit-above-threshold": (
        lambda d, c, m: ["validate", _config(d, "events:\n  exit_threshold: 0.9\n")],
        "exit_threshold",
    ),
    "missing-source-url": (
        lambda d, c, m: ["validate", _config(d, "sources:\n  - name: cam\n")],
        "sources[0].url: Field required",
    ),
    "env-var-unset": (
        lambda d, c, m: [
            "validate",
            _config(d, "sources:\n  - {name: a, url: '${SD_TEST_UNSET_VAR}'}\n"),
        ],
        "SD_TEST_UNSET_VAR is not set",
    ),
    "unknown-subcommand": (lambda d, c, m: ["frobnicate"], "invalid choice: 'frobnicate'"),
    "unknown-option": (lambda d, c, m: ["info", "--colour"], "unrecognized arguments: --colour"),
    "missing-argument": (lambda d, c, m: ["validate"], "required: config"),
    "bad-option-value": (lambda d, c, m: ["info", "--width", "wide"], "--width"),
    "width-out-of-range": (lambda d, c, m: ["info", "--width", "0"], "--width"),
    "zero-classes": (lambda d, c, m: ["info", "--num-classes", "0"], "--num-classes"),
    "bad-choice": (lambda d, c, m: ["run", "--device", "tpu"], "invalid choice: 'tpu'"),
    "missing-weights": (
        lambda d, c, m: ["info", "--weights", str(d / "nope.safetensors")],
        "weights file not found",
    ),
    "truncated-weights": (
        lambda d, c, m: ["info", "--weights", _truncated_checkpoint(d, c)],
        "not a readable safetensors file",
    ),
    "garbage-weights": (
        lambda d, c, m: ["info", "--weights", str(_write(d / "junk.pt", os.urandom(2048)))],
        "junk.pt",
    ),
    "crafted-pickle-weights": (
        lambda d, c, m: ["info", "--weights", _crafted_pickle(d)],
        "refused",
    ),
    "weights-wrong-class-count-for-config": (
        lambda d, c, m: _wrong_class_count_run(d, m),
        "fc8.weight: expected shape (5, 256), got (3, 256)",
    ),
    "run-missing-source-file": (
        lambda d, c, m: ["run", "--source", str(d / "missing.mp4"), "--max-seconds", "5"],
        "missing.mp4: video file not found",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("make_argv", "expected"), USER_ERRORS.values(), ids=USER_ERRORS.keys())
def test_user_error_is_one_error_line_and_exit_code_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    checkpoint: Path,
    small_model: C3D_BN,
    make_argv: Callable[[Path, Path, C3D_BN], list[str]],
    expected: str,
) -> None:
    monkeypatch.delenv("SD_TEST_UNSET_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = make_argv(tmp_path, checkpoint, small_model)
    code, out, err = run_main(argv, capsys)
    assert_one_error_line(code, out, err)
    assert expected in err
    assert not (tmp_path / "pwned").exists()


# --- the real console script -------------------------------------------------------------------


def test_console_script_help_and_version(tmp_path: Path) -> None:
    help_ = run_console(["--help"], tmp_path)
    assert help_.returncode == 0 and "usage: streamdet" in help_.stdout and help_.stderr == ""
    version = run_console(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"streamdet {__version__}"


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        (lambda d: ["frobnicate"], "invalid choice"),
        (lambda d: ["validate", _config(d, "model:\n  width: [1\n")], "malformed YAML"),
        (lambda d: ["info", "--width", "-1"], "--width"),
        (lambda d: ["info", "--weights", _crafted_pickle(d)], "refused"),
    ],
    ids=["unknown-subcommand", "malformed-yaml", "negative-width", "crafted-pickle-weights"],
)
def test_console_script_reports_user_errors_without_traceback(
    tmp_path: Path, make_args: Callable[[Path], list[str]], expected: str
) -> None:
    """Also catches noise that in-process tests cannot see, e.g. torch's "Detected pickle
    protocol 4" warning that used to follow the error line."""
    result = run_console(make_args(tmp_path), tmp_path)
    assert_one_error_line(result.returncode, result.stdout, result.stderr)
    assert expected in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_console_script_run_with_a_missing_source_fails_fast(tmp_path: Path) -> None:
    """No waiting for a source that cannot appear: a run that waited would last its
    --max-seconds (600), far past the generous deadline for start-up and the error line."""
    try:
        result = run_console(
            ["run", "--source", str(tmp_path / "missing.mp4"), "--max-seconds", "600"],
            tmp_path,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the run was still waiting for a missing file after 120 s")
    # one line: nothing was built (building the model logs to stderr)
    assert_one_error_line(result.returncode, result.stdout, result.stderr)
    assert "missing.mp4: video file not found" in result.stderr
