"""The engine on each node: the single-machine pipeline for the sources it is given.

:class:`NodeEngine` is a plain class; :mod:`streamdet.distributed.backend` makes it a Ray actor,
one per node. It loads the model once, measures how many windows/s it scores (the coordinator
shares sources out by that figure), and runs one :class:`~streamdet.pipeline.Pipeline` per batch
of sources it is given: sources added later (a lost node's, or one moved here) start beside the
running ones without interrupting them, and :meth:`NodeEngine.release` stops one source alone
(moved to a node that joined). Every pipeline writes to one
:class:`~streamdet.distributed.records.Outbox`, which the driver drains with
:meth:`NodeEngine.poll`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from streamdet.config import RunConfig
from streamdet.distributed.records import EngineReport, Outbox
from streamdet.errors import StreamdetError
from streamdet.redaction import redact_text
from streamdet.sinks.base import SourceHealth, SourceStats

if TYPE_CHECKING:
    from streamdet.pipeline import Pipeline
    from streamdet.sinks.jsonl import EventLog

log = logging.getLogger(__name__)

MEASURE_S = 1.0  # how long the capacity measurement scores windows
STOP_JOIN_S = 3.0  # for every pipeline to stop (the driver waits 5 s in all)
# A poll answers as soon as a line is made, but the sources' figures and health (percentiles
# over each source's recent windows: about 1 ms for 6 sources) are made again only this often,
# as often as the driver hands them to its outputs (backend.STATS_INTERVAL_S).
FIGURES_INTERVAL_S = 0.5


def node_config(cfg: RunConfig, sources: list[str]) -> RunConfig:
    """``cfg`` for a node running ``sources``: no outputs (the driver has them) and no log,
    but event media: clips and snapshots are made where the packets and frames are, in
    ``media.dir`` (the driver made it absolute: every node writes under the same path)."""
    wanted = set(sources)
    sinks = cfg.sinks.model_copy(
        update={
            "events": cfg.sinks.events.model_copy(update={"path": None}),
            "mqtt": None,
            "webhooks": [],
        }
    )
    return cfg.model_copy(
        update={
            "sources": [s for s in cfg.sources if s.name in wanted],
            "sinks": sinks,
            "web": None,
            "truth": None,
            "progress_interval_s": 3600.0,  # the driver prints the progress lines
        }
    )


class PipelineThread(threading.Thread):
    """Runs one pipeline to its end; keeps why it failed."""

    def __init__(self, pipeline: Pipeline, sources: list[str]) -> None:
        super().__init__(name=f"pipeline-{'+'.join(sources)}"[:60], daemon=True)
        self.pipeline = pipeline
        self.sources = sources
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.pipeline.run()
        except Exception as exc:  # a source that cannot be opened on this node, a failed stage
            self.error = redact_text(f"{', '.join(self.sources)}: {exc}")
            log.error("pipeline of %s failed: %s", self.sources, self.error)


class NodeEngine:
    """The model, and the pipelines of this node's sources.

    Args:
        cfg: the run's whole configuration (every source: it is given its own by :meth:`start`).
        threads: torch threads for inference (None: the process's count).
    """

    def __init__(self, cfg: RunConfig, threads: int | None = None) -> None:
        import torch

        from streamdet.inference import build_engine
        from streamdet.runner import check_windows, load_model

        if threads:
            torch.set_num_threads(threads)
        self.incarnation = uuid.uuid4().hex[:8]
        self.cfg = cfg
        self.checkpoint = load_model(cfg)
        self.engine = build_engine(
            self.checkpoint.model,
            cfg.model.device,
            cfg.model.precision,
            check_clips=check_windows(cfg, self.checkpoint),
            compile=cfg.model.compile,
        )
        self.outbox = Outbox()
        self._lock = threading.Lock()  # protects _threads
        self._threads: list[PipelineThread] = []
        # Why a start failed (the driver's call does not wait for the answer): the next poll
        # reports it, as it reports a pipeline that failed while running.
        self._start_errors: list[str] = []  # under _lock
        self._figures = _Figures({}, {}, inference_alive=True)  # as of _figures_at (polls only)
        self._figures_at = -math.inf

    def capacity(self) -> float:
        """Windows/s this node scores, one window at a time (as a CPU run takes them), measured
        for about ``MEASURE_S`` seconds."""
        import torch

        clip = torch.zeros((1, 3, 16, 112, 112))
        self.engine(clip)  # warm-up: the first pass allocates
        done, started = 0, time.monotonic()
        while done < 3 or time.monotonic() - started < MEASURE_S:
            self.engine(clip)
            done += 1
        return done / (time.monotonic() - started)

    def start(self, sources: list[str]) -> None:
        """Run ``sources`` (beside any running already). A pipeline that cannot be built here
        (an output that cannot start on this node) is reported by the next :meth:`poll`'s
        ``errors``: the driver does not wait for this call's answer.

        Raises:
            StreamdetError: a source that is not in the config.
        """
        from streamdet.pipeline import Pipeline

        unknown = set(sources) - {s.name for s in self.cfg.sources}
        if unknown:
            raise StreamdetError(f"sources not in the config: {sorted(unknown)}")
        try:
            pipeline = Pipeline(
                node_config(self.cfg, sources),
                self.checkpoint,
                self.engine,
                print_fn=log.info,
                event_log=cast("EventLog", self.outbox),  # duck-typed: the driver writes lines
            )
        except Exception as exc:  # an output that cannot start here (media.dir not writable)
            error = redact_text(f"{', '.join(sources)}: {exc}")
            log.error("pipeline of %s could not start: %s", sources, error)
            with self._lock:
                self._start_errors.append(error)
            return  # not raised: Ray would print the unawaited call's traceback on the driver
        thread = PipelineThread(pipeline, sources)
        with self._lock:
            self._threads.append(thread)
        thread.start()
        self._figures_at = -math.inf  # the next poll shows them

    def release(self, source: str, reason: str) -> bool:
        """Stop running ``source`` here (another node takes it) unless it has an open event:
        its ``offline`` line (with ``reason``) is in the outbox when this returns True, and
        nothing more of it follows. See :meth:`~streamdet.pipeline.Pipeline.release`.

        Returns:
            False while ``source`` has an open event (ask again when it ended), or when it is not
            running here.
        """
        with self._lock:
            running = [t for t in self._threads if source in t.sources and t.is_alive()]
        released = bool(running) and running[-1].pipeline.release(source, reason)
        self._figures_at = -math.inf  # the next poll drops its figures
        return released

    def poll(self, wait_s: float = 0.0) -> EngineReport:
        """The lines since the previous poll, and every source's figures; with ``wait_s``, a
        long poll: it answers as soon as a line is made, or after ``wait_s`` seconds."""
        if wait_s > 0:
            self.outbox.wait(wait_s)
        return self._report(fresh=False)

    def _report(self, *, fresh: bool) -> EngineReport:
        """The report: the lines since the previous one, figures at most ``FIGURES_INTERVAL_S``
        old (``fresh``: made now)."""
        with self._lock:
            threads = list(self._threads)
            start_errors = tuple(self._start_errors)
        # Counted before the drain: a pipeline that has finished has put all its lines by now.
        pipelines_alive = sum(t.is_alive() for t in threads)
        now = time.monotonic()
        if fresh or now - self._figures_at >= FIGURES_INTERVAL_S:
            self._figures, self._figures_at = gather_figures(threads), now
        figures = self._figures
        released = {t: t.pipeline.released for t in threads}  # read once: it takes a lock
        return EngineReport(
            incarnation=self.incarnation,
            sources=tuple(s for t in threads for s in t.sources if s not in released[t]),
            records=self.outbox.drain(),
            stats=figures.stats,
            windows=sum(t.pipeline.inference.windows_done for t in threads),
            errors=start_errors + tuple(t.error for t in threads if t.error),
            health=figures.health,
            inference_alive=figures.inference_alive,
            pipelines_alive=pipelines_alive,
        )

    def stop(self) -> EngineReport:
        """Stop every pipeline (open events end ``shutdown``), then the last lines."""
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.pipeline.stop("the driver stopped the run")
        deadline = time.monotonic() + STOP_JOIN_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            log.warning("pipelines still stopping after %.0f s: %s", STOP_JOIN_S, alive)
        return self._report(fresh=True)


@dataclass(frozen=True)
class _Figures:
    """The sources' figures and health, as a poll reports them."""

    stats: dict[str, SourceStats]
    health: dict[str, SourceHealth]
    inference_alive: bool


def gather_figures(threads: list[PipelineThread]) -> _Figures:
    """The figures of every source still running on one of ``threads`` (not let go)."""
    stats: dict[str, SourceStats] = {}
    health: dict[str, SourceHealth] = {}
    inference_alive = True
    for t in threads:
        gone = t.pipeline.released  # run elsewhere now: their figures are the other node's
        stats.update(
            (s, v) for s, v in t.pipeline.report.run_stats().sources.items() if s not in gone
        )
        if t.is_alive():  # a pipeline whose sources all ended has stopped its inference
            run_health = t.pipeline.health()
            health.update((s, h) for s, h in run_health.sources.items() if s not in gone)
            inference_alive &= run_health.inference_alive
    return _Figures(stats, health, inference_alive)
