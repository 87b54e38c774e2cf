"""Prometheus metrics of a run, in a registry of their own (never the process-wide default, so
two runs in one process, or a library user's own metrics, never collide).

Two kinds of series:

- observed as messages come: ``streamdet_inference_seconds`` and
  ``streamdet_event_latency_seconds`` (histograms), ``streamdet_events_total{source,label,type}``;
- read at scrape time from the run's figures (:class:`~streamdet.sinks.base.RunStats`, the
  run's health view and the event store), so they are never stale or double-counted:
  ``streamdet_source_up``, ``streamdet_frames_total``, ``streamdet_frames_skipped_total``,
  ``streamdet_reconnects_total``, ``streamdet_last_frame_timestamp_seconds``,
  ``streamdet_events_open``, ``streamdet_windows_total``, ``streamdet_windows_gated_total``,
  ``streamdet_output_delivered_total``,
  ``streamdet_output_dropped_total``.

Every series of a known source, class and event type exists at zero from the start, so a rate
or an alert works before the first event; an output's series appear with the first figures,
half a second into the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamdet import __version__
from streamdet.sinks.base import RunHealth, RunStats

EVENT_TYPES = ("new", "update", "end")
# Seconds: from 1 ms (a tiny model's window) to 10 s (a CPU far behind).
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RunCollector(Collector):
    """The series read from the run's figures at scrape time (see the module docstring)."""

    def __init__(
        self,
        sources: Sequence[str],
        stats: Callable[[], RunStats | None],
        health: Callable[[], RunHealth | None],
        open_counts: Callable[[], Mapping[str, int]],
    ) -> None:
        self.sources = list(sources)
        self.stats = stats
        self.health = health
        self.open_counts = open_counts

    def collect(self) -> Iterator[Metric]:
        stats, health, open_now = self.stats(), self.health(), self.open_counts()
        up = GaugeMetricFamily(
            "streamdet_source_up", "1 while the source is online", labels=["source"]
        )
        frames = CounterMetricFamily(
            "streamdet_frames", "Frames read from the source", labels=["source"]
        )
        skipped = CounterMetricFamily(
            "streamdet_frames_skipped",
            "Frames read but not scored because inference was behind",
            labels=["source"],
        )
        reconnects = CounterMetricFamily(
            "streamdet_reconnects", "Times the source was reopened", labels=["source"]
        )
        last = GaugeMetricFamily(
            "streamdet_last_frame_timestamp_seconds",
            "When the newest frame was read (UTC epoch s; 0 before the first)",
            labels=["source"],
        )
        opened = GaugeMetricFamily("streamdet_events_open", "Events in progress", labels=["source"])
        windows = CounterMetricFamily(
            "streamdet_windows", "Windows taken from the source's ring", labels=["source"]
        )
        gated = CounterMetricFamily(
            "streamdet_windows_gated",
            "Windows not scored because the scene was still (motion gating; 0 when off)",
            labels=["source"],
        )
        for name in self.sources:
            s = stats.sources.get(name) if stats else None
            h = health.sources.get(name) if health else None
            status = h.status if h else (s.status if s else "never online")
            up.add_metric([name], 1.0 if status == "online" else 0.0)
            frames.add_metric([name], float(h.frames if h else 0))
            skipped.add_metric([name], float(s.frames_skipped if s else 0))
            reconnects.add_metric([name], float(s.reconnects if s else 0))
            last.add_metric([name], (h.last_frame_time or 0.0) if h else 0.0)
            opened.add_metric([name], float(open_now.get(name, 0)))
            windows.add_metric([name], float(s.windows if s else 0))
            gated.add_metric([name], float(s.windows_gated or 0) if s else 0.0)
        delivered = CounterMetricFamily(
            "streamdet_output_delivered", "Messages an output handled", labels=["output"]
        )
        dropped = CounterMetricFamily(
            "streamdet_output_dropped",
            "Messages an output lost (its queue was full, or it failed)",
            labels=["output"],
        )
        for output, o in (stats.outputs if stats else {}).items():
            delivered.add_metric([output], float(o.delivered))
            dropped.add_metric([output], float(o.dropped))
        yield from (up, frames, skipped, reconnects, last, opened, windows, gated)
        yield from (delivered, dropped)


class Metrics:
    """The run's Prometheus registry.

    Args:
        sources: every source's name.
        class_names: the model's classes (the labels of ``streamdet_events_total``).
        model: ``{"name": ..., "sha256": ...}`` of the model in use.
        stats: the newest run figures (None before the first).
        health: the run's health now (None: unknown).
        open_counts: events in progress per source.
    """

    def __init__(
        self,
        sources: Sequence[str],
        class_names: Sequence[str],
        model: Mapping[str, str],
        *,
        stats: Callable[[], RunStats | None],
        health: Callable[[], RunHealth | None],
        open_counts: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.inference_seconds = Histogram(
            "streamdet_inference_seconds",
            "Forward pass time per window",
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.event_latency_seconds = Histogram(
            "streamdet_event_latency_seconds",
            "From the newest frame of the window that opened an event to its new line written",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.events_total = Counter(
            "streamdet_events",
            "Event lines by source, label and type (new, update, end)",
            ["source", "label", "type"],
            registry=self.registry,
        )
        for source in sources:
            for label in class_names:
                for kind in EVENT_TYPES:
                    self.events_total.labels(source, label, kind)  # exists at 0 from the start
        build = Gauge(
            "streamdet_build_info",
            "1, labelled with the version and the model in use",
            ["version", "model", "sha256"],
            registry=self.registry,
        )
        build.labels(__version__, model.get("name", ""), model.get("sha256", "")).set(1)
        self.registry.register(_RunCollector(sources, stats, health, open_counts))

    def observe_scores(self, inference_ms: float) -> None:
        self.inference_seconds.observe(max(0.0, inference_ms) / 1000.0)

    def observe_event(self, source: str, label: str, kind: str, latency_ms: float | None) -> None:
        self.events_total.labels(source, label, kind).inc()
        if kind == "new" and latency_ms is not None:
            self.event_latency_seconds.observe(max(0.0, latency_ms) / 1000.0)

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)
