"""The pipeline: the one module that knows every stage, and wires them.

sources -> capture threads -> ring buffers -> inference -> event router -> log and outputs

:class:`Pipeline` builds the stages from a config, starts them, stops them and joins them; the
event stage is :class:`~streamdet.router.EventRouter`, the figures and the summary are
:class:`~streamdet.report.RunReport`'s. One stop event is shared by every thread. Stopping
(SIGINT/SIGTERM/SIGHUP, ``--max-seconds``, all sources ended, or a stage that crashed) sets it,
wakes every waiter, ends open events with ``shutdown``, flushes the files and joins each thread
with a timeout.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from streamdet import kernels
from streamdet.buffer import FrameMeta, RingBuffer
from streamdet.config import RunConfig, SourceConfig
from streamdet.device_buffer import DeviceRingBuffer
from streamdet.errors import ConfigError, StreamdetError
from streamdet.events import ClassRule, TrackerSettings
from streamdet.gating import ActivityMeter, Gate, GateSettings
from streamdet.inference import Engine, InferenceThread
from streamdet.models.weights import Checkpoint
from streamdet.preprocess_torch import preprocess_tensor
from streamdet.redaction import redact_url
from streamdet.report import RunReport, RunSummary
from streamdet.router import EventRouter
from streamdet.sinks.base import RunHealth, Sink, SourceHealth
from streamdet.sinks.configured import SinkContext, build_sinks
from streamdet.sinks.jsonl import EventLog
from streamdet.sinks.overlay import OverlaySink
from streamdet.sources.backoff import Backoff
from streamdet.sources.capture import CaptureThread, Opener, make_opener
from streamdet.sources.decoding import DevicePath, device_opener, resolve_decode, to_host_bgr
from streamdet.sources.opening import SourceKind, check_sources, source_kind
from streamdet.sources.pacing import Pacing, pacing_of
from streamdet.sources.packets import PacketRing
from streamdet.sources.watchdog import AbandonedThreads

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 1.5
STATS_INTERVAL_S = 0.5  # how often the outputs get the sources' figures (the overlay's header)
# Encoded packets kept per live source for event clips: the pre-roll, plus this margin for an
# event to be detected and its clip started (windows to open it, inference), plus the keyframe
# at or before it; the byte bound holds whatever the camera's bitrate or keyframe interval.
PACKET_RING_MARGIN_S = 20.0
PACKET_RING_MAX_BYTES = 64 * 1024 * 1024
# A source let go (release) is closed before release returns, so that the node taking it never
# opens a second connection to a camera: its capture ends within a read, or after
# SESSION_JOIN_S (1 s) when the read is stuck (that connection is dead anyway).
RELEASE_JOIN_S = 2.0


class StageError(StreamdetError):
    """A pipeline stage failed; the run stopped."""


def tracker_settings(cfg: RunConfig, class_names: tuple[str, ...]) -> TrackerSettings:
    """Event tracker settings from the ``events`` section, checked against the model's classes."""
    ev = cfg.events
    unknown = [label for label in ev.classes if label not in class_names]
    if unknown:
        raise StreamdetError(
            f"events.classes: unknown class(es) {unknown}; the model has {list(class_names)}"
        )
    background = ev.background if ev.background in class_names else None
    if ev.background is not None and background is None:
        log.warning(
            "events.background %r is not a class of this model: every class can make events",
            ev.background,
        )
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


def build_event_log(cfg: RunConfig, checkpoint: Checkpoint, run_id: str) -> EventLog | None:
    """The JSONL event log of ``sinks.events`` (None when its path is null)."""
    if not cfg.sinks.events.path:
        return None
    rotate = int(cfg.sinks.events.rotate_mb * 1e6) if cfg.sinks.events.rotate_mb else None
    return EventLog(
        cfg.sinks.events.path,
        {"name": checkpoint.name, "sha256": checkpoint.sha256},
        stride=cfg.window.stride,
        length=cfg.window.length,
        rotate_bytes=rotate,
        run_id=run_id,
    )


