"""Annotated frames: top classes with score bars, open events and live figures, at source resolution.

:func:`draw_overlay` draws on one frame. :class:`OverlaySink` runs in its own thread, pairs each
frame with the newest window scored at or before it, and writes it to a video file and/or a window.

A replay (a file read with ``realtime: false``) is annotated from the sink's own read of the
file, each frame as soon as the window it shows is known, so the annotated video is the same on
every run and capture and detection never wait for the drawing. Handing the capture's frames
over instead would mean holding every frame between the newest window scored and the capture:
a window spans 16 x 24 = 384 frames of a 240 fps file and 1600 of a 1000 fps one, far more than
a bounded queue can hold. When detection ends first, the run waits for the sink to finish the
file (it still stops within seconds on a signal: a stopping run draws no more replay frames).

Live frames come from the capture threads through a bounded queue and are drawn at once with
the latest scores; when the sink falls behind, they are dropped and counted, never queued.

OpenCV's VideoWriter reports no write error, so each video is read back when closed: one that
does not play back whole (a full disk) is removed, with a warning, and listed in
``failed_videos`` instead of ``video_files``.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from streamdet.errors import StreamdetError
from streamdet.sinks.base import BaseSink, FrameMessage, RunStats, ScoresMessage, StatusMessage

if TYPE_CHECKING:
    from streamdet.sources import VideoSource
    from streamdet.sources.capture import Opener

log = logging.getLogger(__name__)

_GREEN = (60, 200, 60)
_RED = (40, 40, 230)
_WHITE = (255, 255, 255)
_PANEL = (24, 24, 24)
CLOSE_TIMEOUT_S = 6.0  # for the drawing to finish once the run is over
REPLAY_BATCH = 16  # replay frames drawn per turn before the live frames queued are served again


@functools.cache
def display_problem() -> str | None:
    """Why frames cannot be shown in a window here, or None when they can.

    Probed once per process in a child process: without a usable display, OpenCV's Qt backend
    aborts the whole process at the first window (exit 134), which would lose the events still
    open. Costs about a second, only for runs that show a window.
    """
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    probe = (
        "import cv2; cv2.namedWindow('streamdet-probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "opening a window did not finish in 30 s"
    if done.returncode == 0:
        return None
    said = next(
        (line.strip() for line in done.stderr.splitlines() if line.strip()),
        f"exit code {done.returncode}",
    )
    return f"OpenCV cannot open a window ({said[:160]})"


def check_display() -> None:
    """Raise a StreamdetError when frames cannot be shown in a window (see :func:`display_problem`)."""
    problem = display_problem()
    if problem is not None:
        raise StreamdetError(
            f"cannot show frames in a window: {problem}; write an annotated video "
            f"instead (--output-video or sinks.overlay.video)"
        )


@dataclass
class SourceView:
    """What the overlay shows for one source."""

    probs: np.ndarray | None = None
    window_last_frame: int = -1
    open_events: list[tuple[str, float]] = field(default_factory=list)  # (label, score)
    status: str = "online"
    fps_in: float = 0.0
    inference_ms: float = 0.0
    latency_ms: float = 0.0


def draw_overlay(
    frame: np.ndarray,
    class_names: Sequence[str],
    view: SourceView,
    *,
    top_k: int = 3,
    source: str = "",
) -> np.ndarray:
    """Draw scores, events and figures on ``frame`` (BGR uint8, modified in place and returned)."""
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif frame.ndim == 3 and frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    h, w = frame.shape[:2]
    scale = max(0.4, min(w, h) / 720.0)
    font = cv2.FONT_HERSHEY_SIMPLEX
    line_h = int(26 * scale)
    thick = max(1, int(round(scale * 1.5)))
    bar_w = int(160 * scale)
    rows = top_k + 2 + len(view.open_events)
    panel_w = int(w * 0.45) if w < 500 else int(360 * scale)
    panel_h = min(h, line_h * rows + int(10 * scale))
    roi = frame[0:panel_h, 0 : min(w, panel_w)]
    roi[...] = (roi * 0.4 + np.array(_PANEL) * 0.6).astype(np.uint8)

    y = line_h
    head = f"{source} {view.status}  {view.fps_in:.1f} fps  inf {view.inference_ms:.0f} ms  lat {view.latency_ms:.0f} ms"
    cv2.putText(frame, head, (int(6 * scale), y), font, 0.5 * scale, _WHITE, thick, cv2.LINE_AA)
    if view.probs is not None:
        order = np.argsort(view.probs)[::-1][:top_k]
        for idx in order:
            y += line_h
            p = float(view.probs[idx])
            x0 = int(6 * scale)
            cv2.rectangle(frame, (x0, y - int(14 * scale)), (x0 + int(bar_w * p), y), _GREEN, -1)
            cv2.rectangle(frame, (x0, y - int(14 * scale)), (x0 + bar_w, y), _WHITE, 1)
            cv2.putText(
                frame,
                f"{class_names[idx]} {p:.2f}",
                (x0 + bar_w + int(8 * scale), y),
                font,
                0.5 * scale,
                _WHITE,
                thick,
                cv2.LINE_AA,
            )
    for label, score in view.open_events:
        y += line_h
        cv2.putText(
            frame,
            f"EVENT {label} {score:.2f}",
            (int(6 * scale), y),
            font,
            0.6 * scale,
            _RED,
            thick + 1,
            cv2.LINE_AA,
        )
    if view.open_events:
        cv2.rectangle(frame, (0, 0), (w - 1, h - 1), _RED, max(2, int(4 * scale)))
    return frame


_LiveFrame = tuple[str, int, np.ndarray, float]  # source, frame index, frame, the source's fps


@dataclass(frozen=True)
class _Result:
    """The scores of one window, with what the overlay shows alongside them."""

    last_frame: int
    probs: np.ndarray
    inference_ms: float
    latency_ms: float
    open_events: tuple[tuple[str, float], ...]  # (label, score) open after this window


class _Replay:
    """The sink's own reader of one replayed file (used by the sink thread only)."""

    def __init__(self, name: str, opener: Opener) -> None:
        self.name = name
        self.opener = opener
        self.source: VideoSource | None = None
        self.next_index = 0  # index of the next frame to read, as the capture numbers them
        self.done = False

    def open(self) -> None:
        try:
            self.source = self.opener()
        except StreamdetError as exc:  # the capture reports the same failure as an error
            log.warning("%s: cannot read the file for the annotated video (%s)", self.name, exc)
            self.done = True

    def close(self) -> None:
        if self.source is not None:
            self.source.release()
            self.source = None


