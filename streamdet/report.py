"""What a run reports: its figures while it runs (progress lines) and at the end (the summary).

:class:`RunReport` reads the stages' counters (captures, rings, inference, the event router and
its outputs) and is the one place that turns them into text: :meth:`RunReport.progress_line`,
:meth:`RunReport.summary` and :func:`format_summary`.

Example:
    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), format_ms(float("nan"))
    (2.5, '-')
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from streamdet.buffer import RingBuffer
    from streamdet.inference import Engine, InferenceThread
    from streamdet.router import EventRouter
    from streamdet.sinks.base import RunStats
    from streamdet.sources.capture import CaptureThread


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation); nan when there is no value."""
    array = np.fromiter(values, float)
    return float(np.percentile(array, q)) if array.size else float("nan")


def format_ms(value: float, digits: int = 0) -> str:
    """A time in ms for a progress or summary line; '-' while none has been measured (nan)."""
    return "-" if value != value else f"{value:.{digits}f}"


@dataclass
class SourceSummary:
    name: str
    frames_read: int = 0
    frames_used: int = 0
    frames_skipped: int = 0
    windows: int = 0
    windows_skipped: int = 0
    reconnects: int = 0
    offline_s: float = 0.0
    status: str = "online"
    stalls: int = 0
    never_online: str | None = None  # why, for a source that never came online during the run
    windows_gated: int | None = None  # of ``windows``, not scored (motion gating); None: not gated


@dataclass
class OutputSummary:
    """One output of the event stage: messages delivered and dropped, and what it says."""

    name: str
    delivered: int
    dropped: int
    failed: bool
    lines: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    """What a run did; printed at exit."""

    run_id: str
    seconds: float
    sources: list[SourceSummary]
    windows: int
    events: int
    lines: int
    inference_ms_p50: float
    inference_ms_p99: float
    latency_ms_p50: float
    latency_ms_p99: float
    precision: str
    device: str
    workers: int = 1
    windows_gated: int | None = None  # of ``windows``, not scored (motion gating); None: gating off
    threads_per_worker: int | None = None  # None: the process's torch thread count
    event_counts: dict[str, int] = field(default_factory=dict)
    outputs: list[OutputSummary] = field(default_factory=list)
    event_log: str | None = None
    videos: list[str] = field(
        default_factory=list
    )  # annotated videos written (one per source with several)
    videos_failed: list[str] = field(
        default_factory=list
    )  # why each video not written whole is gone


class RunReport:
    """Reads the stages' counters for progress lines and the summary."""

    def __init__(
        self,
        run_id: str,
        captures: Sequence[CaptureThread],
        rings: Sequence[RingBuffer],
        inference: InferenceThread,
        router: EventRouter,
        engine: Engine,
        event_log: str | None,
    ) -> None:
        self.run_id = run_id
        self.captures = list(captures)
        self.rings = list(rings)
        self.inference = inference
        self.router = router
        self.engine = engine
        self.event_log = event_log
        self._last_windows, self._last_t = 0, time.monotonic()

    def run_stats(self) -> RunStats:
        """The figures every output gets with ``on_stats``."""
        from streamdet.sinks.base import OutputStats, RunStats, SourceStats

        sources = {}
        for c, ring in zip(self.captures, self.rings, strict=True):
            lat = self.router.latencies(c.source_name)
            sources[c.source_name] = SourceStats(
                c.stats.fps_in,
                c.stats.frames_skipped,
                ring.windows_taken,
                ring.windows_skipped,
                c.stats.reconnects,
                self.router.status(c.source_name),
                percentile(lat, 50),
                percentile(lat, 99),
                self._gated(c.source_name),
            )
        inf, lat = self.inference.inference_ms, self.router.latencies()
        return RunStats(
            sources,
            percentile(inf, 50),
            percentile(inf, 99),
            percentile(lat, 50),
            percentile(lat, 99),
            self.router.events_opened,
            {
                name: OutputStats(delivered, dropped, failed)
                for name, delivered, dropped, failed in self.router.output_counts()
            },
        )

    def _gated(self, source: str) -> int | None:
        """Windows of ``source`` gated so far; None when it is not gated."""
        gate = self.inference.gate
        if gate is None or source not in gate.settings:
            return None
        return gate.gated.get(source, 0)

    def progress_line(self) -> str:
        """One ``[progress]`` line; the window rate is since the previous line."""
        now, done = time.monotonic(), self.inference.windows_done
        windows_per_s = (done - self._last_windows) / max(now - self._last_t, 1e-9)
        self._last_windows, self._last_t = done, now
        parts = []
        for c, ring in zip(self.captures, self.rings, strict=True):
            part = (
                f"{c.source_name}: {c.stats.fps_in:.1f} fps, skipped {c.stats.frames_skipped} frames/"
                f"{ring.windows_skipped} windows"
            )
            if c.stats.reconnects or c.stats.stalls or c.stats.offline_since is not None:
                part += (
                    f", {c.stats.reconnects} reconnects, {c.stats.stalls} stalls, "
                    f"{c.stats.offline_total():.1f} s offline"
                )
            if (gated := self._gated(c.source_name)) is not None:
                part += f", {gated} windows gated"
            parts.append(part)
        inf, lat = self.inference.inference_ms, self.router.latencies()
        line = (
            f"[progress] {'; '.join(parts)} | {windows_per_s:.1f} windows/s | inference ms p50 "
            f"{format_ms(percentile(inf, 50))} p99 {format_ms(percentile(inf, 99))} | latency ms p50 "
            f"{format_ms(percentile(lat, 50))} p99 {format_ms(percentile(lat, 99))} | "
            f"events {self.router.events_opened}"
        )
        for w in self.router.workers:
            if text := w.progress_text():
                line += f" | {w.sink.name}: {text}"
        drops = [
            f"{name} {dropped}" for name, _, dropped, _ in self.router.output_counts() if dropped
        ]
        return line + (f" | output drops: {', '.join(drops)}" if drops else "")

    def summary(self, seconds: float) -> RunSummary:
        sources = [
            SourceSummary(
                c.source_name,
                c.stats.frames_read,
                c.stats.frames_used,
                c.stats.frames_skipped,
                ring.windows_taken,
                ring.windows_skipped,
                c.stats.reconnects,
                c.stats.offline_total(),
                self.router.status(c.source_name),
                c.stats.stalls,
                self.router.never_online(c.source_name),
                self._gated(c.source_name),
            )
            for c, ring in zip(self.captures, self.rings, strict=True)
        ]
        outputs = [
            OutputSummary(
                w.sink.name, w.delivered, w.dropped, w.error is not None, _summary_lines(w.sink)
            )
            for w in self.router.workers
        ]
        inf, lat = self.inference.inference_ms, self.router.latencies()
        gate = self.inference.gate
        return RunSummary(
            run_id=self.run_id,
            seconds=seconds,
            sources=sources,
            windows=self.inference.windows_done,
            events=self.router.events_opened,
            lines=self.router.lines_written,
            inference_ms_p50=percentile(inf, 50),
            inference_ms_p99=percentile(inf, 99),
            latency_ms_p50=percentile(lat, 50),
            latency_ms_p99=percentile(lat, 99),
            precision=self.engine.precision,
            device=str(self.engine.device),
            workers=self.inference.workers,
            windows_gated=None if gate is None else sum(gate.gated.values()),
            threads_per_worker=self.inference.threads_per_worker,
            event_counts=dict(self.router.event_counts),
            outputs=outputs,
            event_log=self.event_log,
        )


