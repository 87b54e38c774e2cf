"""Bad input never crashes a run: broken files, unreachable URLs, odd frames, size changes.

A source that ends closes its events with ``stream_ended``; input that cannot be read at all is
one ``error:`` line from ``streamdet run`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from assets import cut_clip, frame_count, vtest_path
from conftest import free_port

from streamdet.buffer import RingBuffer
from streamdet.cli import main
from streamdet.config import load_config
from streamdet.models.weights import Checkpoint, save_checkpoint
from streamdet.pipeline import Pipeline
from streamdet.preprocess import PreprocessContract
from streamdet.sources import CaptureThread, Pacing, SourceKind


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, checkpoint: Checkpoint) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(path, checkpoint.model, class_names=checkpoint.class_names)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 frames of vtest.avi at 320x240 as H.264-free MJPG (every frame is a keyframe)."""
    return cut_clip(
        vtest_path(), tmp_path_factory.mktemp("clips") / "walk.avi", 0, 60, size=(320, 240)
    )


def run_file(
    path: Path, events: Path, checkpoint: Checkpoint, engine, backend: str = "auto"
) -> tuple[Any, list[dict[str, Any]]]:
    cfg = load_config(
        None,
        {
            "sources": [
                {
                    "name": "file",
                    "url": str(path),
                    "realtime": False,
                    "options": {"backend": backend},
                }
            ],
            "model": {"device": "cpu", "precision": "fp32"},
            "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
            "sinks": {"events": {"path": str(events)}},
        },
    )
    summary = Pipeline(cfg, checkpoint, engine, print_fn=lambda s: None).run()
    return summary, [json.loads(line) for line in events.read_text().splitlines()]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["run", *args])
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["pyav", "opencv"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt-middle"])
def test_a_damaged_file_is_read_as_far_as_it_goes_and_its_events_end_with_stream_ended(
    tmp_path: Path, clip: Path, checkpoint: Checkpoint, engine, damage: str, backend: str
) -> None:
    """OpenCV stops at the first frame it cannot decode; PyAV drops that frame and reads on,
    so it reads at least as far (past the damage in the middle of this all-keyframe MJPG)."""
    data = bytearray(clip.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        rng = np.random.default_rng(0)
        start = len(data) // 3
        data[start : start + len(data) // 4] = rng.integers(
            0, 256, len(data) // 4, dtype=np.uint8
        ).tobytes()
    broken = tmp_path / f"{damage}.avi"
    broken.write_bytes(bytes(data))

    intact = frame_count(broken)  # what OpenCV decodes from the start up to the damage
    assert 0 < intact < 60, "the damage should cost frames, and leave some before it"

    summary, lines = run_file(broken, tmp_path / "events.jsonl", checkpoint, engine, backend)

    if backend == "opencv":
        assert summary.sources[0].frames_read == intact
    else:
        assert intact <= summary.sources[0].frames_read < 60
    assert summary.windows >= 1
    news = {o["id"] for o in lines if o["type"] == "new"}
    assert news and {
        o["id"]: o["end_reason"] for o in lines if o["type"] == "end"
    } == dict.fromkeys(news, "stream_ended")
    assert [o["status"] for o in lines if o["type"] == "status"] == ["online", "offline"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a readable video file (empty or not a file)"),
        (b"\x00garbage, not a video\xff" * 200, "cannot decode video"),
    ],
    ids=["zero-byte", "not-a-video"],
)
def test_an_unreadable_file_is_one_error_line_and_exit_code_2(
    tmp_path: Path,
    weights: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    content: bytes,
    expected: str,
) -> None:
    path = tmp_path / "input.mp4"
    path.write_bytes(content)

    with caplog.at_level("INFO"):
        code, err = run_cli(
            [
                "--source",
                str(path),
                "--weights",
                str(weights),
                "--precision",
                "bf16",
                "--events",
                str(tmp_path / "events.jsonl"),
            ],
            capsys,
        )

    assert code == 2
    assert len(error_lines(err)) == 1 and expected in error_lines(err)[0]
    assert "Traceback" not in err
    # Found before the model is built: no calibration attempt, no engine, no warning.
    assert [r.getMessage() for r in caplog.records if r.name.startswith("streamdet")] == []


def write_stream_config(path: Path, url: str, weights: Path, *, reconnect: bool) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "cam",
                        "url": url,
                        "options": {
                            "open_timeout_s": 1.0,
                            "read_timeout_s": 1.0,
                            "reconnect": reconnect,
                            "backoff_initial_s": 0.2,
                            "backoff_max_s": 0.5,
                        },
                    }
                ],
                "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
                "sinks": {"events": {"path": str(path.with_suffix(".jsonl"))}},
            }
        )
    )
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "url",
    ["rtsp://127.0.0.1:{port}/cam", "rtsp://no-such-host.invalid:554/cam"],
    ids=["refused-port", "bad-host"],
)
def test_an_unreachable_stream_is_one_error_line_without_reconnect_and_retried_with_it(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    url = url.format(port=free_port())
    once = write_stream_config(tmp_path / "once.yaml", url, weights, reconnect=False)
    started = time.monotonic()
    code, err = run_cli([str(once)], capsys)
    assert code == 2 and time.monotonic() - started < 20
    assert len(error_lines(err)) == 1 and "cannot open stream" in error_lines(err)[0]

    retry = write_stream_config(tmp_path / "retry.yaml", url, weights, reconnect=True)
    code = main(["run", str(retry), "--max-seconds", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    # Nothing was measured: the summary says so with '-', not nan.
    assert "[summary] inference ms p50 - p99 -; latency ms p50 - p99 -" in out and "nan" not in out
    lines = [json.loads(line) for line in retry.with_suffix(".jsonl").read_text().splitlines()]
    # One offline line for the whole outage, however many reopen attempts failed.
    assert [(o["type"], o["status"]) for o in lines] == [("status", "offline")]
    assert "cannot open stream" in lines[0]["reason"]


class FrameSource:
    """Given frames, then the end."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = iter(frames)
        self.fps = 10.0

    def read(self) -> np.ndarray | None:
        return next(self.frames, None)

    def release(self) -> None:
        pass


@pytest.mark.timeout(20)
@pytest.mark.parametrize("shape", [(24, 32), (24, 32, 4), (24, 32, 3)], ids=["gray", "bgra", "bgr"])
def test_grayscale_and_four_channel_frames_make_windows_like_colour_ones(
    shape: tuple[int, ...],
) -> None:
    contract = PreprocessContract(resize=(16, 16), crop=8, fps=10.0)
    ring = RingBuffer("src", length=16, stride=8, frame_shape=(3, 8, 8), lossless=True, capacity=64)
    frames = [np.full(shape, i * 4, np.uint8) for i in range(32)]
    capture = CaptureThread(
        "src",
        lambda: FrameSource(frames),
        ring,
        contract,
        threading.Event(),
        kind=SourceKind.FILE,
        pacing=Pacing.REPLAY,
    )
    capture.start()
    capture.join(10)

    assert capture.error is None and capture.stats.frames_used == 32 and ring.closed
    windows = []
    while (w := ring.take_window()) is not None:
        windows.append((w.first_frame, w.last_frame))
    assert windows == [(0, 15), (8, 23), (16, 31)]


@pytest.mark.timeout(60)
def test_a_resolution_change_mid_file_is_decoded_without_a_crash(
    tmp_path: Path, checkpoint: Checkpoint, engine
) -> None:
    parts = []
    for i, size in enumerate(["320x240", "160x120"]):
        part = tmp_path / f"part{i}.ts"
        subprocess.run(
            [
                "ffmpeg",
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-i",
                str(vtest_path()),
                "-frames:v",
                "40",
                "-s",
                size,
                "-c:v",
                "mpeg2video",
                "-an",
                str(part),
            ],
            check=True,
            timeout=60,
        )
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))  # one transport stream whose picture size changes

    summary, lines = run_file(joined, tmp_path / "events.jsonl", checkpoint, engine)

    # OpenCV's FFmpeg backend scales the later pictures to the first size (a source that does
    # deliver a new size marks a gap: see test_capture); either way no frame is lost.
    assert summary.sources[0].frames_read >= 75
    assert summary.windows >= 4
    assert {o["end_reason"] for o in lines if o["type"] == "end"} == {"stream_ended"}
