"""The web output: the event stage's messages in, the page, the API, health and metrics out.

:class:`WebSink` is a :class:`~streamdet.sinks.base.Sink`: its thread (a
:class:`~streamdet.sinks.base.SinkWorker`) keeps the event store, the Prometheus series and
each source's live picture up to date, and the :class:`~streamdet.web.server.WebServer`'s
threads read them. Drawing and encoding happen on the output's thread, at most ``mjpeg_fps``
frames a second per source, once for every viewer; a frame that finds the output busy is
dropped by its worker, never waited for, so viewers cannot slow detection.
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from streamdet.config import MediaConfig, WebConfig
from streamdet.sinks.base import (
    BaseSink,
    EventMessage,
    FrameMessage,
    MediaMessage,
    RunHealth,
    RunStats,
    ScoresMessage,
    StatusMessage,
)
from streamdet.sinks.overlay import SourceView
from streamdet.web.api import CLIP_GRACE_S, EventStore
from streamdet.web.live import LiveFrames, encode_live
from streamdet.web.metrics import Metrics
from streamdet.web.server import WebServer, WebView, check_bind

_MEDIA_SUFFIXES = {".jpg", ".jpeg", ".mp4"}


def page_html() -> bytes:
    """The page (``streamdet/web/page.html``, package data)."""
    return resources.files("streamdet.web").joinpath("page.html").read_bytes()


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 2)


def _clean(obj: Any) -> Any:
    """``obj`` with every nan or inf as None (JSON has neither)."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, Mapping):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


