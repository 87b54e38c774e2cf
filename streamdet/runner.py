"""``streamdet run``: from command-line arguments to a finished pipeline and its summary."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamdet.config import RunConfig, load_config
from streamdet.errors import ConfigError, SourceError, StreamdetError
from streamdet.models.weights import Checkpoint, load_or_random
from streamdet.sources import (
    Pacing,
    SourceKind,
    check_sources,
    pacing_of,
    redact_text,
    source_kind,
    source_name,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INFERENCE_GRACE_S = (
    2.0  # after a stop, for a forward pass under way to end before the process exits
)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if args.source:
        taken: set[str] = set()
        sources = []
        for url in args.source:
            name = source_name(url, taken)
            taken.add(name)
            sources.append({"name": name, "url": url, "realtime": False})
        over["sources"] = sources
    if args.decode:
        over["decode"] = args.decode
    if args.truth:
        over["truth"] = args.truth
    elif args.source:
        over["truth"] = None  # the config's truth describes the config's sources, not these
    model: dict[str, Any] = {}
    if args.weights:
        model["weights"] = args.weights
    if args.device:
        model["device"] = args.device
    if args.precision:
        model["precision"] = args.precision
    if model:
        over["model"] = model
    sinks: dict[str, Any] = {}
    if args.events:
        sinks["events"] = {"path": args.events}
    overlay: dict[str, Any] = {}
    if args.output_video:
        overlay["video"] = args.output_video
    if args.display:
        overlay["display"] = True
    if overlay:
        sinks["overlay"] = overlay
    if sinks:
        over["sinks"] = sinks
    if getattr(args, "web", None):
        host, port = args.web
        over["web"] = {"port": port, **({"host": host} if host else {})}
    return over


def check_windows(cfg: RunConfig, checkpoint: Checkpoint) -> Any:
    """Real windows to check reduced precision against fp32 (and calibrate int8) with.

    From ``model.calibration`` or else the first file source; None (random clips) when neither
    is available or readable.
    """
    video = cfg.model.calibration or next(
        (s.url for s in cfg.sources if source_kind(s.url) is SourceKind.FILE), None
    )
    if cfg.model.precision == "fp32" or video is None:
        return None
    from streamdet.inference import calibration_windows

    try:
        return calibration_windows(video, stride=cfg.window.stride, contract=checkpoint.contract)
    except ValueError as exc:
        log.warning("no calibration windows (%s): checking on random clips", exc)
        return None


def load_model(cfg: RunConfig) -> Checkpoint:
    """The configured checkpoint, or a randomly initialised model (which detects nothing)."""
    m = cfg.model
    checkpoint = load_or_random(m.weights, num_classes=m.num_classes, width=m.width)
    if checkpoint.is_random:
        log.warning(
            "no weights given: the model is randomly initialised and its events are meaningless"
        )
    return checkpoint


def inference_plan(
    cfg: RunConfig, device: torch.device, concurrent: bool, threads: int
) -> tuple[int, int | None]:
    """(workers, torch threads per worker, or None to leave the process's count) for the run.

    Args:
        cfg: the run's configuration (``model.workers``, ``model.threads``, the sources).
        device: the engine's torch.device.
        concurrent: whether the engine may run on several threads at once (``Engine.concurrent``).
        threads: torch threads in all (``model.threads``, else torch's count: one per core).

    ``model.workers`` when set: the threads are shared out evenly. Unset, on a CPU with a
    concurrent engine: one worker per source, up to one per thread, and one per thread when a file
    is replayed as fast as possible. On 2 cores, two one-thread workers beside a file's decoder
    replayed it faster than one two-thread worker, and held more paced streams: an OpenMP team
    stalls at every barrier for whichever of its threads the decoder or the host displaced (see
    benchmarks/RESULTS.md, 'Inference workers: two one-thread workers instead of one two-thread
    team'). A single
    live source keeps one worker on every thread, the lowest latency per window. Without
    concurrency (compile on a CPU), a replay leaves its decoder a core: one worker on one thread
    fewer. CUDA runs one worker.
    """
    replays = [s.name for s in cfg.sources if pacing_of(s) is Pacing.REPLAY]
    workers = cfg.model.workers
    if workers is not None:
        if workers > 1 and not concurrent:
            raise ConfigError(
                f"model.workers: {workers} workers need an engine that runs on several threads at "
                "once, but this one does not (torch.compile, or CUDA): set workers to 1 or null"
            )
        return workers, max(1, threads // workers)
    if device.type != "cpu" or threads < 2:
        return 1, None
    if not concurrent:
        if replays and not cfg.model.threads:
            log.info(
                "inference: %d of %d torch threads, leaving one to decode %s as fast as possible",
                threads - 1,
                threads,
                ", ".join(replays),
            )
            return 1, threads - 1
        return 1, None
    workers = threads if replays else min(threads, len(cfg.sources))
    if workers > 1:
        per_worker = threads // workers
        why = (
            f"to replay {', '.join(replays)} as fast as possible"
            if replays
            else f"for {len(cfg.sources)} sources"
        )
        log.info(
            "inference: %d workers on %d torch thread%s each, %s",
            workers,
            per_worker,
            "s" if per_worker > 1 else "",
            why,
        )
        return workers, per_worker
    return 1, None


def check_outputs(cfg: RunConfig, config_path: Path | None = None) -> None:
    """Refuse outputs that would hang the run or destroy a file, before the model is built.

    The event log (and any rotated file of it) must be a regular file or not exist yet: a FIFO
    blocks the open, a device is read without end by crash recovery. No two outputs (the log,
    its rotated files when it rotates, the annotated videos: ``name_<source>.ext`` each with
    several sources, as :class:`~streamdet.sinks.overlay.OverlaySink` names them) may be one
    file, nor may an output be one of the run's input files (a video, the weights, the truth,
    the config). Paths are compared resolved, and with ``os.path.samefile`` where both exist
    (hard links, another spelling of one file). Videos are named by
    :func:`~streamdet.sinks.overlay.video_file`, as the overlay names them.

    Raises:
        StreamdetError: naming the path and the two roles it was given.
    """
    from streamdet.sinks.jsonl import check_log_path, rotated_paths
    from streamdet.sinks.overlay import check_video_path, video_file

    outputs: list[tuple[str, Path]] = []
    events = cfg.sinks.events.path
    if events:
        check_log_path(events)
        outputs.append(("the event log", Path(events)))
        if cfg.sinks.events.rotate_mb:
            rotated = rotated_paths(Path(events))[:-1]
            outputs += [("a rotated file of the event log", p) for p in rotated]
    video = cfg.sinks.overlay.video
    videos: list[tuple[str, Path]] = []
    if video and len(cfg.sources) > 1:
        videos = [
            (
                f"the annotated video of source {s.name!r}",
                video_file(video, s.name, len(cfg.sources)),
            )
            for s in cfg.sources
        ]
    elif video:
        videos = [("the annotated video", Path(video))]
    outputs += videos
    inputs = [
        (f"the video of source {s.name!r}", Path(s.url.removeprefix("file://")))
        for s in cfg.sources
        if source_kind(s.url) is SourceKind.FILE
    ]
    for what, path in (
        ("the weights", cfg.model.weights),
        ("the truth", cfg.truth),
        ("the calibration video", cfg.model.calibration),
        ("the config", config_path),
    ):
        if path:
            inputs.append((what, Path(path)))

    def same_file(a: Path, b: Path) -> bool:
        if os.path.realpath(a) == os.path.realpath(b):  # unlike Path.resolve, never raises
            return True
        try:
            return os.path.samefile(a, b)
        except OSError:  # one of them does not exist (yet)
            return False

    for i, (what, path) in enumerate(outputs):
        for other, other_path in outputs[i + 1 :] + inputs:
            if same_file(path, other_path):
                raise StreamdetError(
                    f"{path} is both {what} and {other}: give each output a path of its own"
                )
    for _, path in videos:
        check_video_path(path)
    if cfg.media is not None and (cfg.media.clips.enabled or cfg.media.snapshots.enabled):
        from streamdet.media.sink import check_media_dir

        check_media_dir(cfg.media.dir)


def load_run_config(args: argparse.Namespace, default_config: Path) -> RunConfig:
    """The run's configuration from ``streamdet run``'s arguments, its sources and outputs
    checked (on this machine) before any model is built.

    Raises:
        StreamdetError: bad input, one clear message.
    """
    config_path = Path(args.config) if args.config else default_config
    if not args.config and not default_config.exists():
        raise ConfigError(
            f"no config given and the bundled demo config {default_config} is missing"
        )
    overrides = _overrides(args)
    backend = getattr(args, "backend", "local")
    if getattr(args, "address", None) and backend != "ray":
        raise ConfigError("--address is the Ray cluster's: give --backend ray with it")
    if not args.config and (args.source or backend == "ray") and not args.output_video:
        # Your sources with the demo's model and tracker: the demo's annotated video is the demo's
        # output, not yours (a live camera would be recorded without end). A cluster run draws
        # no video at all: the frames stay on the nodes.
        overrides.setdefault("sinks", {}).setdefault("overlay", {})["video"] = None
    cfg = load_config(config_path, overrides)  # the file's relative paths: from its folder
    check_sources([s.url for s in cfg.sources])  # fail fast, before the model is built
    if cfg.model.calibration:  # named on purpose: a typo is an error, not a silent random check
        try:
            check_sources([cfg.model.calibration])
        except SourceError as exc:
            raise ConfigError(f"model.calibration: {exc}") from None
    check_outputs(cfg, config_path)
    if cfg.sinks.mqtt is not None and cfg.sinks.mqtt.tls is not None:
        from streamdet.sinks.mqtt import tls_context  # paho only when asked for

        tls_context(cfg.sinks.mqtt.tls)  # its files, before the model is built
    if cfg.web is not None:  # before the model is built; a port in use is found at the bind
        from streamdet.web.server import check_bind

        token = cfg.web.token.get_secret_value() if cfg.web.token else None
        check_bind(cfg.web.host, token, cfg.web.auth)
    if cfg.sinks.overlay.display:
        from streamdet.sinks.overlay import check_display

        check_display()
    return cfg


def run_from_args(args: argparse.Namespace, default_config: Path) -> int:
    cfg = load_run_config(args, default_config)
    checkpoint = load_model(cfg)
    import torch

    threads, previous = cfg.model.threads, torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(cfg, checkpoint, args.max_seconds)
    finally:
        torch.set_num_threads(previous)  # a caller's own torch work keeps its thread count


def _run(cfg: RunConfig, checkpoint: Checkpoint, max_seconds: float | None) -> int:
    import torch

    from streamdet.inference import build_engine, graph_batch_sizes
    from streamdet.pipeline import Pipeline
    from streamdet.report import format_summary

    engine = build_engine(
        checkpoint.model,
        cfg.model.device,
        cfg.model.precision,
        check_clips=check_windows(cfg, checkpoint),
        compile=cfg.model.compile,
        cuda_graph_sizes=graph_batch_sizes(cfg.model.max_batch) if cfg.model.cuda_graphs else (),
    )
    workers, per_worker = inference_plan(
        cfg, engine.device, engine.concurrent, torch.get_num_threads()
    )
    pipeline = Pipeline(
        cfg,
        checkpoint,
        engine,
        max_seconds=max_seconds,
        workers=workers,
        threads_per_worker=per_worker,
    )
    for worker in pipeline.router.workers:
        if worker.sink.name == "web":  # the actual port when web.port is 0
            print(f"[web] serving on {getattr(worker.sink, 'url', '?')}", flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        pipeline.stop(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        # SIGHUP too: a terminal or ssh session that closes ends the run as gracefully as Ctrl-C.
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):  # no SIGHUP on Windows
                signal.signal(getattr(signal, name), on_signal)
    try:
        summary = pipeline.run()
    except StreamdetError as exc:
        _exit_now_if_threads_stuck(pipeline, f"error: {redact_text(' '.join(str(exc).split()))}", 2)
        raise
    print(format_summary(summary))
    truth = truth_summary_line(cfg, summary.run_id, summary.lines)
    if truth:
        print(truth)
    _exit_now_if_threads_stuck(pipeline, None, 0)
    return 0


def _exit_now_if_threads_stuck(pipeline: Any, message: str | None, code: int) -> None:
    """Exit at once when a capture thread is stuck in a read or inference is still in a forward pass.

    Everything is flushed and closed by now. A normal interpreter exit would not wait for them,
    but a stuck read returning, or torch's thread pool still running, during interpreter shutdown
    aborts the process (exit 134, "terminate called without an active exception"). A forward pass
    under way gets a short grace first: a small model's ends in milliseconds.
    """
    pipeline.inference.join(INFERENCE_GRACE_S)
    stuck, busy = pipeline.abandoned.alive(), pipeline.inference.is_alive()
    if not stuck and not busy:
        return
    if message:
        print(message, file=sys.stderr)
    if stuck:
        log.warning(
            "%d capture thread(s) still stuck in a read: exiting without waiting for them", stuck
        )
    if busy:
        log.warning("inference still in a forward pass: exiting without waiting for it")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def truth_summary_line(cfg: RunConfig, run_id: str, lines_written: int) -> str | None:
    """The summary's line scoring run ``run_id``'s events against ``truth`` (event F1), read
    back from the event log; None without a truth file or a log. The same for a single machine
    and for ``--backend ray`` (whose driver writes the one log)."""
    if not (cfg.truth and cfg.sinks.events.path):
        return None
    if not lines_written:
        return "[summary] against the truth: nothing to score, this run wrote no line"
    return evaluate_against_truth(cfg.sinks.events.path, cfg.truth, run_id)


def evaluate_against_truth(events_path: str, truth_path: str, run_id: str) -> str:
    try:
        from streamdet.evaluation import evaluate_event_log
    except ImportError:
        return "[summary] event evaluation unavailable in this build"
    result = evaluate_event_log(events_path, truth_path, run_id=run_id)
    return f"[summary] against {truth_path}: {result}"
