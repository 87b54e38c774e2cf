"""``streamdet run --backend ray``: connect, place sources on node engines, merge, stop.

The :class:`Coordinator` runs in the driver. It starts one engine actor on every node with CPUs
(pinned there), shares the sources out by the windows/s each engine measured
(:func:`~streamdet.distributed.placement.spread`), long-polls every engine for its lines (an
answer comes as soon as a line is made; :class:`~streamdet.distributed.merge.ClusterLog` writes
them), and watches the nodes:

- a node that leaves, or an engine that dies: its sources go offline, their open events end
  ``stream_lost``, and they are placed on the engines still running, where they come back
  ``online``. An engine that died on a node still alive is started again there.
- a node that joins gets an engine and, once it measured itself, a share of the running
  sources: :func:`~streamdet.distributed.placement.rebalance` picks the moves (from the busiest
  nodes, sources without an open event first) that bring the spread to what ``spread`` would
  give. A source moves only between events, never cutting one: its old node lets it go when it
  has no open event (:meth:`NodeEngine.release`, asked again each ``RELEASE_RETRY_S`` until its
  event ends; one whose events never end stays where it is; with event clips, not before the
  last clip's ``post_capture_s`` has passed), its ``offline`` line (``moved to
  node X``) reaches the log, and only then does the new node open it (one connection to a camera
  at a time), where it comes back ``online``. Moves are planned only when an engine becomes
  ready after the first placement (a join, an engine restarted), never continuously, so no
  source ping-pongs. A moved file starts again from its beginning, as a lost node's does.
- a stop (Ctrl-C, SIGTERM, ``--max-seconds``, every source ended) stops every engine at once;
  events still open end ``shutdown``, on the node or, past ``STOP_TIMEOUT_S``, here.

The run's health (the web output's ``/healthz`` and ``/readyz``) is what the engines reported
at their latest poll: :meth:`Coordinator.health`.

This is the only module that imports Ray.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamdet.config import RunConfig
from streamdet.distributed.engine import NodeEngine
from streamdet.distributed.merge import ClusterLog
from streamdet.distributed.placement import Move, rebalance, spread
from streamdet.distributed.records import EngineReport, EventRecord, StatusRecord
from streamdet.errors import StreamdetError
from streamdet.redaction import redact_url
from streamdet.report import format_ms, percentile
from streamdet.sinks.base import RunHealth, RunStats

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # for --address to answer
ENGINE_START_TIMEOUT_S = 120.0  # for the first engines to load the model and measure it
POLL_INTERVAL_S = 0.25  # waits while engines start
# Each engine is long-polled: its answer comes as soon as it makes a line, or after this long,
# and the next poll is sent at once. The loop waits for any answer (a poll's, an engine's
# capacity, a release), so a line is written as soon as it arrives, and wakes at least every
# LOOP_INTERVAL_S for its own deadlines (node checks, stats, a stop).
LONG_POLL_S = 0.5
LOOP_INTERVAL_S = 0.05
NODE_CHECK_INTERVAL_S = 1.0
STATS_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 4.0  # engines stop in this; the whole stop stays within 5 s
RELEASE_RETRY_S = 0.5  # a source to move whose node refused (an event open) is asked again
DEMAND_MIN_S = 2.0  # a source's windows/s are measured over at least this long on one node
# A camera's clip goes on for media.clips.post_capture_s after its event ended, from the packets
# its node keeps: a source is not moved before that (and this margin) has passed.
CLIP_HOLD_MARGIN_S = 2.0


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """StreamdetError unless ``host:port`` (or ``ray://host:port``) accepts a connection in
    ``timeout`` seconds. ``ray.init`` itself waits without end for a cluster that is not there.
    ``auto`` (the cluster this machine is part of) is left to Ray."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise StreamdetError(
            f"--address must be HOST:PORT (the head's GCS port, 6379 by default), got {address!r}"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise StreamdetError(
            f"cannot reach the Ray cluster at {address} ({why} within {timeout:g} s): start it "
            f"with `ray start --head` there, or leave --address out for a local cluster"
        ) from None


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start one on this machine (None).

    Raises:
        StreamdetError: Ray is not installed, or the cluster cannot be reached or joined.
    """
    try:
        import ray
    except ImportError:
        raise StreamdetError("--backend ray needs Ray: pip install 'streamdet[ray]'") from None
    if address:
        check_address(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False if not address else None,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except Exception as exc:  # an auth token refused, a version mismatch, ...
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise StreamdetError(f"cannot join {where}: {type(exc).__name__}: {exc}") from None


@dataclass
class Moving:
    """A source to move to a node that joined: waiting for its old node to let it go."""

    move: Move
    release_ref: Any = None  # the old node's answer to release(), while asked
    next_try: float = 0.0  # monotonic: when to ask again after a refusal
    released: bool = False  # the old node let it go: its offline line is on its way

    @property
    def under_way(self) -> bool:
        return self.released or self.release_ref is not None


@dataclass
class NodeState:
    """One node as the coordinator sees it."""

    node_id: str
    name: str  # the first 8 hex digits of its Ray node id: every line it scored says this
    cpus: int
    actor: Any = None
    capacity: float | None = None  # windows/s its engine measured
    capacity_ref: Any = None
    poll_ref: Any = None
    sources: list[str] = field(default_factory=list)
    windows: int = 0  # scored by its engines so far (all of them, restarts included)
    engine_windows: int = 0  # by the current engine
    restarts: int = 0
    lost: bool = False
    last: EngineReport | None = None


class Coordinator:
    """Places sources on node engines and keeps them placed until the run stops.

    Args:
        cfg: the run's configuration.
        cluster_log: where every node's lines go.
        max_seconds: stop after this long (None: until the sources end or a signal).
        print_fn: where progress lines go.
    """

    def __init__(
        self,
        cfg: RunConfig,
        cluster_log: ClusterLog,
        *,
        max_seconds: float | None = None,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        import ray

        self.cfg = cfg
        self.log = cluster_log
        self.max_seconds = max_seconds
        self.print = print_fn
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.nodes: dict[str, NodeState] = {}
        self.pending: list[str] = [s.name for s in cfg.sources]  # waiting for a node
        self.ended: set[str] = set()
        self.moves: list[tuple[str, str, float]] = []  # (source, to node, when placed)
        self.moving: dict[str, Moving] = {}  # by source: planned moves not done yet
        self.rebalanced = 0  # sources moved onto nodes that joined
        self._placed = False  # the first placement is done: an engine ready later rebalances
        self._rebalance_due = False
        self._demand_since: dict[str, tuple[str, float, int]] = {}  # source: node, t, windows
        self._rates: dict[str, float] = {}  # source: windows/s on its node, since _demand_since
        clips = cfg.media.clips if cfg.media is not None else None
        self._clip_hold_s = (
            clips.post_capture_s + CLIP_HOLD_MARGIN_S if clips and clips.enabled else 0.0
        )
        self._last_end: dict[str, float] = {}  # source: monotonic time its latest event ended
        self._actor_class = ray.remote(NodeEngine)
        self._last_windows, self._last_t = 0, time.monotonic()
        # Made by the loop at each report and loss, read by web request threads: replaced whole.
        self._health = RunHealth({}, inference_alive=False)

    def stop(self, reason: str = "stop requested") -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
        self.stop_event.set()

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> float:
        """Run until stopped; returns the seconds it ran.

        Raises:
            StreamdetError: no node could run an engine, or a source failed on its node.
        """
        started = time.monotonic()
        try:
            self._check_nodes()
            self._wait_for_engines(started + ENGINE_START_TIMEOUT_S)
            next_nodes = next_stats = time.monotonic()
            next_progress = started + self.cfg.progress_interval_s
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= next_nodes:
                    self._check_nodes()
                    next_nodes = now + NODE_CHECK_INTERVAL_S
                self._collect_capacities()
                self._place_pending()
                if self._rebalance_due:
                    self._plan_moves()
                self._advance_moves()
                self._poll_engines()
                if now >= next_stats:
                    self.log.publish_stats(self.run_stats())
                    self._measure_demand(now)
                    next_stats = now + STATS_INTERVAL_S
                if self.ended >= {s.name for s in self.cfg.sources} and not self._finishing():
                    self.stop("all sources ended")
                elif self.max_seconds is not None and now - started >= self.max_seconds:
                    self.stop(f"--max-seconds {self.max_seconds:g} reached")
                elif now >= next_progress:
                    self.print(self.progress_line())
                    next_progress = now + self.cfg.progress_interval_s
                self._wait_for_answers(LOOP_INTERVAL_S)
        finally:
            self._shut_down()
        return time.monotonic() - started

    def _wait_for_answers(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for any engine to answer a call."""
        import ray

        refs = [
            ref
            for node in self.nodes.values()
            for ref in (node.poll_ref, node.capacity_ref)
            if ref is not None
        ]
        refs += [m.release_ref for m in self.moving.values() if m.release_ref is not None]
        if refs:
            ray.wait(refs, num_returns=1, timeout=timeout)
        else:
            self.stop_event.wait(timeout)

    def _wait_for_engines(self, deadline: float) -> None:
        """Wait for every engine started so far to measure itself, so that the first placement
        sees them all."""
        while not self.stop_event.is_set():
            self._collect_capacities()
            waiting = [n for n in self.nodes.values() if n.capacity_ref is not None]
            if not waiting:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "engines on %s not ready after %.0f s: placing sources on the others",
                    ", ".join(n.name for n in waiting),
                    ENGINE_START_TIMEOUT_S,
                )
                return
            self.stop_event.wait(POLL_INTERVAL_S)

    # -- nodes and engines -------------------------------------------------------------------

    def _check_nodes(self) -> None:
        """Start an engine on each new node with CPUs; hand back the sources of lost ones."""
        import ray

        alive = {
            n["NodeID"]: n
            for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1
        }
        for node in self.nodes.values():
            if not node.lost and node.node_id not in alive:
                node.lost = True
                self._engine_lost(node, "node lost")
        for node_id, info in alive.items():
            if node_id not in self.nodes:
                cpus = int(info["Resources"]["CPU"])
                node = self.nodes[node_id] = NodeState(node_id, node_id[:8], cpus)
                self.print(f"[ray] node {node.name}: {cpus} CPU(s), starting its engine")
                self._start_engine(node)

    def _start_engine(self, node: NodeState) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node.actor = self._actor_class.options(
            num_cpus=1,
            max_restarts=0,  # restarted by the coordinator, which hands its sources back
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(self.cfg, self.cfg.model.threads or node.cpus)
        node.capacity, node.engine_windows = None, 0
        node.capacity_ref = node.actor.capacity.remote()

    def _engine_lost(self, node: NodeState, why: str) -> None:
        """End the engine's part: its sources offline and back in the queue; a new engine when
        its node is still there."""
        import ray

        if node.actor is not None:
            ray.kill(node.actor, no_restart=True)
        node.actor = node.capacity_ref = node.poll_ref = node.last = None
        node.windows += node.engine_windows
        node.engine_windows = 0
        live = [s for s in node.sources if s not in self.ended]
        for source in [s for s, m in self.moving.items() if m.move.from_ == node.name]:
            del self.moving[source]  # its sources are placed again, as every lost node's
        if node.sources:
            self.print(f"[ray] node {node.name}: {why}; moving {', '.join(live) or 'nothing'}")
        self.log.lose(node.name, live, why)
        self.pending += live
        node.sources = []
        self._health = self._gather_health()
        if not node.lost and not self.stop_event.is_set():
            node.restarts += 1
            self._start_engine(node)

    def _collect_capacities(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        for node in list(self.nodes.values()):
            if node.capacity_ref is None:
                continue
            ready, _ = ray.wait([node.capacity_ref], timeout=0)
            if not ready:
                continue
            try:
                node.capacity = float(ray.get(node.capacity_ref))
            except RayActorError as exc:
                node.capacity_ref = None
                if node.lost or not self._alive(node):
                    continue  # the node went: _check_nodes hands its sources on
                raise StreamdetError(
                    f"node {node.name}: its engine could not start: {_cause(exc)}"
                ) from None
            node.capacity_ref = None
            self.print(f"[ray] node {node.name}: engine ready, {node.capacity:.0f} windows/s")
            self._rebalance_due = self._placed  # the first placement spreads them all

    def _place_pending(self) -> None:
        ready = self._ready()
        if not self.pending or not ready:
            return
        self._placed = True
        placed = spread(
            self.pending,
            {name: n.capacity or 0.0 for name, n in ready.items()},
            {name: len(n.sources) for name, n in ready.items()},
        )
        for name, sources in placed.items():
            self._start_on(ready[name], sources)
            self.print(f"[ray] node {name} runs {', '.join(sources)}")
        self.pending = []

    def _start_on(self, node: NodeState, sources: list[str]) -> None:
        """Run ``sources`` on ``node``'s engine (a failure shows in its next poll)."""
        node.actor.start.remote(sources)
        node.sources += sources
        now = time.monotonic()
        self.moves += [(s, node.name, now) for s in sources]

    def _ready(self) -> dict[str, NodeState]:
        """The nodes whose engine is running and measured, by name."""
        return {n.name: n for n in self.nodes.values() if n.capacity and n.actor and not n.lost}

    # -- moving sources onto a node that joined ----------------------------------------------

    def _plan_moves(self) -> None:
        """Plan the moves that even out the running sources (an engine just became ready)."""
        self._rebalance_due = False
        ready = self._ready()
        in_flight = {s: m for s, m in self.moving.items() if m.under_way}
        self.moving = in_flight  # the others are planned again, from the cluster as it is now
        assigned = {
            name: [s for s in n.sources if s not in self.ended and s not in in_flight]
            for name, n in ready.items()
        }
        for source, m in in_flight.items():
            if m.move.to in assigned:
                assigned[m.move.to].append(source)
        moves = rebalance(
            assigned,
            {name: n.capacity or 0.0 for name, n in ready.items()},
            demand=self._demand(),
            busy=self.log.open_sources(),
        )
        for move in moves:
            self.moving[move.source] = Moving(move)
        for (src, to), group in _grouped(moves).items():
            self.print(
                f"[ray] node {to}: taking {', '.join(group)} from node {src} (each once it "
                f"has no open event)"
            )

    def _measure_demand(self, now: float) -> None:
        """Each running source's windows/s (scored and skipped) on its node, since it started
        there (over ``DEMAND_MIN_S`` at least), from the engines' latest figures."""
        for node in self._ready().values():
            if node.last is None:
                continue
            for source in node.sources:
                stats = node.last.stats.get(source)
                if stats is None:
                    continue
                total = stats.windows + stats.windows_skipped
                since = self._demand_since.get(source)
                if since is None or since[0] != node.name or total < since[2]:
                    self._demand_since[source] = (node.name, now, total)
                    self._rates.pop(source, None)
                elif now - since[1] >= DEMAND_MIN_S:
                    self._rates[source] = (total - since[2]) / (now - since[1])

    def _demand(self) -> dict[str, float]:
        """Each running source's demand for :func:`rebalance`: its windows/s as measured; one
        not measured yet (or idle, as a camera offline for now) counts as the mean of those
        measured; all count as one when none is."""
        running = [s for n in self._ready().values() for s in n.sources]
        rates = {s: r for s in running if (r := self._rates.get(s, 0.0)) > 0}
        if not rates:
            return {}
        mean = sum(rates.values()) / len(rates)
        return {s: rates.get(s, mean) for s in running}

    def _advance_moves(self) -> None:
        """Ask each source's old node to let it go, when the log shows it has no open event;
        a refusal (an event opened meanwhile) is asked again after ``RELEASE_RETRY_S``."""
        import ray
        from ray.exceptions import RayActorError

        if not self.moving:
            return
        ready, now = self._ready(), time.monotonic()
        busy = self.log.open_sources()
        for source, m in list(self.moving.items()):
            old = ready.get(m.move.from_)
            if m.released:
                continue  # it moves when its offline line arrives (_take)
            if old is None or source not in old.sources or m.move.to not in ready:
                if m.release_ref is None:  # a node went: the moves are planned again
                    del self.moving[source]
                    continue
            if m.release_ref is None:
                clip_done = now >= self._last_end.get(source, -math.inf) + self._clip_hold_s
                if old is not None and now >= m.next_try and source not in busy and clip_done:
                    m.release_ref = old.actor.release.remote(source, f"moved to node {m.move.to}")
                continue
            done, _ = ray.wait([m.release_ref], timeout=0)
            if not done:
                continue
            try:
                released = ray.get(m.release_ref)
            except RayActorError:
                released = False  # its node is going: its poll hands the source on
            m.release_ref, m.released = None, released
            if not released:
                m.next_try = now + RELEASE_RETRY_S

    def _arrive(self, node: NodeState, sources: list[str]) -> None:
        """``node`` let these sources go (their offline lines are in the log): start each on
        the node it moves to, or wait for a node if that one is gone."""
        ready = self._ready()
        starts: dict[str, list[str]] = {}
        for source in sources:
            m = self.moving.pop(source)
            node.sources.remove(source)
            if m.move.to in ready and not self.stop_event.is_set():  # stopping: it stays off
                starts.setdefault(m.move.to, []).append(source)
            else:
                self.pending.append(source)
        for to, group in starts.items():
            self._start_on(ready[to], group)
            self.rebalanced += len(group)
            for source in group:
                self.print(f"[ray] moved {source} from node {node.name} to node {to}")

    def _poll_engines(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        for node in list(self.nodes.values()):
            if node.actor is None or node.capacity is None:
                continue
            if node.poll_ref is None:
                node.poll_ref = node.actor.poll.remote(LONG_POLL_S)
                continue
            ready, _ = ray.wait([node.poll_ref], timeout=0)
            if not ready:
                continue
            ref, node.poll_ref = node.poll_ref, None
            try:
                report = ray.get(ref)
            except RayActorError as exc:
                if not node.lost:
                    node.lost = not self._alive(node)
                    self._engine_lost(
                        node, "node lost" if node.lost else f"engine died: {_cause(exc)}"
                    )
                continue
            self._take(node, report)
            node.poll_ref = node.actor.poll.remote(LONG_POLL_S)  # the next one, at once

    def _take(self, node: NodeState, report: EngineReport) -> None:
        node.last, node.engine_windows = report, report.windows
        self._health = self._gather_health()
        let_go = []
        for r in report.records:
            if isinstance(r, StatusRecord) and r.status == "offline" and r.reason == "ended":
                self.ended.add(r.source)
            elif isinstance(r, StatusRecord) and r.status == "offline" and self._moved(node, r):
                let_go.append(r.source)
            elif isinstance(r, EventRecord) and r.change.type == "end":
                self._last_end[r.change.source] = time.monotonic()
        self.log.deliver(node.name, report.records)
        if let_go:
            self._arrive(node, let_go)
        if report.errors:
            raise StreamdetError(f"node {node.name}: {report.errors[0]}")

    def _finishing(self) -> bool:
        """Some engine still runs a pipeline: its sources ended, its outputs are not done (a
        file's last clip, cut once its event ended)."""
        return any(
            n.last is not None and n.last.pipelines_alive
            for n in self.nodes.values()
            if n.actor is not None and not n.lost
        )

    def _moved(self, node: NodeState, record: StatusRecord) -> bool:
        """``record`` is the offline line of a source ``node`` let go for a move."""
        m = self.moving.get(record.source)
        return (
            m is not None
            and m.move.from_ == node.name
            and record.source in node.sources
            and record.reason == f"moved to node {m.move.to}"
        )

    @staticmethod
    def _alive(node: NodeState) -> bool:
        import ray

        return any(n["NodeID"] == node.node_id and n.get("Alive") for n in ray.nodes())

    # -- stopping ----------------------------------------------------------------------------

    def _shut_down(self) -> None:
        """Stop every engine at once; take the lines of those that answer in time."""
        import ray
        from ray.exceptions import RayActorError

        self.stop(self.stop_reason or "stopping")
        running = [n for n in self.nodes.values() if n.actor is not None]
        calls = {
            n.name: ([n.poll_ref] if n.poll_ref else []) + [n.actor.stop.remote()] for n in running
        }
        refs = [ref for node_refs in calls.values() for ref in node_refs]
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
        done = set(ready)
        for node in running:
            for ref in calls[node.name]:
                if ref not in done:
                    break
                try:
                    self._take(node, ray.get(ref))
                except (RayActorError, StreamdetError):
                    break  # stopping anyway: its open events end here
            node.windows += node.engine_windows
            node.engine_windows = 0
            ray.kill(node.actor, no_restart=True)
            node.actor = node.poll_ref = None
        if late:
            log.warning("%d engine(s) did not stop in %.0f s: killed", len(late), STOP_TIMEOUT_S)

    # -- what the run reports ----------------------------------------------------------------

    def health(self) -> RunHealth:
        """The run's health as of the engines' latest polls (any thread).

        A source running on an engine has the health its node reported (its newest frame's
        time is the node's clock); a source waiting for a node (its node lost) is absent, so
        ``/readyz`` calls it not started. Inference is alive when at least one engine has
        reported and every live engine's inference is."""
        return self._health

    def _gather_health(self) -> RunHealth:
        reports = [(n, n.last) for n in self.nodes.values() if not n.lost and n.last is not None]
        sources = {
            name: h
            for node, report in reports
            for name, h in report.health.items()
            if name in node.sources
        }
        alive = bool(reports) and all(report.inference_alive for _, report in reports)
        return RunHealth(sources, inference_alive=alive)

    def run_stats(self) -> RunStats:
        sources = {}
        for node in self.nodes.values():
            if node.last is not None and not node.lost:
                sources.update({s: v for s, v in node.last.stats.items() if s in node.sources})
        lat = [v.latency_ms_p99 for v in sources.values()]
        return RunStats(
            sources,
            latency_ms_p99=max(lat, default=float("nan")),
            events_opened=self.log.events_opened,
        )

    def windows(self) -> int:
        return sum(n.windows + n.engine_windows for n in self.nodes.values())

    def progress_line(self) -> str:
        now, done = time.monotonic(), self.windows()
        rate = (done - self._last_windows) / max(now - self._last_t, 1e-9)
        self._last_windows, self._last_t = done, now
        live = [n for n in self.nodes.values() if not n.lost]
        nodes = "; ".join(f"{n.name}: {', '.join(n.sources) or 'no sources'}" for n in live)
        online = sum(self.log.status(s.name) == "online" for s in self.cfg.sources)
        p99 = percentile([v.latency_ms_p99 for v in self.run_stats().sources.values()], 100)
        return (
            f"[progress] ray: {len(live)} node(s) ({nodes}) | {online}/{len(self.cfg.sources)} "
            f"sources online | {rate:.1f} windows/s | latency ms p99 {format_ms(p99)} | "
            f"events {self.log.events_opened}"
        )

    def summary_lines(self, run_id: str, seconds: float) -> list[str]:
        lines = [
            f"[summary] run {run_id} on ray: {seconds:.1f} s, {len(self.nodes)} node(s), "
            f"{self.windows()} windows, {self.log.events_opened} events, "
            f"{self.log.lines_written} log lines, {self.rebalanced} source(s) moved onto "
            f"nodes that joined"
        ]
        for n in self.nodes.values():
            capacity = f"{n.capacity:.0f} windows/s" if n.capacity else "not measured"
            state = ", lost" if n.lost else ""
            restarts = f", engine restarted {n.restarts}x" if n.restarts else ""
            lines.append(
                f"[summary] node {n.name}: {capacity}, {n.windows} windows{restarts}{state}"
            )
        if self.log.event_counts:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.log.event_counts.items()))
            lines.append(f"[summary] events by label: {counts}")
        if self.cfg.sinks.events.path:
            lines.append(f"[summary] event log: {self.cfg.sinks.events.path}")
        return lines


def _cause(exc: BaseException) -> str:
    """The last line of a Ray error (the original exception, after Ray's traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def check_config(cfg: RunConfig) -> None:
    """Refuse what a cluster run cannot do: frames stay on the nodes (event media are made
    there, :func:`with_media_dir_absolute`).

    Raises:
        StreamdetError: an annotated video or window is asked for.
    """
    if cfg.sinks.overlay.video or cfg.sinks.overlay.display:
        raise StreamdetError(
            "sinks.overlay: the annotated video and window are not available with --backend ray "
            "(frames stay on the nodes); set sinks.overlay.video to null and display to false"
        )


def with_media_dir_absolute(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``media.dir`` absolute, from the driver's working folder.

    Each node makes the media of its own sources, in ``media.dir`` on its own filesystem, and
    the lines name those paths. A relative folder would be relative to each Ray worker's
    working folder; absolute, it is one path on every node: on a cluster of several machines,
    a shared mount there (NFS) lets the driver's web page serve every node's media.
    """
    if cfg.media is None:
        return cfg
    folder = os.path.abspath(os.path.expanduser(cfg.media.dir))
    return cfg.model_copy(update={"media": cfg.media.model_copy(update={"dir": folder})})


def run_on_ray(cfg: RunConfig, address: str | None, max_seconds: float | None) -> int:
    """``streamdet run --backend ray``. Returns the exit status.

    Raises:
        StreamdetError: bad input (as for a single machine), an unreachable cluster, a source
            that failed on its node.
    """
    import ray

    from streamdet.pipeline import build_event_log
    from streamdet.runner import load_model, truth_summary_line
    from streamdet.sinks.configured import SinkContext, build_sinks

    check_config(cfg)
    cfg = with_media_dir_absolute(cfg)
    checkpoint = load_model(cfg)  # the driver's log names the model; the engines load their own
    run_id = uuid.uuid4().hex[:12]
    stop_event = threading.Event()
    coordinator: Coordinator | None = None  # the outputs are built first; their health waits

    def health() -> RunHealth:
        if coordinator is None:
            return RunHealth({}, inference_alive=False)
        return coordinator.health()

    # Every output but the media one, which build_sinks makes when the config has a media
    # section: the nodes make the media (they hold the packets and frames), the driver only
    # writes their lines and hands them on.
    configured = build_sinks(
        cfg,
        SinkContext(
            run_id=run_id,
            class_names=checkpoint.class_names,
            sources=tuple(s.name for s in cfg.sources),
            urls={s.name: redact_url(s.url) for s in cfg.sources},
            model={"name": checkpoint.name, "sha256": checkpoint.sha256},
            stop_event=stop_event,
            record_media=_no_media,
            health=health,
        ),
    )
    sinks = [s for s in configured if s.name != "media"]
    connect(address)
    try:
        cluster_log = ClusterLog(run_id, build_event_log(cfg, checkpoint, run_id), sinks)
        coordinator = Coordinator(cfg, cluster_log, max_seconds=max_seconds)
        _on_signals(coordinator)
        cluster_log.start()
        for w in cluster_log.workers:
            if w.sink.name == "web":
                print(f"[web] serving on {getattr(w.sink, 'url', '?')}", flush=True)
        seconds = 0.0
        try:
            seconds = coordinator.run()
        finally:
            stop_event.set()
            cluster_log.close("shutdown")
        print("\n".join(coordinator.summary_lines(run_id, seconds)), flush=True)
        if cfg.media is not None:
            made = cluster_log.media_counts
            print(
                f"[summary] media: {made.get('clip', 0)} clips, {made.get('snapshot', 0)} "
                f"snapshots in {cfg.media.dir} (made on the nodes)",
                flush=True,
            )
        truth = truth_summary_line(cfg, run_id, cluster_log.lines_written)
        if truth:
            print(truth, flush=True)
        return 0
    finally:
        ray.shutdown()


def _no_media(fields: Any) -> Any:
    raise StreamdetError("event media is not available with --backend ray")


def _on_signals(coordinator: Coordinator) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        coordinator.stop(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), on_signal)


def _grouped(moves: list[Move]) -> dict[tuple[str, str], list[str]]:
    """(from node, to node) -> the sources moved between them, in order."""
    groups: dict[tuple[str, str], list[str]] = {}
    for m in moves:
        groups.setdefault((m.from_, m.to), []).append(m.source)
    return groups