class WebSink(BaseSink):
    """The live page, events API, ``/healthz``, ``/readyz`` and ``/metrics`` of a run.

    Binds at once (a port in use, or an open page on the network, is a StreamdetError before
    the run starts) and serves until :meth:`close`.

    Args:
        cfg: the ``web`` section.
        sources: every source's name, in config order.
        class_names: the model's classes, in score order.
        urls: each source's URL, redacted.
        model: ``{"name": ..., "sha256": ...}`` of the model in use.
        health: the run's health now, callable from any thread (None: unknown, and
            ``/readyz`` answers 503).
        media: the ``media`` section (None: no snapshots or clips are made).
    """

    name = "web"

    def __init__(
        self,
        cfg: WebConfig,
        *,
        sources: Sequence[str],
        class_names: Sequence[str],
        urls: Mapping[str, str],
        model: Mapping[str, str],
        health: Callable[[], RunHealth] | None = None,
        media: MediaConfig | None = None,
    ) -> None:
        token = cfg.token.get_secret_value() if cfg.token is not None else None
        check_bind(cfg.host, token, cfg.auth)
        self.cfg = cfg
        self.class_names = list(class_names)
        self.sources = list(sources)
        self.urls = dict(urls)
        self.health = health
        self.media_dir = Path(media.dir) if media is not None else None
        clips = media is not None and media.clips.enabled
        self.store = EventStore(
            clips=clips,
            clip_wait_s=(media.clips.post_capture_s if media else 0.0) + CLIP_GRACE_S,
        )
        self.live = LiveFrames(self.sources, cfg.mjpeg_fps)
        self._stats: RunStats | None = None  # replaced whole (atomic), read by request threads
        self._statuses: dict[str, str] = {}  # likewise: replaced whole
        # Used by the output's thread only.
        self._views = {s: SourceView(status="starting") for s in self.sources}
        self.frames_encoded = 0
        self.metrics = Metrics(
            self.sources,
            self.class_names,
            model,
            stats=lambda: self._stats,
            health=self._health,
            open_counts=self.store.open_counts,
        )
        view = WebView(
            sources=frozenset(self.sources),
            store=self.store,
            live=self.live,
            metrics=self.metrics,
            sources_json=self.sources_json,
            stats_json=self.stats_json,
            liveness=self.liveness,
            readiness=self.readiness,
            media_file=self.media_file,
            page=page_html(),
            stale_after_s=max(2.0, 3.0 / cfg.mjpeg_fps),
        )
        self.server = WebServer(
            cfg.host,
            cfg.port,
            view,
            token=token,
            public=frozenset(cfg.public),
            max_clients=cfg.max_clients,
        )
        self.url = self.server.url
        self.server.start()

    # -- the sink protocol (the output's thread) -----------------------------------------------

    def frame_sources(self) -> Collection[str]:
        return self.sources

    def wants_frame(self, source: str, used: bool) -> bool:
        """Only a frame due on the page (``mjpeg_fps``): the rest need no conversion."""
        return self.live.due(source)

    def on_event(self, msg: EventMessage) -> None:
        c = msg.change
        self.store.apply(c, msg.latency_ms, time.time())
        if msg.line is not None:
            self.store.add_media(msg.line)  # an end line may name the event's snapshot
        self.metrics.observe_event(c.source, c.label, c.type, msg.latency_ms)
        self.live.changed()

    def on_media(self, msg: MediaMessage) -> None:
        if self.store.add_media(msg.line):
            self.live.changed()

    def on_status(self, msg: StatusMessage) -> None:
        self._statuses = {**self._statuses, msg.source: msg.status}
        if msg.source in self._views:
            self._views[msg.source].status = msg.status
        self.live.changed()

    def on_scores(self, msg: ScoresMessage) -> None:
        self.metrics.observe_scores(msg.inference_ms)
        view = self._views.get(msg.source)
        if view is not None:
            view.probs = msg.probs
            view.window_last_frame = msg.last_frame
            view.open_events = list(msg.open_events)
            view.inference_ms = msg.inference_ms
            view.latency_ms = msg.latency_ms

    def on_stats(self, stats: RunStats) -> None:
        self._stats = stats
        for name, s in stats.sources.items():
            if name in self._views:
                self._views[name].fps_in = s.fps_in

    def on_frame(self, msg: FrameMessage) -> None:
        if not self.live.due(msg.source):
            return
        view = self._views.get(msg.source, SourceView())
        jpeg = encode_live(msg.frame, self.class_names, view, msg.source)
        self.live.put(msg.source, jpeg, time.time())
        self.frames_encoded += 1

    def progress_text(self) -> str:
        return f"{self.server.connections} connection(s)"

    def summary_lines(self) -> list[str]:
        return [f"web page served at {self.url}"]

    def close(self) -> None:
        self.server.stop()

    # -- what the server shows (request threads) -----------------------------------------------

    def _health(self) -> RunHealth | None:
        return self.health() if self.health is not None else None

    def sources_json(self) -> list[dict[str, Any]]:
        stats, health, now = self._stats, self._health(), time.time()
        out = []
        for name in self.sources:
            s = stats.sources.get(name) if stats else None
            h = health.sources.get(name) if health else None
            frame = self.live.latest(name)
            out.append(
                {
                    "name": name,
                    "url": self.urls.get(name, ""),  # redacted by the pipeline
                    "status": (h.status if h else None) or self._statuses.get(name, "starting"),
                    "fps": _finite(s.fps_in) if s else None,
                    "frames": h.frames if h else None,
                    "frames_skipped": s.frames_skipped if s else None,
                    "reconnects": s.reconnects if s else None,
                    "latency_ms_p50": _finite(s.latency_ms_p50) if s else None,
                    "latency_ms_p99": _finite(s.latency_ms_p99) if s else None,
                    "last_frame_age_s": (
                        round(now - h.last_frame_time, 2) if h and h.last_frame_time else None
                    ),
                    "live_frame_seq": frame.seq if frame else None,
                    "latest_url": f"/api/sources/{name}/latest.jpg",
                    "stream_url": f"/api/sources/{name}/stream.mjpeg",
                }
            )
        return out

    def stats_json(self) -> dict[str, Any]:
        stats = self._stats
        if stats is None:
            return {"sources": {}, "outputs": {}}
        return _clean(asdict(stats))

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: the process answers, inference and every capture thread run."""
        health = self._health()
        if health is None:
            return True, {"status": "ok"}
        dead = [name for name, h in health.sources.items() if not h.capture_alive]
        ok = health.inference_alive and not dead
        return ok, {
            "status": "ok" if ok else "failing",
            "inference_alive": health.inference_alive,
            "captures_stopped": dead,
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: every source read a frame within its ``stall_timeout_s`` and inference
        is alive; else why not, per source."""
        health, now = self._health(), time.time()
        if health is None:
            return False, {"ready": False, "why": "the run's health is unknown"}
        sources: dict[str, dict[str, Any]] = {}
        for name in self.sources:
            h = health.sources.get(name)
            if h is None:
                sources[name] = {"ready": False, "why": "not started"}
                continue
            age = None if h.last_frame_time is None else now - h.last_frame_time
            why = None
            if h.status != "online":
                why = f"source is {h.status}"
            elif age is None:
                why = "no frame yet"
            elif age > h.stall_timeout_s:
                why = f"no frame for {age:.1f} s (stall_timeout_s {h.stall_timeout_s:g})"
            sources[name] = {
                "ready": why is None,
                "status": h.status,
                "last_frame_age_s": None if age is None else round(age, 2),
                **({"why": why} if why else {}),
            }
        ready = health.inference_alive and all(s["ready"] for s in sources.values())
        details = {"ready": ready, "inference_alive": health.inference_alive, "sources": sources}
        return ready, details

    def media_file(self, path: str) -> Path | None:
        """The regular file a media line names (relative: to the working folder, else to
        ``media.dir``), or None. The path comes from this run's own lines, never from a URL."""
        raw = Path(path)
        if raw.suffix.lower() not in _MEDIA_SUFFIXES:
            return None
        candidates = [raw]
        if not raw.is_absolute() and self.media_dir is not None:
            candidates.append(self.media_dir / raw)
        for candidate in candidates:
            try:
                if stat.S_ISREG(os.stat(candidate).st_mode):
                    return candidate
            except OSError:
                continue
        return None
