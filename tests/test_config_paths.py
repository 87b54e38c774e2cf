"""Relative paths in a config file are relative to its folder, resolved when the file is loaded.

Every command sees the same configuration: ``validate`` prints the sources ``run`` opens.
Command-line options are relative to the current folder and stay as given.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_model import make_tiny_weights

from streamdet import runner
from streamdet.cli import main
from streamdet.config import load_config
from streamdet.errors import ConfigError


@pytest.fixture(scope="module")
def weights(assets_dir: Path, walk_clip: Path) -> Path:
    return make_tiny_weights(assets_dir, walk_clip)


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_prints_the_sources_run_opens_for_a_config_in_another_folder(
    tmp_path: Path,
    walk_clip: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """validate printed the file's relative paths; run resolved them after loading."""
    conf = tmp_path / "conf"
    (conf / "clips").mkdir(parents=True)
    shutil.copy(walk_clip, conf / "clips" / "walk.avi")
    shutil.copy(weights, conf / "tiny.safetensors")
    config = write_yaml(
        conf / "run.yaml",
        {
            "sources": [
                {"name": "walk", "url": "clips/walk.avi", "realtime": False},
                {"name": "again", "url": "file://clips/walk.avi", "realtime": False},
            ],
            "model": {"weights": "tiny.safetensors", "device": "cpu", "precision": "fp32"},
            "sinks": {"events": {"path": str(tmp_path / "events.jsonl")}},
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checked: list[list[str]] = []
    real_check = runner.check_sources

    def check_recording(urls, **kwargs):
        checked.append(list(urls))
        return real_check(urls, **kwargs)

    monkeypatch.setattr(runner, "check_sources", check_recording)

    assert main(["validate", str(config)]) == 0
    printed = capsys.readouterr().out
    assert main(["run", str(config)]) == 0

    opened = checked[0]  # the sources, checked before the model is built
    expected = str(conf / "clips" / "walk.avi")
    assert opened == [expected, expected]
    assert f"(2 source(s): walk={expected}, again={expected})" in printed


def test_paths_in_the_file_are_from_its_folder_and_options_from_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_yaml(
        tmp_path / "conf" / "run.yaml",
        {
            "sources": [{"name": "clip", "url": "clip.mp4"}],
            "model": {"weights": "w.safetensors", "calibration": "../calib.avi"},
            "truth": "truth.json",
        },
    )
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "conf"

    cfg = load_config(Path("conf") / "run.yaml")  # a relative config path too
    assert cfg.sources[0].url == str(folder / "clip.mp4")
    assert (cfg.model.weights, cfg.model.calibration, cfg.truth) == (
        str(folder / "w.safetensors"),
        str(folder / "../calib.avi"),
        str(folder / "truth.json"),
    )

    cfg = load_config(
        config,
        {
            "sources": [{"name": "cli", "url": "mine.mp4"}],
            "model": {"weights": "mine.pt"},
            "truth": "mine.json",
        },
    )
    assert (cfg.sources[0].url, cfg.model.weights, cfg.truth) == (
        "mine.mp4",
        "mine.pt",
        "mine.json",
    )
    assert cfg.model.calibration == str(folder / "../calib.avi")  # no option overrides it


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/videos/a.mp4", "/videos/a.mp4"),
        ("file:///videos/a.mp4", "/videos/a.mp4"),
        ("~/a.mp4", os.path.expanduser("~/a.mp4")),
        ("${SD_TEST_VIDEOS}/a.mp4", "/srv/videos/a.mp4"),  # substituted before it is resolved
        ("0", "0"),
        ("rtsp://10.0.0.5/stream1", "rtsp://10.0.0.5/stream1"),
    ],
    ids=["absolute", "file-url", "home", "env-absolute", "camera", "stream"],
)
def test_only_relative_file_paths_are_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    monkeypatch.setenv("SD_TEST_VIDEOS", "/srv/videos")
    config = write_yaml(tmp_path / "run.yaml", {"sources": [{"name": "s", "url": url}]})
    assert load_config(config).sources[0].url == expected


def test_a_value_of_the_wrong_type_is_still_a_validation_error(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "run.yaml", {"sources": "clip.mp4", "model": {"weights": 3}, "truth": ["t.json"]}
    )
    with pytest.raises(ConfigError, match=re.escape("sources: Input should be a valid list")):
        load_config(config)