def build_gate(cfg: RunConfig, class_names: tuple[str, ...]) -> Gate | None:
    """The motion gate of the sources whose gating is enabled; None when none is.

    Raises:
        ConfigError: gating is on but the model has no ``events.background`` class.
    """
    settings = {
        s.name: GateSettings(
            sensitivity=g.sensitivity,
            local_margin=g.local_margin,
            global_margin=g.global_margin,
            lag_frames=g.lag_frames,
            keepalive_s=g.keepalive_s,
            keepalive_max_s=g.keepalive_max_s,
            hangover_frames=g.hangover_frames,
        )
        for s in cfg.sources
        if (g := cfg.gating_of(s)).enabled
    }
    if not settings:
        return None
    background = cfg.events.background
    if background not in class_names:
        raise ConfigError(
            f"window.gating needs events.background to name a class of the model, but "
            f"{background!r} is not one of {list(class_names)}"
        )
    probs = np.zeros(len(class_names), np.float32)
    probs[class_names.index(background)] = 1.0
    return Gate(settings, probs)


def window_phases(live: list[str], stride: int) -> dict[str, int]:
    """Each live source's window phase (see :class:`~streamdet.buffer.RingBuffer`), spread evenly
    over the stride in the sources' order.

    Cameras started together deliver their windows in step: with 14 cameras at stride 8, every
    window of all 14 was ready in the same instant, and the last of a burst waited for the
    forward passes of all before it (latency p99 over a second at 40% inference load). Replays
    keep phase 0, so a file's windows, and its events, do not depend on what else runs.

    Example:
        >>> window_phases(["a", "b", "c", "d"], 8)
        {'a': 0, 'b': 2, 'c': 4, 'd': 6}
    """
    return {name: k * stride // len(live) for k, name in enumerate(live)}


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
        sinks: more outputs of the event stage, beside those the config names.
        event_log: where the event lines go instead of ``sinks.events`` (a cluster node hands
            them to the driver, ``streamdet.distributed``); None: the configured log.
        device_path: frames as torch tensors on a device, in device rings
            (:mod:`streamdet.sources.decoding`), in place of what the config's ``decode``
            resolves to; the tests run the GPU path on ``cpu`` with it.
    """

    def __init__(
        self,
        cfg: RunConfig,
        checkpoint: Checkpoint,
        engine: Engine,
        *,
        max_seconds: float | None = None,
        print_fn: Callable[[str], None] = print,
        workers: int = 1,
        threads_per_worker: int | None = None,
        sinks: tuple[Sink, ...] = (),
        event_log: EventLog | None = None,
        device_path: DevicePath | None = None,
    ) -> None:
        # Paths only: `streamdet run` has opened the files already (check_sources), and a capture
        # reports a file it cannot open with the same message.
        check_sources([s.url for s in cfg.sources], open_files=False)
        self.cfg = cfg
        self.engine = engine
        self.max_seconds = max_seconds
        self.print = print_fn
        self.stop_event = threading.Event()
        # Each capture stops on its own event, so that one source can be let go (release); a
        # stop sets them all.
        self._capture_stops = {s.name: threading.Event() for s in cfg.sources}
        self._released: set[str] = set()  # under _release_lock
        self._release_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_reason = ""
        self._told_outputs_behind = False
        self.error: BaseException | None = None
        self.run_id = uuid.uuid4().hex[:12]
        # Capture threads stuck in a read that never returns are abandoned; past this many
        # alive at once (all sources together) the run stops with an error.
        self.abandoned = AbandonedThreads()

        # Decided once per source: how its capture, ring, the scheduler and the overlay treat it.
        self.pacing = {s.name: pacing_of(s) for s in cfg.sources}
        self.device_path = device_path or resolve_decode(cfg.decode)
        if self.device_path is not None:
            log.info("decode: %s", self.device_path.describe())
        self.packet_rings = self._packet_rings(cfg)
        openers = {
            s.name: self._opener(
                s,
                self.pacing[s.name].decode_threads(len(cfg.sources)),
                keep_packets=s.name in self.packet_rings,
            )
            for s in cfg.sources
        }
        # A replay is drawn from the overlay's own read of the file (with the same opener).
        replays = {name: openers[name] for name, p in self.pacing.items() if p is Pacing.REPLAY}
        self.overlay = self._build_overlay(cfg, checkpoint, replays)
        urls = {s.name: redact_url(s.url) for s in cfg.sources}
        configured = build_sinks(
            cfg,
            SinkContext(
                run_id=self.run_id,
                class_names=checkpoint.class_names,
                sources=tuple(s.name for s in cfg.sources),
                urls=urls,
                model={"name": checkpoint.name, "sha256": checkpoint.sha256},
                stop_event=self.stop_event,
                record_media=lambda fields: self.router.record_media(fields),
                packet_rings=self.packet_rings,
                health=self.health,
            ),
        )
        self.router = EventRouter(
            tracker_settings(cfg, checkpoint.class_names),
            run_id=self.run_id,
            stride=cfg.window.stride,
            event_log=event_log or build_event_log(cfg, checkpoint, self.run_id),
            sinks=(*([self.overlay] if self.overlay else []), *configured, *sinks),
            urls=urls,
        )
        self.gate = build_gate(cfg, checkpoint.class_names)
        phases = window_phases(
            [s.name for s in cfg.sources if not self.pacing[s.name].lossless], cfg.window.stride
        )
        self.rings = [self._ring(s, checkpoint, phases.get(s.name, 0)) for s in cfg.sources]
        self.captures = [
            self._build_capture(s, ring, self._frame_opener(s, openers[s.name]), checkpoint)
            for s, ring in zip(cfg.sources, self.rings, strict=True)
        ]
        # Sources that may skip windows take the newest when inference lags; a run of replays
        # alone runs every pass at one batch size, so that its events repeat exactly.
        may_skip = frozenset(name for name, p in self.pacing.items() if not p.lossless)
        self.inference = InferenceThread(
            self.rings,
            engine,
            self.router.on_results,
            self.stop_event,
            max_batch=self._batch_size(cfg, engine),
            fixed_batch=not may_skip,
            newest_only=may_skip,
            wake=self._wake,
            device=engine.device,
            on_source_done=self._on_source_done,
            workers=workers,
            threads_per_worker=threads_per_worker,
            gate=self.gate,
            batch_device=self.device_path.device if self.device_path else None,
        )
        self._by_name = {c.source_name: c for c in self.captures}
        self.report = RunReport(
            self.run_id,
            self.captures,
            self.rings,
            self.inference,
            self.router,
            engine,
            cfg.sinks.events.path,
        )

    # -- building ---------------------------------------------------------------------------

    def _ring(self, s: SourceConfig, checkpoint: Checkpoint, phase: int) -> RingBuffer:
        """The ring buffer of ``s`` (its windows in ``phase``): in host memory, or on the device
        path's device."""
        options: dict[str, Any] = dict(
            length=self.cfg.window.length,
            stride=self.cfg.window.stride,
            lossless=self.pacing[s.name].lossless,
            frame_shape=(3, checkpoint.contract.crop, checkpoint.contract.crop),
            meter=self._meter(s.name),
            phase=phase,
        )
        if self.device_path is None:
            return RingBuffer(s.name, **options)
        return DeviceRingBuffer(s.name, device=self.device_path.device, **options)

    def _frame_opener(self, s: SourceConfig, opener: Opener) -> Opener:
        """How the capture of ``s`` opens it: ``opener``, or on the device path an opener
        whose frames are tensors on the device."""
        if self.device_path is None:
            return opener
        opts = s.options
        return device_opener(
            opener,
            self.device_path,
            url=s.url,
            open_timeout_s=opts.open_timeout_s,
            read_timeout_s=opts.read_timeout_s,
            fps=opts.fps,
        )

    def _meter(self, source: str) -> ActivityMeter | None:
        """The activity meter of a gated source's ring; None for a source scored in full."""
        if self.gate is None or source not in self.gate.settings:
            return None
        return ActivityMeter(self.gate.settings[source])

    @staticmethod
    def _opener(s: SourceConfig, decode_threads: int | None, *, keep_packets: bool) -> Opener:
        """How ``s`` is opened: its backend and options, the decoding threads its pacing and
        the run's source count ask for, and whether its encoded packets are kept (for its packet
        ring)."""
        opts = s.options
        return make_opener(
            s.url,
            backend=opts.backend,
            keep_packets=keep_packets,
            open_timeout_s=opts.open_timeout_s,
            read_timeout_s=opts.read_timeout_s,
            fps=opts.fps,
            decode_threads=decode_threads,
        )

    def _build_overlay(
        self, cfg: RunConfig, checkpoint: Checkpoint, replays: dict[str, Opener]
    ) -> OverlaySink | None:
        overlay = cfg.sinks.overlay
        if not (overlay.video or overlay.display):
            return None
        return OverlaySink(
            checkpoint.class_names,
            video_path=overlay.video,
            display=overlay.display,
            sources=[s.name for s in cfg.sources],
            replays=replays,
            top_k=overlay.top_k,
            stop_event=self.stop_event,
        )

    def _packet_rings(self, cfg: RunConfig) -> dict[str, PacketRing]:
        """A ring of encoded packets per camera or stream, when event clips are on (a file,
        replayed or paced, is cut from the file itself: streamdet.media)."""
        if cfg.media is None or not cfg.media.clips.enabled:
            return {}
        seconds = cfg.media.clips.pre_capture_s + PACKET_RING_MARGIN_S
        # NVDEC's frames do not say which packet each came from: what it decodes has no clips
        nvdec = self.device_path is not None and self.device_path.nvdec
        return {
            s.name: PacketRing(max_seconds=seconds, max_bytes=PACKET_RING_MAX_BYTES)
            for s in cfg.sources
            if source_kind(s.url) is not SourceKind.FILE and not nvdec
        }

    def _build_capture(
        self, s: SourceConfig, ring: RingBuffer, opener: Opener, checkpoint: Checkpoint
    ) -> CaptureThread:
        kind, opts = source_kind(s.url), s.options
        return CaptureThread(
            s.name,
            opener,
            ring,
            checkpoint.contract,
            self._capture_stops[s.name],
            kind=kind,
            pacing=self.pacing[s.name],
            on_status=self.router.on_status,
            # Only frames some output wants are decoded whole; the others skip decoding.
            on_frame=self._on_frame if self.router.wants_frames(s.name) else None,
            wants_frame=functools.partial(self.router.wants_frame, s.name, False),
            on_used=self._wake.set,
            reconnect=opts.reconnect,
            backoff=Backoff(opts.backoff_initial_s, opts.backoff_max_s),
            read_timeout_s=opts.read_timeout_s if kind is not SourceKind.FILE else None,
            stall_timeout_s=opts.stall_timeout_s,
            open_timeout_s=opts.open_timeout_s,
            abandoned=self.abandoned,
            packet_ring=self.packet_rings.get(s.name),
            preprocess=preprocess_tensor if self.device_path is not None else None,
        )

    @staticmethod
    def _batch_size(cfg: RunConfig, engine: Engine) -> int:
        """Windows per forward pass: ``max_batch`` on CUDA, one on a CPU.

        On a CPU batching does not raise per-clip throughput (see benchmarks/RESULTS.md, 'Idle
        machine'), but a window that arrives as a batch starts waits for the whole batch: with
        paced streams, batch 8 gave a higher latency p99 than batch 1 and skipped windows (see
        'Figures of 2026-11-26, 18:00-18:35'). A pure replay also runs every batch at one fixed
        size, so its events repeat exactly: on CUDA it pads every pass to ``max_batch``.
        """
        return cfg.model.max_batch if engine.device.type == "cuda" else 1

    # -- callbacks from the capture and inference threads ------------------------------------

    def health(self) -> RunHealth:
        """Each source's newest frame and status, and whether inference is alive (any thread:
        it reads counters, and the router's status under its lock)."""
        now_wall, now_mono = time.time(), time.monotonic()
        captures = getattr(self, "captures", None)  # an output may ask before they are built
        if captures is None:
            return RunHealth({}, inference_alive=False)
        sources = {}
        for s, c in zip(self.cfg.sources, captures, strict=True):
            read = c.stats.frames_read
            last = now_wall - (now_mono - c.last_frame_monotonic) if read else None
            sources[s.name] = SourceHealth(
                status=self.router.status(s.name),
                frames=read,
                last_frame_time=last,
                stall_timeout_s=s.options.stall_timeout_s,
                capture_alive=c.is_alive(),
            )
        alive = self.inference.is_alive() and self.inference.error is None
        return RunHealth(sources, inference_alive=alive)

    def _on_frame(self, source: str, meta: FrameMeta, frame: Any, used: bool) -> None:
        if isinstance(frame, torch.Tensor):  # the device path: outputs draw host BGR frames
            frame = to_host_bgr(frame)
        self.router.on_frame(source, meta.index, frame, self._by_name[source].fps or 10.0, used)

    def _on_source_done(self, source: str) -> None:
        """Every window of an ended source has been scored (a stopping run ends it as shutdown)."""
        if not self.stop_event.is_set():
            self.router.on_source_done(source)

    # -- running ------------------------------------------------------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        if not self.stop_event.is_set():
            self._stop_reason = reason
        self.stop_event.set()
        for capture_stop in self._capture_stops.values():
            capture_stop.set()
        self._wake.set()

    def release(self, source: str, reason: str) -> bool:
        """Stop running ``source`` alone, as a cluster node does when another node takes it;
        the other sources run on.

        Only a source with no open event is let go (so no event is cut): its status goes
        ``offline`` with ``reason`` and nothing more of it is written (no ``ended`` line), its
        capture stops and its ring closes. It returns once the capture has closed the source
        (within ``RELEASE_JOIN_S``; a capture stuck in a read longer is logged and left to
        end). When it was the last source running, the run ends as when every source ended.

        Returns:
            False, and nothing done, when ``source`` has an open event, is not running here
            (not one of this run's, ended or released already) or the run is stopping.
        """
        capture = self._by_name.get(source)
        with self._release_lock:
            if (
                capture is None
                or source in self._released
                or self.stop_event.is_set()
                or capture.ring.closed
                or not self.router.release(source, reason)
            ):
                return False
            self._released.add(source)
        self._capture_stops[source].set()
        capture.ring.close()  # inference scores what it holds (not written), then it is done
        self._wake.set()
        capture.join(RELEASE_JOIN_S)
        if capture.is_alive():
            log.warning("%s: let go, but its capture is still stuck in a read", source)
        return True

    @property
    def released(self) -> frozenset[str]:
        """The sources let go by :meth:`release`."""
        with self._release_lock:
            return frozenset(self._released)

    def run(self) -> RunSummary:
        started = time.monotonic()
        threads: list[threading.Thread] = [*self.captures, self.inference]
        kernels.get()  # load (or compile) the preprocessing kernel now, not in a capture thread's first frame
        if self.overlay is not None:
            self.overlay.start()
        self.router.start()
        self.inference.start()
        for c in self.captures:
            c.start()
        next_progress = started + self.cfg.progress_interval_s
        next_stats = started
        try:
            while not self.stop_event.wait(0.05):
                now = time.monotonic()
                crashed = [c for c in self.captures if c.error is not None]
                if crashed:
                    self.error = crashed[0].error
                    self.stop("source failed")
                    break
                if now >= next_stats:
                    self.router.publish_stats(self.report.run_stats())
                    next_stats = now + STATS_INTERVAL_S
                if self.inference.all_done and self._outputs_caught_up():
                    self.stop("all sources ended")
                    break
                if self.max_seconds is not None and now - started >= self.max_seconds:
                    self.stop(f"--max-seconds {self.max_seconds:g} reached")
                    break
                if now >= next_progress:
                    self.print(self.report.progress_line())
                    next_progress = now + self.cfg.progress_interval_s
        finally:
            self._shut_down(threads)
        # A capture that crashed set the stop event itself: the loop above never saw its error.
        failed = next((c for c in self.captures if c.error is not None), None)
        if self.error is None and failed is not None:
            self.error = failed.error
        if self.inference.error is not None:
            if isinstance(self.inference.error, StreamdetError):  # e.g. the event log it writes to
                raise self.inference.error
            raise StageError(
                f"inference failed: {type(self.inference.error).__name__}: {self.inference.error}"
            )
        if self.error is not None:
            if isinstance(self.error, StreamdetError):
                raise self.error
            where = f"capture of {failed.source_name} failed: " if failed is not None else ""
            raise StageError(f"{where}{type(self.error).__name__}: {self.error}")
        return self.summary(time.monotonic() - started)

    def _shut_down(self, threads: list[threading.Thread]) -> None:
        """Stop, join the captures and inference within one budget, then end open events and
        let the outputs finish."""
        self.stop(self._stop_reason or "stopping")
        for ring in self.rings:
            ring.close()
        for packet_ring in self.packet_rings.values():  # wakes a clip waiting for its end
            packet_ring.close()
        stop_started = time.monotonic()
        deadline = stop_started + JOIN_TIMEOUT_S  # one budget for all: stop within 2 s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            log.warning(
                "threads still running after stop (left to exit with the process): %s", alive
            )
        try:
            self.router.close("shutdown")
        except StreamdetError as exc:  # the log cannot be written (disk full): finish the rest
            self.error = self.error or exc
        log.debug("stopped in %.2f s", time.monotonic() - stop_started)

    def _outputs_caught_up(self) -> bool:
        """True unless an output is still busy (a replay being drawn) after every window was
        scored: the run waits for it (outputs never hold detection back, so they may end later)."""
        if self.router.caught_up():
            return True
        if not self._told_outputs_behind:
            self._told_outputs_behind = True
            drawn = f" ({self.overlay.frames_written} frames drawn so far)" if self.overlay else ""
            log.info("every window scored; finishing the outputs%s", drawn)
        return False

    def summary(self, seconds: float) -> RunSummary:
        summary = self.report.summary(seconds)
        if self.overlay is not None:
            summary.videos = list(self.overlay.video_files)
            summary.videos_failed = list(self.overlay.failed_videos)
        return summary
