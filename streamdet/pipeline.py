"""The pipeline: the one module that knows every stage and wires them.

sources -> capture threads -> ring buffers -> inference thread -> event tracker -> sinks

One stop event is shared by every thread. Stopping (SIGINT/SIGTERM/SIGHUP, ``--max-seconds``, all
sources ended, or a stage that crashed) sets it, wakes every waiter, ends open events with
``shutdown``, flushes the files and joins each thread with a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from streamdet import kernels
from streamdet.buffer import FrameMeta, RingBuffer
from streamdet.capture import (
    AbandonedThreads,
    Backoff,
    CaptureThread,
    Opener,
    Status,
    StatusChange,
    make_opener,
)
from streamdet.config import RunConfig
from streamdet.errors import StreamdetError
from streamdet.events import ClassRule, EventChange, EventTracker, TrackerSettings, window_span
from streamdet.inference import Engine, InferenceThread, WindowResult
from streamdet.models.weights import Checkpoint
from streamdet.sinks.jsonl import EventLog
from streamdet.sinks.overlay import OverlaySink
from streamdet.sources import SourceKind, check_sources, redact_text, redact_url, source_kind

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 1.5


class StageError(StreamdetError):
    """A pipeline stage failed; the run stopped."""


def tracker_settings(cfg: RunConfig, class_names: tuple[str, ...]) -> TrackerSettings:
    """Event tracker settings from the ``events`` section, checked against the model's classes."""
    ev = cfg.events
    unknown = [label for label in ev.classes if label not in class_names]
    if unknown:
        raise StreamdetError(f"events.classes: unknown class(es) {unknown}; the model has {list(class_names)}")
    background = ev.background if ev.background in class_names else None
    if ev.background is not None and background is None:
        log.warning("events.background %r is not a class of this model: every class can make events",
                    ev.background)
    rules = {
        label: ClassRule(
            enter=o.threshold if o.threshold is not None else ev.threshold,
            exit=o.exit_threshold if o.exit_threshold is not None else ev.exit_threshold,
        )
        for label, o in ev.classes.items()
    }
    return TrackerSettings(
        class_names=class_names,
        default_rule=ClassRule(enter=ev.threshold, exit=ev.exit_threshold),
        rules=rules,
        smoothing=ev.smoothing,
        open_windows=ev.open_windows,
        min_duration_s=ev.min_duration_s,
        background=background,
        update_min_delta=ev.update_min_delta,
        update_min_interval_s=ev.update_min_interval_s,
    )


def _percentile(values: deque[float] | list[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, float), q)) if values else float("nan")


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
    threads_per_worker: int | None = None  # None: the process's torch thread count
    event_counts: dict[str, int] = field(default_factory=dict)
    videos: list[str] = field(default_factory=list)  # annotated videos written (one per source with several)
    videos_failed: list[str] = field(default_factory=list)  # why each video not written whole is gone