class OverlaySink(threading.Thread, BaseSink):
    """Draws and writes every frame of every source (see module docstring).

    Args:
        class_names: model classes.
        video_path: annotated video file; with several sources one file each (``name_<source>.mp4``).
        display: show a window per source with cv2.imshow (StreamdetError at once when no window
            can be opened here: see :func:`check_display`).
        sources: names of all sources, replayed or live.
        replays: per replayed source (a file read with ``realtime: false``), an opener of the
            file, read again by this sink: see the module docstring. The others are live: their
            frames come through :meth:`put_frame`.
        top_k: classes drawn.
        max_frames: bound of the live frame queue.
        stop_event: the run's stop event; once set, no more replay frames are drawn.

    As an output of the event stage (:class:`~streamdet.sinks.base.Sink`) it takes the frames of
    its live sources, every window's scores and the sources' statuses and rates; the caller
    starts its drawing thread (``start()``), and ``close()`` finishes it. A failure (a video
    that cannot be written) stops the drawing, is logged once and is named in the summary;
    detection goes on.
    """

    name = "overlay"

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        video_path: str | None,
        display: bool,
        sources: Sequence[str],
        replays: Mapping[str, Opener] | None = None,
        top_k: int = 3,
        max_frames: int = 96,
        stop_event: threading.Event | None = None,
    ) -> None:
        super().__init__(name="overlay", daemon=True)
        if display:
            check_display()
        self.class_names = list(class_names)
        self.video_path = video_path
        self.display = display
        self.sources = list(sources)
        self.top_k = top_k
        self.stop_event = stop_event or threading.Event()
        self._replays = {name: _Replay(name, opener) for name, opener in (replays or {}).items()}
        self._max_frames = max_frames
        # The condition's lock protects every attribute from here to the writers.
        self._cond = threading.Condition()
        self._live: deque[_LiveFrame] = deque()
        self._views = {s: SourceView() for s in sources}
        # Per source, in window order; pruned as frames are drawn (see _view_for). A replay keeps
        # every window detection is ahead by (a few hundred bytes each: about 1 MB for an hour
        # of video), so detection never waits; a live source needs only the newest few.
        self._results: dict[str, deque[_Result]] = {
            s: deque() if s in self._replays else deque(maxlen=256) for s in sources
        }
        self._ended: set[str] = set()  # sources whose windows have all been scored
        self._replays_done: set[str] = set()  # replays drawn to their last frame
        self._finishing = False
        # Used by the sink thread only.
        self._writers: dict[str, cv2.VideoWriter] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._paths: dict[str, Path] = {}
        self._frames_in_video: dict[str, int] = {}
        self.video_files: list[str] = []  # annotated videos written whole, in order
        self.failed_videos: list[str] = []  # why each video that did not play back was removed
        self.frames_written = 0
        self.frames_dropped = 0
        self.error: BaseException | None = None
        self.on_key: Callable[[int], None] | None = None

    # -- fed by the capture threads of live sources --------------------------------------------

    def put_frame(self, source: str, index: int, frame: np.ndarray, fps: float) -> None:
        """Queue a live frame; when the queue is full it is dropped and counted (never waits)."""
        with self._cond:
            if len(self._live) >= self._max_frames:
                self.frames_dropped += 1
                return
            self._live.append((source, index, frame, fps))
            self._cond.notify_all()

    # -- fed by the event stage -----------------------------------------------------------------

    def add_result(
        self,
        source: str,
        last_frame: int,
        probs: np.ndarray,
        inference_ms: float,
        latency_ms: float,
        open_events: Sequence[tuple[str, float]] = (),
    ) -> None:
        """The scores of the window ending at ``last_frame``; windows come in order per source."""
        with self._cond:
            self._results[source].append(
                _Result(last_frame, probs, inference_ms, latency_ms, tuple(open_events))
            )
            self._cond.notify_all()

    def set_view(
        self, source: str, *, status: str | None = None, fps_in: float | None = None
    ) -> None:
        """Live figures: the source's status and its measured capture rate."""
        with self._cond:
            view = self._views[source]
            if status is not None:
                view.status = status
            if fps_in is not None:
                view.fps_in = fps_in

    def source_ended(self, source: str) -> None:
        """Every window of ``source`` has been scored: a replay may be drawn to its last frame."""
        with self._cond:
            self._ended.add(source)
            self._cond.notify_all()

    def finish(self) -> None:
        """No more frames or results will come: draw the live frames queued, then close files.

        A replay is drawn on to its end unless the run is stopping (``stop_event``).
        """
        with self._cond:
            self._finishing = True
            self._cond.notify_all()

    def caught_up(self) -> bool:
        """True when every replay has been drawn to its last frame (or the sink has ended)."""
        with self._cond:
            return len(self._replays_done) == len(self._replays) or not self.is_alive()

    # -- as an output of the event stage (streamdet.sinks.base.Sink) ----------------------------

    def frame_sources(self) -> Collection[str]:
        return [s for s in self.sources if s not in self._replays]

    def on_frame(self, msg: FrameMessage) -> None:
        self.put_frame(msg.source, msg.index, msg.frame, msg.fps)

    def on_scores(self, msg: ScoresMessage) -> None:
        self.add_result(
            msg.source, msg.last_frame, msg.probs, msg.inference_ms, msg.latency_ms, msg.open_events
        )

    def on_status(self, msg: StatusMessage) -> None:
        self.set_view(msg.source, status=msg.status)

    def on_source_ended(self, source: str) -> None:
        self.source_ended(source)

    def on_stats(self, stats: RunStats) -> None:
        for source, s in stats.sources.items():
            if source in self._views:
                self.set_view(source, fps_in=s.fps_in)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish: draw what is left (a replay to its end unless the run is stopping), close
        and check the videos."""
        self.finish()
        if self.is_alive():
            self.join(timeout)

    def summary_lines(self) -> list[str]:
        lines = [f"annotated video: {video}" for video in self.video_files]
        # e.g. a full disk: removed, never named as written
        lines += [f"annotated video not written: {why}" for why in self.failed_videos]
        if self.error is not None:
            lines.append(f"annotated output failed: {self.error}")
        elif self.video_path and not self.video_files and not self.failed_videos:
            lines.append("annotated video: none written (no frame was decoded)")
        return lines

    # -- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            for replay in self._replays.values():
                replay.open()
                if replay.done:
                    self._replay_done(replay)
            while (work := self._wait_for_work()) is not None:
                live, drawable = work
                for item in live:
                    self._draw_and_write(*item)
                for name, count in drawable.items():
                    self._draw_replay(self._replays[name], count)
        except Exception as exc:
            self.error = exc
            log.error("annotated output stopped (detection goes on): %s", exc)
        finally:
            for replay in self._replays.values():
                replay.close()
            self._close_videos()
            if self.display:
                cv2.destroyAllWindows()

    def _wait_for_work(self) -> tuple[list[_LiveFrame], dict[str, int]] | None:
        """The live frames queued and, per replay, how many frames can be drawn now; None once
        finished with nothing left."""
        with self._cond:
            while True:
                live = list(self._live)
                self._live.clear()
                drawable = (
                    {}
                    if self.stop_event.is_set()
                    else {
                        r.name: n
                        for r in self._replays.values()
                        if not r.done and (n := self._drawable(r)) > 0
                    }
                )
                if live or drawable:
                    return live, drawable
                if self._finishing:
                    return None
                self._cond.wait(0.5)  # notified on every frame, result, end and finish

    def _drawable(self, replay: _Replay) -> int:
        """Frames of ``replay`` whose window is known: frame i shows the newest window ending at
        or before it, known once a window ending at or after i has been scored (windows come in
        order) or the source has ended. Caller holds the lock."""
        if replay.name in self._ended:
            return REPLAY_BATCH
        results = self._results[replay.name]
        if not results:
            return 0
        return min(REPLAY_BATCH, results[-1].last_frame - replay.next_index + 1)

    def _draw_replay(self, replay: _Replay, count: int) -> None:
        assert replay.source is not None
        for _ in range(count):
            frame = replay.source.read()
            if frame is None:
                self._replay_done(replay)
                return
            self._draw_and_write(replay.name, replay.next_index, frame, replay.source.fps or 10.0)
            replay.next_index += 1

    def _replay_done(self, replay: _Replay) -> None:
        replay.done = True
        replay.close()
        with self._cond:
            self._replays_done.add(replay.name)

    def _view_for(self, source: str, index: int) -> SourceView:
        """What frame ``index`` shows: the newest window ending at or before it (frames of a
        source come in index order)."""
        with self._cond:
            view = self._views[source]
            results = self._results[source]
            # A result followed by one that also ends at or before this frame is never shown again.
            while len(results) > 1 and results[1].last_frame <= index:
                results.popleft()
            if results and results[0].last_frame <= index:
                r = results[0]
                view.probs, view.window_last_frame = r.probs, r.last_frame
                view.inference_ms, view.latency_ms = r.inference_ms, r.latency_ms
                view.open_events = list(r.open_events)
            # Every frame of a replay was read while its file was open.
            status = "online" if source in self._replays else view.status
            return SourceView(
                view.probs,
                view.window_last_frame,
                list(view.open_events),
                status,
                view.fps_in,
                view.inference_ms,
                view.latency_ms,
            )

    def _draw_and_write(self, source: str, index: int, frame: np.ndarray, fps: float) -> None:
        view = self._view_for(source, index)
        if not frame.flags.writeable:  # a live frame, shared with the other outputs
            frame = frame.copy()
        frame = draw_overlay(frame, self.class_names, view, top_k=self.top_k, source=source)
        if self.video_path:
            writer = self._writers.get(source)
            if writer is None:
                writer = self._open_writer(source, frame, fps)
            if (frame.shape[1], frame.shape[0]) != self._sizes[source]:
                frame = cv2.resize(frame, self._sizes[source])
            writer.write(frame)
            self._frames_in_video[source] += 1
        if self.display:
            cv2.imshow(f"streamdet {source}", frame)
            key = cv2.waitKey(1) & 0xFF
            if key in (27, ord("q")):
                self.stop_event.set()
        self.frames_written += 1

    def _open_writer(self, source: str, frame: np.ndarray, fps: float) -> cv2.VideoWriter:
        assert self.video_path is not None
        path = video_file(self.video_path, source, len(self.sources))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamdetError(f"{path}: cannot write video ({exc.strerror or exc})") from exc
        size = (frame.shape[1], frame.shape[0])
        fourcc = cv2.VideoWriter.fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
        writer = cv2.VideoWriter(str(path), fourcc, fps or 10.0, size)
        if not writer.isOpened():
            raise StreamdetError(
                f"{path}: cannot write video (unsupported extension or folder not writable)"
            )
        self._sizes[source] = size
        self._writers[source] = writer
        self._paths[source] = path
        self._frames_in_video[source] = 0
        log.info("writing annotated video %s", path)
        return writer

    def _close_videos(self) -> None:
        """Close each video; keep it only if it plays back whole (see :func:`playback_problem`)."""
        for source, writer in self._writers.items():
            writer.release()
            path = self._paths[source]
            problem = playback_problem(path, self._frames_in_video[source])
            if problem is None:
                self.video_files.append(str(path))
                continue
            why = f"{path}: {problem}; is the disk full?"
            try:
                path.unlink()
                why += " The partial file was removed."
            except OSError as exc:
                why += f" The partial file could not be removed ({exc.strerror or exc})."
            log.warning("annotated video not written: %s", why)
            self.failed_videos.append(why)
        self._writers.clear()


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi")  # containers OpenCV's FFmpeg writes here


def check_video_path(path: str | Path) -> None:
    """Refuse, before a run starts, an annotated video that could not be written: a container
    OpenCV cannot write, or a folder that cannot be made or written (a file in the way).

    Raises:
        StreamdetError: naming the path and why.
    """
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise StreamdetError(
            f"{path}: cannot write video: unsupported extension "
            f"{path.suffix or '(none)'!r}; use one of {', '.join(VIDEO_SUFFIXES)}"
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise StreamdetError(f"{path}: cannot write video: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StreamdetError(f"{path}: cannot write video: folder {folder} is not writable")


def video_file(video_path: str | Path, source: str, sources: int) -> Path:
    """The annotated video of ``source``: ``video_path`` itself, or ``<stem>_<source>.<ext>``
    when the run has several sources."""
    path = Path(video_path)
    if sources > 1:
        path = path.with_name(f"{path.stem}_{source}{path.suffix or '.mp4'}")
    return path


def playback_problem(path: Path, frames: int) -> str | None:
    """Why the video at ``path`` does not play back all ``frames`` frames, or None when it does.

    OpenCV's VideoWriter reports no write error: on a full disk it leaves an MP4 without its
    index (moov atom), which nothing can open, or an AVI that holds only its first frames. So the
    file is opened again, its frame count compared and its last frame decoded (a seek: cheap).
    """
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            return "the file written does not open as a video"
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        if count != frames:
            return f"the file written holds {max(int(count), 0)} of the {frames} frames drawn"
        cap.set(cv2.CAP_PROP_POS_FRAMES, frames - 1)
        ok, _ = cap.read()
        return None if ok else "the last frame written does not decode"
    except cv2.error as exc:
        return f"the file written cannot be read back ({' '.join(str(exc).split())[:120]})"
    finally:
        cap.release()
