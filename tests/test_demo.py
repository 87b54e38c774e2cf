"""The bundled demo: what `streamdet run` with no arguments shows a new user (real files, CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import pytest
from assets import cut_clip

from streamdet import demo
from streamdet.cli import main
from streamdet.models.weights import load_checkpoint

DEMO = demo.config_path().parent


def test_the_demo_assets_fit_their_budgets_and_agree():
    weights, video, truth = (
        DEMO / "c3d_bn_demo.safetensors",
        DEMO / "demo.mp4",
        DEMO / "demo_truth.json",
    )
    assert weights.stat().st_size <= 20 * 1024 * 1024
    assert video.stat().st_size <= 5 * 1024 * 1024
    checkpoint = load_checkpoint(weights)
    t = json.loads(truth.read_text())
    assert list(checkpoint.class_names) == t["classes"]
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == t["frame_count"]
    cap.release()
    assert {e["label"] for e in t["events"]} >= set(t["classes"]) - {"none"}  # every class shows up


@pytest.mark.timeout(120)
def test_run_with_no_arguments_detects_the_demo_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(tmp_path)  # the demo's outputs go under ./streamdet-out

    assert main(["run"]) == 0

    out = capsys.readouterr().out
    f1 = float(re.search(r"F1 ([0-9.]+)", out).group(1))
    assert f1 >= 0.85, out  # 0.917 when shipped
    events = [
        json.loads(line)
        for line in (tmp_path / "streamdet-out" / "events.jsonl").read_text().splitlines()
    ]
    assert sum(e["type"] == "new" for e in events) >= 10
    cap = cv2.VideoCapture(str(tmp_path / "streamdet-out" / "demo_annotated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 600
    cap.release()


@pytest.mark.timeout(120)
def test_a_source_on_the_command_line_takes_the_demos_model_but_not_its_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # The working directory is tmp_path (checkout_guard): relative outputs land there.
    clip = cut_clip(DEMO / "demo.mp4", tmp_path / "mine.avi", start_frame=0, n_frames=60)

    assert main(["run", "--source", str(clip)]) == 0

    out = capsys.readouterr().out
    assert "against" not in out  # the demo's truth describes the demo, not this clip
    assert "annotated video" not in out
    assert not (tmp_path / "streamdet-out" / "demo_annotated.mp4").exists()
    lines = [
        json.loads(line)
        for line in (tmp_path / "streamdet-out" / "events.jsonl").read_text().splitlines()
    ]
    assert {line["source"] for line in lines} == {"mine"}
    events = [line for line in lines if line["type"] != "status"]
    assert [e["label"] for e in events if e["type"] == "new"] == ["enter"]  # truth: frames 24-45
    assert {e["model"]["name"] for e in events} == {"c3d_bn_demo.safetensors"}


def test_asked_for_an_annotated_video_a_source_on_the_command_line_gets_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    clip = cut_clip(DEMO / "demo.mp4", tmp_path / "mine.avi", start_frame=0, n_frames=40)

    assert main(["run", "--source", str(clip), "--output-video", "mine.mp4"]) == 0

    cap = cv2.VideoCapture(str(tmp_path / "mine.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 40
    cap.release()
