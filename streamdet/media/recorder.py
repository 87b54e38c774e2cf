"""The media worker thread: writes live clips as their packets arrive, and runs the slower media
tasks (a clip or a frame read from a file) off the media output's own thread.

A live clip (:class:`LiveClip`) starts when its event opens: the worker follows the source's
:class:`~streamdet.sources.packets.PacketRing` from the keyframe at or before
``start - pre_capture_s`` and writes each packet as it arrives, so the clip may outlast what the
ring keeps. It is complete when the ring has passed ``end + post_capture_s`` (the event ended),
when it reaches ``max_clip_s``, when its stream ends (the camera was lost, or reconnected with a
new session), or when the run stops; the worker then renames it into place and hands the result
to ``on_clip`` (from this thread).

Locking: ``_lock`` protects the clip list, the task queue and every clip's control fields
(``end_target``, ``gone``, ``deadline``); the worker writes files outside it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamdet.media.clips import ClipError, ClipFile, ClipStats
from streamdet.sources.packets import PacketFollower, PacketRing

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often open clips take their new packets
END_GRACE_S = 10.0  # after end + post_capture_s is due, how long a clip waits for its packets
NO_PACKETS_GRACE_S = 10.0  # how long an ended event waits for its source's first keyframe


@dataclass
class LiveClip:
    """A clip of a live source's event, written as its packets arrive.

    Attributes:
        event_id: the event's id.
        source: the source's name.
        path: where the finished clip goes.
        ring: the source's packets.
        want_start: wall time the clip should start at (``start - pre_capture_s``); it starts
            at the keyframe at or before it, or at the first one kept after it.
        max_s: the longest clip.
        end_target: wall time it should end at (``end + post_capture_s``), once the event ended.
        gone: no packets will come for it any more (stream lost, run stopping): finish now.
        deadline: monotonic time after which it finishes with what it has.
        file: the clip being written (None until its first keyframe).
        follower: the reader of the ring (None until the ring has a keyframe).
        stats: set when finished; None when it holds no frame.
        error: why it could not be written, if so.
        capped: it stopped at ``max_s``.
    """

    event_id: str
    source: str
    path: Path
    ring: PacketRing
    want_start: float
    max_s: float
    end_target: float | None = None
    gone: bool = False
    deadline: float = math.inf
    file: ClipFile | None = None
    follower: PacketFollower | None = None
    stats: ClipStats | None = None
    error: str | None = None
    capped: bool = False
    lost: int = 0

    def limit(self) -> float:
        """Wall time of the last packet it may take now."""
        cap = self.file.first.time + self.max_s if self.file is not None else math.inf
        end = self.end_target if self.end_target is not None else math.inf
        return min(cap, end)


class MediaWorker(threading.Thread):
    """Writes live clips and runs media tasks, in one thread.

    Args:
        on_clip: called (from this thread) with each live clip once it is finished or failed.
        poll_s: seconds between two takes of an open clip's new packets.
    """

    def __init__(self, on_clip: Callable[[LiveClip], None], *, poll_s: float = POLL_S) -> None:
        super().__init__(name="media-worker", daemon=True)
        self.on_clip = on_clip
        self.poll_s = poll_s
        self._lock = threading.Lock()  # protects the fields below and every clip's controls
        self._clips: dict[str, LiveClip] = {}
        self._tasks: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._running = 0  # tasks taken from the queue and not finished yet
        self.done = threading.Event()  # set when the thread has finished everything

    # -- called from the media output's thread -----------------------------------------------

    def start_clip(self, clip: LiveClip) -> None:
        with self._lock:
            self._clips[clip.event_id] = clip
        self._wake.set()

    def end_clip(self, event_id: str, end_target: float, *, gone: bool) -> None:
        """The event ended: its clip ends at ``end_target`` (``gone``: with what it has now)."""
        with self._lock:
            clip = self._clips.get(event_id)
            if clip is not None:
                clip.end_target = end_target
                clip.gone = clip.gone or gone
                clip.deadline = time.monotonic() + max(0.0, end_target - time.time()) + END_GRACE_S
        self._wake.set()

    def source_lost(self, source: str) -> None:
        """The source went offline: its clips end with the packets they have."""
        with self._lock:
            for clip in self._clips.values():
                if clip.source == source:
                    clip.gone = True
        self._wake.set()

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` in this thread (a clip or a frame read from a file)."""
        with self._lock:
            self._tasks.append(task)
        self._wake.set()

    def idle(self) -> bool:
        """No clip open and no task queued or running."""
        with self._lock:
            return not self._clips and not self._tasks and not self._running

    def open_paths(self) -> set[Path]:
        """Final paths of the clips not finished yet."""
        with self._lock:
            return {c.path for c in self._clips.values()}

    def stop(self, timeout: float) -> bool:
        """Finish every clip with what it has, run the queued tasks, and wait up to
        ``timeout`` seconds; False when the thread did not finish in time."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if not self.is_alive() and not self.done.is_set():
            return True  # never started
        return self.done.wait(timeout)

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                with self._lock:
                    stopping = self._stopping
                    tasks = list(self._tasks)
                    self._tasks.clear()
                    self._running = len(tasks)
                for task in tasks:
                    self._run_task(task)
                    with self._lock:
                        self._running -= 1
                self._step_clips(final=stopping)
                if stopping:
                    with self._lock:
                        if not self._tasks and not self._clips:
                            return
        finally:
            self.done.set()

    @staticmethod
    def _run_task(task: Callable[[], None]) -> None:
        try:
            task()
        except Exception:  # one failed task must not end the worker
            log.exception("media task failed")

    def _step_clips(self, *, final: bool) -> None:
        with self._lock:
            clips = list(self._clips.values())
        for clip in clips:
            try:
                finished = self._step(clip, final=final)
            except (ClipError, OSError) as exc:
                clip.error = str(exc)
                if clip.file is not None:
                    clip.file.abort()
                finished = True
            if finished:
                with self._lock:
                    self._clips.pop(clip.event_id, None)
                self._hand_on(clip)

    def _step(self, clip: LiveClip, *, final: bool) -> bool:
        """Take the clip's new packets; True when it is finished (or abandoned)."""
        with self._lock:
            gone = clip.gone or final
            overdue = time.monotonic() > clip.deadline
            limit = clip.limit()
            ended = clip.end_target is not None
            # The end is covered (the frame showing it is taken); max_s is never passed.
            through = ended and limit == clip.end_target and not gone
        if clip.follower is None:
            clip.follower = clip.ring.follow(clip.want_start)
            if clip.follower is None:
                if gone or overdue or (ended and self._no_packets_for_too_long(clip)):
                    clip.error = "no keyframe of the source was kept"
                    return True
                return False
        taken = clip.follower.take(limit, through=through)
        clip.lost = clip.follower.lost
        if taken.lost:
            log.warning(
                "%s: clip %s fell behind: %d packets lost", clip.source, clip.event_id, taken.lost
            )
        over_cap = False
        for packet in taken.packets:
            if clip.file is None:
                clip.file = ClipFile(clip.path, clip.follower.info, packet)
            elif packet.time > clip.file.first.time + clip.max_s:
                over_cap = True  # the first take of a long event: the rest is past max_s
                break
            else:
                clip.file.write(packet)
        at_cap = clip.file is not None and limit == clip.file.first.time + clip.max_s
        clip.capped = over_cap or (at_cap and taken.reached)
        done = (taken.reached and ended) or clip.capped or taken.ended or gone or overdue
        if not done:
            return False
        if clip.file is not None:
            clip.stats = clip.file.finish()
        elif clip.error is None:
            clip.error = "no packets in the clip's span"
        return True

    def _no_packets_for_too_long(self, clip: LiveClip) -> bool:
        return clip.end_target is not None and time.time() > clip.end_target + NO_PACKETS_GRACE_S

    def _hand_on(self, clip: LiveClip) -> None:
        try:
            self.on_clip(clip)
        except Exception:
            log.exception("media: handing on the clip of %s failed", clip.event_id)
