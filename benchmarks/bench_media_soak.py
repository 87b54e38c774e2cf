"""Media soak: is memory flat over a long ``streamdet run`` with 4 cameras and event clips on?

Serves 4 live RTSP cameras with the test server (``tests/rtsp_server.py``: H.264 320x240 at
10 fps, a keyframe every second, frame numbers burnt in), each looping the media tests' event
video (an "event" of 4 s every 16 s: ``tests/media_helpers.py``), and runs ``streamdet run`` on
them as a subprocess with the tiny model fitted to those events, clips and snapshots on, and
retention keeping the media folder under ``--max-mb``. Every ``SAMPLE_EVERY_S`` the run's RSS,
threads and open file descriptors are read from ``/proc``; the report compares the first sample
after ``--warmup-s`` with the last and gives the growth over the second half (a leak keeps
growing there), with the clips and snapshots the log got, and checks a few clips play.

Usage:
    python benchmarks/bench_media_soak.py                       # 10 minutes
    python benchmarks/bench_media_soak.py --minutes 3 --json media_soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the RTSP test server and the media tests' helpers

from assets import vtest_path  # noqa: E402
from conftest import RtspServer, free_port  # noqa: E402
from media_helpers import GOP, make_event_video, make_event_weights  # noqa: E402

SAMPLE_EVERY_S = 10.0
CAMERAS = 4


def proc_figures(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open file descriptors of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def write_config(folder: Path, urls: list[str], weights: Path, max_mb: float) -> Path:
    path = folder / "soak.yaml"
    cfg = {
        "sources": [{"name": f"cam{i + 1}", "url": url} for i, url in enumerate(urls)],
        "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
        "events": {"threshold": 0.6, "exit_threshold": 0.4, "smoothing": 1, "open_windows": 1},
        "media": {
            "dir": str(folder / "media"),
            "clips": {"pre_capture_s": 3.0, "post_capture_s": 2.0},
            "snapshots": {"height": 120, "overlay": True},
            "retain": {"days": 1.0, "max_gb": max_mb / 1000},
        },
        "progress_interval_s": 30.0,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    video = make_event_video(folder, vtest_path())
    weights = make_event_weights(folder, video)
    servers = [
        RtspServer(
            ["--video", str(video), "--counter", "--gop", str(GOP)],
            free_port(),
            folder / f"rtsp_{i}.log",
        )
        for i in range(CAMERAS)
    ]
    for server in servers:
        server.start()
    cfg = write_config(folder, [s.url for s in servers], weights, args.max_mb)
    events = folder / "events.jsonl"
    seconds = args.minutes * 60
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "streamdet", "run", str(cfg), "--events", str(events)]
    samples: list[dict[str, float]] = []
    with open(folder / "run.log", "wb") as log:
        proc = subprocess.Popen(
            [*command, "--max-seconds", str(seconds)], env=env, stdout=log, stderr=log
        )
        started = time.monotonic()
        try:
            while proc.poll() is None:
                try:
                    figures = proc_figures(proc.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                samples.append({"t_s": round(time.monotonic() - started, 1), **figures})
                print(json.dumps(samples[-1]), flush=True)
                try:
                    proc.wait(SAMPLE_EVERY_S)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                proc.kill()
            for server in servers:
                server.stop()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    clips = [o for o in lines if o["type"] == "clip"]
    result = report(args, samples, lines, clips, proc.returncode)
    files = [p for p in (folder / "media").rglob("*") if p.is_file()]
    result["media_files_left"] = len(files)
    result["media_mb_left"] = round(sum(p.stat().st_size for p in files) / 1e6, 1)
    result["retention_deleted"] = (folder / "run.log").read_text().count("retention: deleted")
    return result


def report(
    args: argparse.Namespace,
    samples: list[dict[str, float]],
    lines: list[dict[str, Any]],
    clips: list[dict[str, Any]],
    returncode: int | None,
) -> dict[str, Any]:
    after = [s for s in samples if s["t_s"] >= args.warmup_s]
    half = [s for s in after if s["t_s"] >= samples[-1]["t_s"] / 2]
    playable = 0
    checked = [c for c in clips if Path(c["path"]).exists()][-5:]
    for clip in checked:
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
             "stream=nb_read_frames", "-of", "csv=p=0", clip["path"]],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        playable += probe.returncode == 0 and probe.stdout.strip() == str(clip["frames"])
    result = {
        "minutes": args.minutes,
        "cameras": CAMERAS,
        "returncode": returncode,
        "rss_mib_after_warmup": after[0]["rss_mib"] if after else None,
        "rss_mib_end": samples[-1]["rss_mib"] if samples else None,
        "rss_mib_growth_second_half": round(half[-1]["rss_mib"] - half[0]["rss_mib"], 1)
        if len(half) > 1
        else None,
        "threads": [min(s["threads"] for s in after), max(s["threads"] for s in after)]
        if after
        else None,
        "fds": [min(s["fds"] for s in after), max(s["fds"] for s in after)] if after else None,
        "events": sum(o["type"] == "new" for o in lines),
        "clips": len(clips),
        "clips_lost_packets": sum(bool(c.get("lost_packets")) for c in clips),
        "snapshots": sum(o["type"] == "snapshot" for o in lines),
        "clips_checked_playable": f"{playable}/{len(checked)}",
        "samples": samples,
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--max-mb", type=float, default=20.0, help="retain.max_gb, in MB")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="media-soak-") as tmp:
        result = run(args, Path(tmp))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