def _gated_text(windows: int, gated: int | None) -> str:
    """'12 windows' without gating, '3 windows scored, 9 gated' with it."""
    if gated is None:
        return f"{windows} windows"
    return f"{windows - gated} windows scored, {gated} gated"


def _summary_lines(sink: object) -> list[str]:
    try:
        return list(sink.summary_lines())  # type: ignore[attr-defined]
    except Exception as exc:  # an output that cannot describe itself does not spoil the summary
        return [f"{getattr(sink, 'name', 'output')}: no summary ({type(exc).__name__}: {exc})"]


def format_summary(summary: RunSummary) -> str:
    """The ``[summary]`` lines printed at the end of ``streamdet run``."""
    lines = [
        f"[summary] run {summary.run_id}: {summary.seconds:.1f} s, "
        f"{_gated_text(summary.windows, summary.windows_gated)}, "
        f"{summary.events} events, {summary.lines} log lines, {summary.precision} on {summary.device}"
        f"{_workers_text(summary.workers, summary.threads_per_worker)}",
        f"[summary] inference ms p50 {format_ms(summary.inference_ms_p50, 1)} "
        f"p99 {format_ms(summary.inference_ms_p99, 1)}; "
        f"latency ms p50 {format_ms(summary.latency_ms_p50, 1)} p99 {format_ms(summary.latency_ms_p99, 1)}",
    ]
    for s in summary.sources:
        lines.append(
            f"[summary] {s.name}: {s.frames_read} frames read, {s.frames_used} used, "
            f"{s.frames_skipped} skipped, {_gated_text(s.windows, s.windows_gated)} "
            f"({s.windows_skipped} skipped), "
            f"{s.reconnects} reconnects, {s.stalls} stalls, {s.offline_s:.1f} s offline"
        )
    never_online = [f"{s.name} ({s.never_online})" for s in summary.sources if s.never_online]
    if never_online:
        lines.append(f"[summary] never online: {', '.join(never_online)}")
    if summary.event_counts:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.event_counts.items()))
        lines.append(f"[summary] events by label: {counts}")
    if summary.event_log:
        lines.append(f"[summary] event log: {summary.event_log}")
    for out in summary.outputs:
        lines += [f"[summary] {line}" for line in out.lines]
        if out.dropped or out.failed:
            lines.append(
                f"[summary] output {out.name}: {out.delivered} messages delivered, "
                f"{out.dropped} dropped{', failed' if out.failed else ''}"
            )
    return "\n".join(lines)


def _workers_text(workers: int, threads: int | None) -> str:
    """' (2 inference workers on 1 torch thread each)', or '' for one worker."""
    if workers < 2:
        return ""
    each = f" on {threads} torch thread{'s' if threads > 1 else ''} each" if threads else ""
    return f" ({workers} inference workers{each})"