class Pipeline:
    """Runs every stage of a configured detector until stopped.

    Args:
        cfg: validated configuration (sources, window, events, sinks).
        checkpoint: the model and its classes and preprocessing.
        engine: inference path from :func:`streamdet.inference.build_engine`.
        max_seconds: stop after this long (None: until the sources end or a signal).
        print_fn: where progress lines go.
        workers: inference workers (see :class:`~streamdet.inference.InferenceThread`;
            ``streamdet.runner.inference_plan`` picks them for ``streamdet run``).
        threads_per_worker: torch threads each worker sets (None: the process's count).
    """

    def __init__(self, cfg: RunConfig, checkpoint: Checkpoint, engine: Engine, *,
                 max_seconds: float | None = None, print_fn: Callable[[str], None] = print,
                 workers: int = 1, threads_per_worker: int | None = None) -> None:
        # Paths only: `streamdet run` has opened the files already (check_sources), and a capture
        # reports a file it cannot open with the same message.
        check_sources([s.url for s in cfg.sources], open_files=False)
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.engine = engine
        self.max_seconds = max_seconds
        self.print = print_fn
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._events_lock = threading.Lock()  # protects the tracker, the log and the counters below
        self.run_id = uuid.uuid4().hex[:12]
        # Event ids start with the run id: several runs append to one log, each counting from 1.
        self.tracker = EventTracker(tracker_settings(cfg, checkpoint.class_names), id_prefix=f"{self.run_id}-")
        self._latency_ms: deque[float] = deque(maxlen=4096)
        self._event_counts: dict[str, int] = {}
        self._events_opened = 0
        self._status: dict[str, str] = {}
        # Source-online bookkeeping: a network camera that cannot be opened at start is retried
        # (it may boot after the detector); the summary names those that never came online.
        self._online_once: set[str] = set()
        self._not_yet_online: dict[str, str] = {}  # source -> why it was offline before that
        self._urls = {s.name: redact_url(s.url) for s in cfg.sources}
        self._stop_reason = ""
        self._told_overlay_behind = False
        self.error: BaseException | None = None

        self.log_sink: EventLog | None = None
        if cfg.sinks.events.path:
            rotate = int(cfg.sinks.events.rotate_mb * 1e6) if cfg.sinks.events.rotate_mb else None
            self.log_sink = EventLog(
                cfg.sinks.events.path,
                {"name": checkpoint.name, "sha256": checkpoint.sha256},
                stride=cfg.window.stride,
                length=cfg.window.length,
                rotate_bytes=rotate,
                run_id=self.run_id,
            )

        self.rings: list[RingBuffer] = []
        self.captures: list[CaptureThread] = []
        # Capture threads stuck in a read that never returns are abandoned; past this many
        # alive at once (all sources together) the run stops with an error.
        self.abandoned = AbandonedThreads()
        overlay_cfg = cfg.sinks.overlay
        wants_overlay = bool(overlay_cfg.video or overlay_cfg.display)
        live: set[str] = set()
        replays: dict[str, Opener] = {}  # the overlay reads replayed files itself
        for s in cfg.sources:
            kind = source_kind(s.url)
            lossless = kind is SourceKind.FILE and not s.realtime
            if not lossless:
                live.add(s.name)
            ring = RingBuffer(s.name, length=cfg.window.length, stride=cfg.window.stride, lossless=lossless,
                              frame_shape=(3, checkpoint.contract.crop, checkpoint.contract.crop))
            self.rings.append(ring)
            opts = s.options
            opener = make_opener(s.url, open_timeout_s=opts.open_timeout_s,
                                 read_timeout_s=opts.read_timeout_s, fps=opts.fps,
                                 decode_threads=1 if lossless else None)
            if lossless:
                replays[s.name] = opener
            self.captures.append(CaptureThread(
                s.name,
                opener,
                ring,
                checkpoint.contract,
                self.stop_event,
                kind=kind,
                realtime=bool(s.realtime),
                on_status=self._on_status,
                # Only live frames go to the overlay; otherwise unused frames skip decoding.
                on_frame=self._on_frame if wants_overlay and not lossless else None,
                on_used=self._wake.set,
                reconnect=opts.reconnect,
                backoff=Backoff(opts.backoff_initial_s, opts.backoff_max_s),
                read_timeout_s=opts.read_timeout_s if kind is not SourceKind.FILE else None,
                stall_timeout_s=opts.stall_timeout_s,
                open_timeout_s=opts.open_timeout_s,
                abandoned=self.abandoned,
            ))
        self.live_sources = frozenset(live)
        self.overlay: OverlaySink | None = None
        if wants_overlay:
            self.overlay = OverlaySink(
                checkpoint.class_names, video_path=overlay_cfg.video, display=overlay_cfg.display,
                sources=[s.name for s in cfg.sources], replays=replays,
                top_k=overlay_cfg.top_k, stop_event=self.stop_event,
            )
        self.inference = InferenceThread(
            self.rings, engine, self._on_results, self.stop_event,
            max_batch=self._batch_size(cfg, engine),
            fixed_batch=not self.live_sources, newest_only=self.live_sources, wake=self._wake,
            device=engine.device, on_source_done=self._on_source_done,
            workers=workers, threads_per_worker=threads_per_worker,
        )
        self._by_name = {c.source_name: c for c in self.captures}

    @staticmethod
    def _batch_size(cfg: RunConfig, engine: Engine) -> int:
        """Windows per forward pass: ``max_batch`` on CUDA, one on a CPU.

        On a CPU batching does not raise per-clip throughput (int8: 22.0 clips/s at batch 1, 21.3
        at batch 4), but a window that arrives as a batch starts waits for the whole batch: with
        8 paced streams, batch 8 gave latency p99 1.7 s and skipped windows, batch 1 0.74 s and
        none (benchmarks/RESULTS.md). A pure replay also runs every batch at one fixed size, so
        its events repeat exactly: on CUDA it pads every pass to ``max_batch``.
        """
        return cfg.model.max_batch if engine.device.type == "cuda" else 1

    # -- callbacks from other threads ---------------------------------------------------------

    def _on_frame(self, source: str, meta: FrameMeta, frame: np.ndarray, used: bool) -> None:
        if self.overlay is not None:
            self.overlay.put_frame(source, meta.index, frame, self._by_name[source].fps or 10.0)

    def _on_status(self, change: StatusChange) -> None:
        self._wake.set()
        with self._events_lock:
            self._status[change.source] = change.status.value
            self._note_first_online(change)
            if self.log_sink and change.status is not Status.ENDED:
                self.log_sink.write_status(change.source, change.status.value, change.reason, change.wall_time)
            if change.status is Status.OFFLINE:
                self._emit(self.tracker.close_source(change.source, "stream_lost"), None)
        if self.overlay is not None:
            self.overlay.set_view(change.source, status=change.status.value)

    def _note_first_online(self, change: StatusChange) -> None:
        """Track whether a source has come online yet; warn once about one that cannot at start.

        Called under ``_events_lock``. Only a source that reconnects goes offline before its first
        open: one that does not (a webcam index, a file, ``reconnect: false``) is an error instead.
        """
        if change.status is Status.ONLINE:
            self._online_once.add(change.source)
        elif (change.status is Status.OFFLINE and change.source not in self._online_once
              and change.source not in self._not_yet_online):
            why = self._with_url(change.source, change.reason)
            self._not_yet_online[change.source] = why
            log.warning("%s: not online at start, retrying with backoff until it comes online: %s",
                        change.source, why)

    def _with_url(self, source: str, reason: str) -> str:
        """``reason`` (redacted) naming the source's redacted URL, which open errors already do."""
        reason = redact_text(reason)
        url = self._urls[source]
        return reason if url in reason else f"{url}: {reason}"

    def _on_source_done(self, source: str) -> None:
        """Every window of an ended source has been scored: end its events."""
        if self.stop_event.is_set():
            return
        with self._events_lock:
            self._emit(self.tracker.close_source(source, "stream_ended"), None)
            if self.log_sink:
                self.log_sink.write_status(source, "offline", "ended", time.time())
        if self.overlay is not None:
            self.overlay.source_ended(source)

    def _on_results(self, results: list[WindowResult]) -> None:
        with self._events_lock:
            for r in results:
                w = r.window
                if self._status.get(w.source) == "offline":
                    # Scored after its source went offline (a window from before the outage):
                    # its events already ended with stream_lost; none may open during the outage.
                    continue
                # an event spans the central stride frames of its windows
                span = window_span(w.first_frame, w.last_frame, w.frame_times, self.cfg.window.stride)
                changes = self.tracker.update(w.source, w.first_frame, w.last_frame, w.first_time,
                                              w.last_time, r.probs, span=span)
                self._emit(changes, r)
                # capture of the window's newest frame -> its lines written
                latency = (time.monotonic() - w.last_monotonic) * 1000.0
                self._latency_ms.append(latency)
                if self.overlay is not None:
                    open_events = [(e.label, e.score) for e in self.tracker.open_events(w.source)]
                    self.overlay.add_result(w.source, w.last_frame, r.probs, r.inference_ms,
                                            latency, open_events)

    def _emit(self, changes: list[EventChange], result: WindowResult | None) -> None:
        for change in changes:
            if change.type == "new":
                self._events_opened += 1
                self._event_counts[change.label] = self._event_counts.get(change.label, 0) + 1
            latency = None if result is None else (time.monotonic() - result.window.last_monotonic) * 1000.0
            if self.log_sink:
                self.log_sink.write_event(change, latency_ms=latency)
            if change.type in ("new", "end"):
                log.info("%s %s %s score %.2f%s", change.type, change.source, change.label, change.score,
                         f" ({change.end_reason})" if change.end_reason else "")

    # -- running ------------------------------------------------------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        if not self.stop_event.is_set():
            self._stop_reason = reason
        self.stop_event.set()
        self._wake.set()

    def run(self) -> RunSummary:
        started = time.monotonic()
        threads: list[threading.Thread] = [*self.captures, self.inference]
        kernels.get()  # load (or compile) the preprocessing kernel now, not in a capture thread's first frame
        if self.overlay is not None:
            self.overlay.start()
        self.inference.start()
        for c in self.captures:
            c.start()
        next_progress = started + self.cfg.progress_interval_s
        last_windows, last_t = 0, started
        try:
            while not self.stop_event.wait(0.05):
                now = time.monotonic()
                crashed = [c for c in self.captures if c.error is not None]
                if crashed:
                    self.error = crashed[0].error
                    self.stop("source failed")
                    break
                self._feed_overlay_rates()
                if self.inference.all_done and self._overlay_caught_up():
                    self.stop("all sources ended")
                    break
                if self.max_seconds is not None and now - started >= self.max_seconds:
                    self.stop(f"--max-seconds {self.max_seconds:g} reached")
                    break
                if now >= next_progress:
                    done = self.inference.windows_done
                    self.print(self._progress_line((done - last_windows) / max(now - last_t, 1e-9)))
                    last_windows, last_t = done, now
                    next_progress = now + self.cfg.progress_interval_s
        finally:
            self.stop(self._stop_reason or "stopping")
            for ring in self.rings:
                ring.close()
            stop_started = time.monotonic()
            deadline = stop_started + JOIN_TIMEOUT_S  # one budget for all: stop within 2 s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            alive = [t.name for t in threads if t.is_alive()]
            if alive:
                log.warning("threads still running after stop (left to exit with the process): %s", alive)
            try:
                with self._events_lock:
                    self._emit(self.tracker.close_all("shutdown"), None)
            except StreamdetError as exc:  # the log cannot be written (disk full): finish the rest
                self.error = self.error or exc
            if self.overlay is not None:
                self.overlay.finish()
                self.overlay.join(JOIN_TIMEOUT_S * 4)
            if self.log_sink:
                try:
                    self.log_sink.close()
                except StreamdetError as exc:
                    self.error = self.error or exc
            log.debug("stopped in %.2f s", time.monotonic() - stop_started)
        # A capture that crashed set the stop event itself: the loop above never saw its error.
        failed = next((c for c in self.captures if c.error is not None), None)
        if self.error is None and failed is not None:
            self.error = failed.error
        if self.inference.error is not None:
            if isinstance(self.inference.error, StreamdetError):  # e.g. the event log it writes to
                raise self.inference.error
            raise StageError(f"inference failed: {type(self.inference.error).__name__}: {self.inference.error}")
        if self.overlay is not None and self.overlay.error is not None:
            err = self.overlay.error
            if isinstance(err, StreamdetError):
                raise err
            raise StageError(f"overlay failed: {type(err).__name__}: {err}")
        if self.error is not None:
            if isinstance(self.error, StreamdetError):
                raise self.error
            where = f"capture of {failed.source_name} failed: " if failed is not None else ""
            raise StageError(f"{where}{type(self.error).__name__}: {self.error}")
        return self.summary(time.monotonic() - started)

    def _feed_overlay_rates(self) -> None:
        """Hand each source's measured capture rate to the overlay's header."""
        if self.overlay is not None:
            for c in self.captures:
                self.overlay.set_view(c.source_name, fps_in=c.stats.fps_in)

    def _overlay_caught_up(self) -> bool:
        """True unless the overlay is still drawing a replay whose windows are all scored: the
        run waits for it (it never holds detection back, so it may end later)."""
        if self.overlay is None or self.overlay.caught_up():
            return True
        if not self._told_overlay_behind:
            self._told_overlay_behind = True
            log.info("every window scored; finishing the annotated video (%d frames drawn so far)",
                     self.overlay.frames_written)
        return False

    def _progress_line(self, windows_per_s: float) -> str:
        parts = []
        for c, ring in zip(self.captures, self.rings, strict=True):
            part = (f"{c.source_name}: {c.stats.fps_in:.1f} fps, skipped {c.stats.frames_skipped} frames/"
                    f"{ring.windows_skipped} windows")
            if c.stats.reconnects or c.stats.stalls or c.stats.offline_since is not None:
                part += (f", {c.stats.reconnects} reconnects, {c.stats.stalls} stalls, "
                         f"{c.stats.offline_total():.1f} s offline")
            parts.append(part)
        inf = self.inference.inference_ms
        with self._events_lock:
            lat = list(self._latency_ms)
        return (f"[progress] {'; '.join(parts)} | {windows_per_s:.1f} windows/s | inference ms p50 "
                f"{format_ms(_percentile(inf, 50))} p99 {format_ms(_percentile(inf, 99))} | latency ms p50 "
                f"{format_ms(_percentile(lat, 50))} p99 {format_ms(_percentile(lat, 99))} | "
                f"events {self._events_opened}")

    def _never_online(self, source: str) -> str | None:
        """Why ``source`` never came online in this run; None if it did (under ``_events_lock``)."""
        if source in self._online_once:
            return None
        pending = "still opening when the run stopped"
        return self._not_yet_online.get(source) or self._with_url(source, pending)

    def summary(self, seconds: float) -> RunSummary:
        sources = []
        with self._events_lock:
            never_online = {c.source_name: self._never_online(c.source_name) for c in self.captures}
        for c, ring in zip(self.captures, self.rings, strict=True):
            sources.append(SourceSummary(
                c.source_name, c.stats.frames_read, c.stats.frames_used, c.stats.frames_skipped,
                ring.windows_taken, ring.windows_skipped, c.stats.reconnects, c.stats.offline_total(),
                self._status.get(c.source_name, "never online"), c.stats.stalls,
                never_online[c.source_name],
            ))
        inf = self.inference.inference_ms
        lat = list(self._latency_ms)
        return RunSummary(
            run_id=self.run_id, seconds=seconds, sources=sources, windows=self.inference.windows_done,
            events=self._events_opened, lines=self.log_sink.lines_written if self.log_sink else 0,
            inference_ms_p50=_percentile(inf, 50), inference_ms_p99=_percentile(inf, 99),
            latency_ms_p50=_percentile(lat, 50), latency_ms_p99=_percentile(lat, 99),
            precision=self.engine.precision, device=str(self.engine.device),
            workers=self.inference.workers, threads_per_worker=self.inference.threads_per_worker,
            event_counts=dict(self._event_counts),
            videos=list(self.overlay.video_files) if self.overlay is not None else [],
            videos_failed=list(self.overlay.failed_videos) if self.overlay is not None else [],
        )
