"""The GPU benchmark scripts run end to end on this machine in their smoke modes, so the one
call a lent GPU gets (benchmarks/gpu_session.sh) does not fail on a script error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    env["STREAMDET_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(300)
def test_the_pipeline_benchmark_runs_the_device_path_and_prints_its_tables(tmp_path: Path) -> None:
    out = run_script("gpu_pipeline.py", tmp_path, "--smoke", "--json", str(tmp_path / "r.json"))
    assert "| decode, 1 source |" in out and "| preprocess |" in out and "| model, batch 4 |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(" | yes | " in row for row in rows), out
    assert "held: 2 streams" in out
    assert (tmp_path / "r.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("streamdet-gpu-pipeline")]


@pytest.mark.timeout(300)
def test_the_engine_batch_benchmark_times_each_batch_size(tmp_path: Path) -> None:
    out = run_script("gpu_engine_batches.py", tmp_path, "--smoke")
    rows = [line for line in out.splitlines() if line.startswith("| default")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "2", "3"], out
