"""The node engine of ``--backend ray`` as a plain object (no Ray): what its polls cost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_model import make_tiny_weights

from streamdet.config import RunConfig
from streamdet.distributed import engine as engine_module
from streamdet.distributed.engine import FIGURES_INTERVAL_S, NodeEngine
from streamdet.distributed.records import StatusRecord


@pytest.mark.timeout(120)
def test_polls_hand_lines_on_at_once_but_make_the_figures_at_most_twice_a_second(
    tmp_path: Path, assets_dir: Path, walk_clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every long-poll answer used to build every source's figures and health (percentiles),
    and a poll is answered as soon as a line is made: the cost grew with the lines. Now a line
    still leaves at once, and the figures are made at most every ``FIGURES_INTERVAL_S``."""
    made: list[float] = []
    real = engine_module.gather_figures
    monkeypatch.setattr(
        engine_module,
        "gather_figures",
        lambda threads: (made.append(time.monotonic()), real(threads))[1],
    )
    cfg = RunConfig.model_validate(
        {
            "sources": [{"name": "cam", "url": str(walk_clip), "realtime": True}],
            "model": {"weights": str(make_tiny_weights(assets_dir, walk_clip)), "device": "cpu"},
            "window": {"stride": 8},
        }
    )
    node = NodeEngine(cfg, threads=1)
    node.start(["cam"])
    try:
        asked = time.monotonic()
        first = node.poll(wait_s=10.0)
        waited = time.monotonic() - asked
        assert [(r.source, r.status) for r in first.records] == [("cam", "online")]
        assert isinstance(first.records[0], StatusRecord)
        assert waited < 5.0, f"the online line waited {waited:.1f} s"
        assert "cam" in first.stats and "cam" in first.health  # made anew after the start

        started, polls = time.monotonic(), 0
        while time.monotonic() - started < 2.0:
            report = node.poll()
            polls += 1
            assert report.stats["cam"].status == "online"
        spent = time.monotonic() - started
    finally:
        final = node.stop()

    assert polls > 100
    assert len(made) - 1 <= spent / FIGURES_INTERVAL_S + 1, (len(made), polls)
    assert final.stats["cam"].windows == final.windows  # the stop's figures are made anew


@pytest.mark.timeout(120)
def test_a_start_that_fails_on_the_node_is_reported_by_the_next_poll(
    tmp_path: Path, assets_dir: Path, walk_clip: Path
) -> None:
    """The driver's start call does not wait for its answer: a pipeline that could not even be
    built on the node (here its media folder cannot be made) was lost with that answer, and its
    sources never came online without a word. The next poll now carries the error, which the
    driver turns into one ``error:`` line."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the media folder's parent should be")
    cfg = RunConfig.model_validate(
        {
            "sources": [{"name": "cam", "url": str(walk_clip), "realtime": True}],
            "model": {"weights": str(make_tiny_weights(assets_dir, walk_clip)), "device": "cpu"},
            "window": {"stride": 8},
            "media": {"dir": str(blocker / "media")},
        }
    )
    node = NodeEngine(cfg, threads=1)
    node.start(["cam"])  # returns: an unawaited Ray call's error would print a traceback
    report = node.poll()
    assert len(report.errors) == 1 and report.errors[0].startswith("cam: "), report.errors
    assert report.sources == ()
