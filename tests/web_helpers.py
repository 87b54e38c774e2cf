"""Helpers of the web output's tests: a sink built outside a run (messages fed by hand), event
changes, and an HTTP client that returns every status instead of raising."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamdet.config import MediaConfig, WebConfig
from streamdet.events import EventChange
from streamdet.sinks.base import RunHealth, SourceHealth
from streamdet.web import WebSink

CLASSES = ("none", "walk", "run")


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def get(
    port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> Response:
    """GET ``path`` from 127.0.0.1:``port``; any status comes back (no exception for 4xx/5xx)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


def change(
    kind: str,
    n: int,
    *,
    source: str = "cam",
    label: str = "walk",
    score: float = 0.8,
    start: float = 1_800_000_000.0,
    end_reason: str | None = None,
) -> EventChange:
    """A ``new``/``update``/``end`` change of event ``run1-{source}-{label}-{n}``."""
    return EventChange(
        type=kind,  # type: ignore[arg-type]
        id=f"run1-{source}-{label}-{n}",
        source=source,
        label=label,
        class_index=CLASSES.index(label),
        score=score,
        peak_score=score,
        threshold=0.5,
        start_time=start,
        end_time=start + 2.0,
        start_frame=10 * n,
        end_frame=10 * n + 20,
        window_first_frame=10 * n,
        window_last_frame=10 * n + 15,
        window_time=start + 2.0,
        end_reason=end_reason if kind == "end" else None,  # type: ignore[arg-type]
    )


def frame(value: int = 0, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """A BGR frame of one grey level with a bright square whose place depends on ``value``."""
    img = np.full((*size, 3), 40, np.uint8)
    x = (value * 17) % (size[1] - 40)
    img[100:140, x : x + 40] = 255
    return img


class FakeHealth:
    """A run's health the test sets: every source online with a fresh frame, by default."""

    def __init__(self, sources: tuple[str, ...]) -> None:
        self.sources = sources
        self.inference_alive = True
        self.status = dict.fromkeys(sources, "online")
        self.age = dict.fromkeys(sources, 0.1)
        self.lock = threading.Lock()

    def __call__(self) -> RunHealth:
        now = time.time()
        with self.lock:
            return RunHealth(
                {
                    s: SourceHealth(
                        status=self.status[s],
                        frames=100,
                        last_frame_time=None if self.age[s] is None else now - self.age[s],
                        stall_timeout_s=5.0,
                        capture_alive=True,
                    )
                    for s in self.sources
                },
                inference_alive=self.inference_alive,
            )


def make_sink(
    sources: tuple[str, ...] = ("cam", "door"),
    *,
    web: Mapping[str, Any] | None = None,
    media: Mapping[str, Any] | None = None,
    health: Callable[[], RunHealth] | None = None,
) -> WebSink:
    """A web output on a free port of 127.0.0.1, fed by hand (close it after the test)."""
    cfg = WebConfig.model_validate({"port": 0, **(web or {})})
    return WebSink(
        cfg,
        sources=sources,
        class_names=CLASSES,
        urls={s: f"rtsp://admin:***@10.0.0.{i}/stream" for i, s in enumerate(sources)},
        model={"name": "tiny", "sha256": "ab" * 32},
        health=health or FakeHealth(sources),
        media=MediaConfig.model_validate(media) if media is not None else None,
    )
