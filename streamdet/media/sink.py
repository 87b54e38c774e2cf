"""The media output: a clip and a snapshot for every event, and the retention of both.

:class:`MediaSink` is an output of the event router (:class:`~streamdet.sinks.base.Sink`). Per
event, under ``<media.dir>/<source>/``:

- ``<event id>.mp4``: the clip, stream-copied from the camera's own encoding (no re-encode),
  from the keyframe at or before ``start - pre_capture_s`` to ``end + post_capture_s``, capped at
  ``max_clip_s``. A live source's clip follows its packet ring as the event goes on
  (:mod:`streamdet.media.recorder`); a file is cut from the file itself once the event ends.
  When complete, the log gets a ``clip`` line (and every output the same message).
- ``<event id>.jpg``: the frame at the event's highest score (the central frame of that
  window), resized to ``snapshots.height`` and with the label drawn when ``overlay`` is on.

Snapshot timing (the race between the ``end`` line and the file): the ``end`` line names the
snapshot's path (``snapshot``), decided from the event id alone, and is written before this
output even hears of the end. So that the path already names a file by then, a live source's
snapshot is first written soon after the event's ``new`` (the best frame so far), then replaced
(atomically: a reader sees the old JPEG or the new one, never half of one) by the event's best
frame once it ends, and then the ``snapshot`` line is written: a consumer that wants the final
picture waits for that line. A file's snapshot is read from the file after the end.

Nothing here blocks detection: the router only offers messages; clips are written by the media
worker thread, snapshots by this output's own thread, and retention runs in its own thread.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamdet.config import MediaConfig
from streamdet.errors import StreamdetError
from streamdet.events import EventChange
from streamdet.media.clips import ClipError, cut_file, remove_temp_files
from streamdet.media.recorder import LiveClip, MediaWorker
from streamdet.media.retention import RetentionThread
from streamdet.media.snapshots import FrameBuffer, read_file_frame, render, write_jpeg
from streamdet.sinks.base import (
    BaseSink,
    EventMessage,
    FrameMessage,
    RunStats,
    ScoresMessage,
    StatusMessage,
)
from streamdet.sinks.jsonl import iso_utc
from streamdet.sources.packets import PacketRing

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 4.0  # for the clips under way to be finished when the run stops
FRAME_BUFFER_S = 4.0  # decoded frames kept per live source for its snapshots
FRAME_BUFFER_BYTES = 48 * 1024 * 1024  # ...and at most this many bytes of them
SNAPSHOT_WAIT_S = 2.0  # how long a snapshot waits for its frame to come through the queue


class MediaDirError(StreamdetError):
    """``media.dir`` cannot be written."""


def check_media_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and check a file can be written in it; returns it.

    Raises:
        MediaDirError: naming the folder and why.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".streamdet-probe-", suffix=".part", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise MediaDirError(
            f"media.dir {str(path)!r}: cannot write media files there ({why})"
        ) from None
    return path


def safe_name(text: str) -> str:
    """``text`` as a file name: letters, digits, ``_.-`` kept, anything else ``_``.

    Example:
        >>> safe_name("1f2e-cam1-fall down/2-3")
        '1f2e-cam1-fall_down_2-3'
    """
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text).lstrip(".") or "_"


@dataclass(frozen=True)
class MediaSource:
    """How the media output gets one source's media.

    Attributes:
        name: the source's name.
        ring: its encoded packets (a live source whose capture keeps them), else None.
        file: the video file to cut clips and read snapshot frames from (a file source).
    """

    name: str
    ring: PacketRing | None = None
    file: Path | None = None


@dataclass
class _Event:
    """What the media output tracks of an open event (this output's thread only)."""

    change: EventChange  # the latest line of it
    best_score: float
    best_frame: int
    snapshot: Path
    clip: Path
    pending: _PendingSnapshot | None = None


@dataclass
class _PendingSnapshot:
    event: _Event
    frame: int  # the frame wanted
    final: bool  # the event ended: this one is its snapshot for good
    deadline: float  # monotonic: then take the nearest frame kept


def _center(first: int, last: int) -> int:
    return (first + last) // 2


class MediaSink(BaseSink):
    """Clips, snapshots and retention for every event (see the module docstring).

    Args:
        cfg: the ``media`` section.
        sources: every source, by name.
        class_names: the model's classes.
        record_media: :meth:`streamdet.router.EventRouter.record_media`.
        stop_event: the run's stop event.
        retention_interval_s: seconds between retention sweeps.
    """

    name = "media"

    def __init__(
        self,
        cfg: MediaConfig,
        *,
        sources: Mapping[str, MediaSource],
        record_media: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        stop_event: threading.Event,
        retention_interval_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.folder = check_media_dir(cfg.dir)
        self.sources = dict(sources)
        self.record_media = record_media
        self.stop_event = stop_event
        self._retention_interval_s = retention_interval_s
        self._events: dict[str, _Event] = {}  # open events, by id (this output's thread)
        self._buffers: dict[str, FrameBuffer] = {}
        self._pending: list[_PendingSnapshot] = []
        self._pending_count = 0  # len(_pending), for caught_up() in the run's thread
        # Files written under their final names while their event is open (read by retention).
        self._busy_lock = threading.Lock()  # protects _busy
        self._busy: set[Path] = set()
        self.worker = MediaWorker(self._on_clip)
        self.retention: RetentionThread | None = None
        self._started = False
        self._told_no_clips: set[str] = set()
        self.clips_written = 0
        self.clips_failed = 0
        self.snapshots_written = 0

    # -- what the router asks ------------------------------------------------------------------

    def frame_sources(self) -> Collection[str]:
        """Live sources, for their snapshots (a file's frames are read from the file)."""
        if not self.cfg.snapshots.enabled:
            return ()
        return tuple(name for name, s in self.sources.items() if s.file is None)

    def wants_frame(self, source: str, used: bool) -> bool:
        """The model's frames only: a snapshot is of the frame nearest its best window's centre,
        and at 30 fps the two frames in three the model skips need no conversion."""
        return used

    def event_line_fields(self, change: EventChange) -> Mapping[str, Any]:
        """What the event log's line for ``change`` says of this event's media: the snapshot's
        path on ``end``. Called by the router, from any thread: it only builds a path."""
        if change.type != "end" or not self.cfg.snapshots.enabled:
            return {}
        return {"snapshot": str(self._path(change.source, change.id, ".jpg"))}

    def _path(self, source: str, event_id: str, suffix: str) -> Path:
        return self.folder / safe_name(source) / f"{safe_name(event_id)}{suffix}"

    # -- messages ------------------------------------------------------------------------------

    def on_event(self, msg: EventMessage) -> None:
        self._start()
        change = msg.change
        if change.type == "new":
            self._opened(change)
        elif change.type == "update" and change.id in self._events:
            self._events[change.id].change = change
        elif change.type == "end":
            self._ended(change)

    def on_scores(self, msg: ScoresMessage) -> None:
        """Keep each open event's best window (its smoothed score is in ``open_events``)."""
        if not self._events:
            return
        center = _center(msg.first_frame, msg.last_frame)
        scores = dict(msg.open_events)
        for event in self._events.values():
            score = scores.get(event.change.label)
            if event.change.source == msg.source and score is not None:
                if score > event.best_score:
                    event.best_score, event.best_frame = score, center

    def on_frame(self, msg: FrameMessage) -> None:
        self._start()
        buffer = self._buffers.get(msg.source)
        if buffer is None:
            buffer = FrameBuffer(
                max_frames=max(16, math.ceil(msg.fps * FRAME_BUFFER_S)),
                max_bytes=FRAME_BUFFER_BYTES,
            )
            self._buffers[msg.source] = buffer
        height = self.cfg.snapshots.height
        buffer.add(msg.index, render(msg.frame, height=height, caption=None))
        self._resolve(lambda p: p.event.change.source == msg.source and p.frame <= msg.index)

    def on_status(self, msg: StatusMessage) -> None:
        self._start()
        if msg.status != "online":
            self.worker.source_lost(msg.source)
            self._resolve(lambda p: p.event.change.source == msg.source)

    def on_stats(self, stats: RunStats) -> None:
        self._start()
        now = time.monotonic()
        self._resolve(lambda p: now >= p.deadline)

    def caught_up(self) -> bool:
        """False while clips or snapshots are still being made (a replay's run waits for them;
        a stopped run does not). Called from the run's thread: reads counters only."""
        return self._pending_count == 0 and self.worker.idle()

    def progress_text(self) -> str:
        return f"media {self.clips_written} clips, {self.snapshots_written} snapshots"

    def summary_lines(self) -> list[str]:
        failed = f", {self.clips_failed} failed" if self.clips_failed else ""
        return [
            f"media: {self.clips_written} clips{failed}, {self.snapshots_written} snapshots "
            f"in {self.folder}"
        ]

    def close(self) -> None:
        self._resolve(lambda p: True)
        if not self.worker.stop(STOP_TIMEOUT_S):
            log.warning(
                "media: clips still being written after %.0f s, left unfinished (temporary "
                "files, removed at the next start)",
                STOP_TIMEOUT_S,
            )
        if self.retention is not None:
            self.retention.wake()  # it sees the stop event set
            self.retention.join(1.0)

    # -- events --------------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the worker and retention threads at the first message (not when built)."""
        if self._started:
            return
        self._started = True
        removed = remove_temp_files(self.folder)
        if removed:
            log.info("media: removed %d unfinished file(s) a previous run left", removed)
        self.worker.start()
        retain = self.cfg.retain
        if retain.days is not None or retain.max_gb is not None:
            kwargs = {}
            if self._retention_interval_s is not None:
                kwargs["interval_s"] = self._retention_interval_s
            self.retention = RetentionThread(
                self.folder,
                days=retain.days,
                max_gb=retain.max_gb,
                busy=self.busy_paths,
                stop_event=self.stop_event,
                **kwargs,
            )
            self.retention.start()

    def busy_paths(self) -> set[Path]:
        """Files written under their final names while their event is open."""
        with self._busy_lock:
            return set(self._busy) | self.worker.open_paths()

    def _opened(self, change: EventChange) -> None:
        source = self.sources.get(change.source, MediaSource(change.source))
        event = _Event(
            change=change,
            best_score=change.score,
            best_frame=_center(change.window_first_frame, change.window_last_frame),
            snapshot=self._path(change.source, change.id, ".jpg"),
            clip=self._path(change.source, change.id, ".mp4"),
        )
        self._events[change.id] = event
        event.snapshot.parent.mkdir(parents=True, exist_ok=True)
        with self._busy_lock:
            self._busy.add(event.snapshot)
        clips = self.cfg.clips
        if clips.enabled and source.ring is None and source.file is None:
            self._no_clips(change.source)
        if clips.enabled and source.ring is not None:
            self.worker.start_clip(
                LiveClip(
                    event_id=change.id,
                    source=change.source,
                    path=event.clip,
                    ring=source.ring,
                    want_start=change.start_time - clips.pre_capture_s,
                    max_s=clips.max_clip_s,
                )
            )
        if self.cfg.snapshots.enabled and source.file is None:
            self._want_snapshot(event, final=False)  # the file exists before the end line is out

    def _no_clips(self, source: str) -> None:
        if source not in self._told_no_clips:
            self._told_no_clips.add(source)
            log.warning(
                "%s: no event clips: its capture keeps no encoded packets (a webcam read with "
                "OpenCV); snapshots only",
                source,
            )

    def _ended(self, change: EventChange) -> None:
        event = self._events.pop(change.id, None)
        if event is None:
            return
        event.change = change
        source = self.sources.get(change.source, MediaSource(change.source))
        clips = self.cfg.clips
        if clips.enabled and source.ring is not None:
            gone = change.end_reason in ("stream_lost", "stream_ended", "shutdown")
            self.worker.end_clip(change.id, change.end_time + clips.post_capture_s, gone=gone)
        elif clips.enabled and source.file is not None:
            file = source.file
            self.worker.submit(lambda: self._cut_from_file(event, file))
        if not self.cfg.snapshots.enabled:
            self._unbusy(event)
        elif source.file is not None:
            file = source.file
            self.worker.submit(lambda: self._snapshot_from_file(event, file))
        else:
            self._want_snapshot(event, final=True)

    def _unbusy(self, event: _Event) -> None:
        with self._busy_lock:
            self._busy.discard(event.snapshot)

    # -- snapshots -----------------------------------------------------------------------------

    def _want_snapshot(self, event: _Event, *, final: bool) -> None:
        if event.pending is not None:
            self._pending.remove(event.pending)
        pending = _PendingSnapshot(
            event, event.best_frame, final, time.monotonic() + SNAPSHOT_WAIT_S
        )
        event.pending = pending
        self._pending.append(pending)
        self._pending_count = len(self._pending)
        buffer = self._buffers.get(event.change.source)
        if buffer is not None and buffer.newest_index is not None:
            if buffer.newest_index >= pending.frame:  # already here (or dropped): no waiting
                self._resolve(lambda p: p is pending)

    def _resolve(self, due: Callable[[_PendingSnapshot], bool]) -> None:
        """Write the pending snapshots ``due`` says are due, from the nearest frame kept."""
        if not self._pending:
            return
        ready = [p for p in self._pending if due(p)]
        for pending in ready:
            self._pending.remove(pending)
            pending.event.pending = None
            self._write_live_snapshot(pending)
        self._pending_count = len(self._pending)

    def _write_live_snapshot(self, pending: _PendingSnapshot) -> None:
        event = pending.event
        buffer = self._buffers.get(event.change.source)
        kept = buffer.nearest(pending.frame) if buffer is not None else None
        if kept is None:
            if pending.final:
                log.warning(
                    "%s: no frame kept for the snapshot of %s", event.change.source, event.change.id
                )
                self._unbusy(event)
            return
        index, frame = kept
        self._write_snapshot(event, frame, index, final=pending.final)

    def _write_snapshot(self, event: _Event, frame: np.ndarray, index: int, *, final: bool) -> None:
        snap = self.cfg.snapshots
        caption = None
        if snap.overlay:
            caption = f"{event.change.label} {event.best_score:.2f}"
        picture = render(frame, height=snap.height, caption=caption)
        try:
            size = write_jpeg(event.snapshot, picture, snap.quality)
        except (OSError, ValueError) as exc:
            log.warning(
                "%s: cannot write the snapshot %s: %s", event.change.source, event.snapshot, exc
            )
            if final:
                self._unbusy(event)
            return
        if not final:
            return
        self._unbusy(event)
        self.snapshots_written += 1
        self._record(
            {
                "type": "snapshot",
                "id": event.change.id,
                "source": event.change.source,
                "label": event.change.label,
                "path": str(event.snapshot),
                "frame": index,
                "score": round(float(event.best_score), 4),
                "width": int(picture.shape[1]),
                "height": int(picture.shape[0]),
                "size_bytes": size,
            }
        )

    def _snapshot_from_file(self, event: _Event, file: Path) -> None:  # the worker's thread
        frame = read_file_frame(file, event.best_frame)
        if frame is None:
            log.warning(
                "%s: frame %d not found for the snapshot of %s",
                file,
                event.best_frame,
                event.change.id,
            )
            self._unbusy(event)
            return
        self._write_snapshot(event, frame, event.best_frame, final=True)

    # -- clips ---------------------------------------------------------------------------------

    def _on_clip(self, clip: LiveClip) -> None:  # the worker's thread
        stats = clip.stats
        if stats is None:
            self.clips_failed += 1
            log.warning("%s: no clip for %s: %s", clip.source, clip.event_id, clip.error)
            return
        self.clips_written += 1
        fields: dict[str, Any] = {
            "type": "clip",
            "id": clip.event_id,
            "source": clip.source,
            "path": str(stats.path),
            "start_time": iso_utc(stats.first.time),
            "end_time": iso_utc(stats.last.time),
            "duration_s": round(stats.duration_s, 3),
            "frames": stats.frames,
            "size_bytes": stats.size_bytes,
            "pre_capture_s": round(
                clip.want_start + self.cfg.clips.pre_capture_s - stats.first.time, 3
            ),
            "capped": clip.capped,
        }
        if clip.end_target is not None:
            fields["post_capture_s"] = round(
                stats.last.time - (clip.end_target - self.cfg.clips.post_capture_s), 3
            )
        if clip.lost:
            fields["lost_packets"] = clip.lost
        if fields["pre_capture_s"] < self.cfg.clips.pre_capture_s - 1e-3:
            log.info(
                "%s: clip %s has %.1f s of pre-roll of the %.1f s asked (the stream had no more)",
                clip.source,
                clip.event_id,
                fields["pre_capture_s"],
                self.cfg.clips.pre_capture_s,
            )
        self._record(fields)

    def _cut_from_file(self, event: _Event, file: Path) -> None:  # the worker's thread
        """A file's clip: its frames' times on the file are ``index / fps``."""
        change, clips = event.change, self.cfg.clips
        fps = _file_fps(file)
        start_s = change.start_frame / fps - clips.pre_capture_s
        end_s = min(change.end_frame / fps + clips.post_capture_s, start_s + clips.max_clip_s)
        try:
            cut = cut_file(file, event.clip, max(0.0, start_s), end_s)
        except (ClipError, OSError) as exc:
            self.clips_failed += 1
            log.warning("%s: no clip for %s: %s", change.source, change.id, exc)
            return
        self.clips_written += 1
        # The event's times are the capture's clock for its frames: frame k at start_time + ...
        wall = change.start_time - change.start_frame / fps
        self._record(
            {
                "type": "clip",
                "id": change.id,
                "source": change.source,
                "path": str(cut.path),
                "start_time": iso_utc(wall + cut.start_s),
                "end_time": iso_utc(wall + cut.end_s),
                "duration_s": round(cut.duration_s, 3),
                "frames": cut.frames,
                "size_bytes": cut.size_bytes,
                "pre_capture_s": round(change.start_frame / fps - cut.start_s, 3),
                "post_capture_s": round(cut.end_s - change.end_frame / fps, 3),
                "capped": end_s < change.end_frame / fps + clips.post_capture_s,
            }
        )

    def _record(self, fields: Mapping[str, Any]) -> None:
        if self.retention is not None:
            self.retention.wake()  # keep the folder under max_gb clip by clip, not minute by minute
        try:
            self.record_media(fields)
        except (StreamdetError, ValueError) as exc:  # the log is broken (reported) or closed
            log.error("media: cannot log the %s of %s: %s", fields["type"], fields["id"], exc)


def _file_fps(file: Path) -> float:
    import av

    with av.open(str(file)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else 25.0
