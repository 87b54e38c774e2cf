"""The bundled demo: what `streamdet run` with no arguments shows a new user (real files, CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import pytest

from streamdet import demo
from streamdet.cli import main
from streamdet.models.weights import load_checkpoint

DEMO = demo.config_path().parent


def test_the_demo_assets_fit_their_budgets_and_agree():
    weights, video, truth = DEMO / "c3d_bn_demo.safetensors", DEMO / "demo.mp4", DEMO / "demo_truth.json"
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
def test_run_with_no_arguments_detects_the_demo_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    monkeypatch.chdir(tmp_path)  # the demo's outputs go under ./streamdet-out

    assert main(["run"]) == 0

    out = capsys.readouterr().out
    f1 = float(re.search(r"F1 ([0-9.]+)", out).group(1))
    assert f1 >= 0.85, out  # 0.917 when shipped
    events = [json.loads(line) for line in (tmp_path / "streamdet-out" / "events.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "new" for e in events) >= 10
    cap = cv2.VideoCapture(str(tmp_path / "streamdet-out" / "demo_annotated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 600
    cap.release()
