"""Annotated frames: top classes with score bars, open events and live figures, at source resolution.

:func:`draw_overlay` draws on one frame. :class:`OverlaySink` runs in its own thread, takes every
decoded frame from the capture threads through a bounded queue, pairs it with the newest scores
known for that frame, and writes it to a video file and/or a window.

For replays (``lossless``) a frame waits until the window that ends at or after it has been
scored, so the annotated video is the same on every run. Live frames are drawn at once with the
latest scores; when the sink falls behind, frames are dropped and counted, never queued forever.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from streamdet.errors import StreamdetError

log = logging.getLogger(__name__)

_GREEN = (60, 200, 60)
_RED = (40, 40, 230)
_WHITE = (255, 255, 255)
_PANEL = (24, 24, 24)


@functools.cache
def display_problem() -> str | None:
    """Why frames cannot be shown in a window here, or None when they can.

    Probed once per process in a child process: without a usable display, OpenCV's Qt backend
    aborts the whole process at the first window (exit 134), which would lose the events still
    open. Costs about a second, only for runs that show a window.
    """
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    probe = "import cv2; cv2.namedWindow('streamdet-probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "opening a window did not finish in 30 s"
    if done.returncode == 0:
        return None
    said = next((line.strip() for line in done.stderr.splitlines() if line.strip()), f"exit code {done.returncode}")
    return f"OpenCV cannot open a window ({said[:160]})"


def check_display() -> None:
    """Raise a StreamdetError when frames cannot be shown in a window (see :func:`display_problem`)."""
    problem = display_problem()
    if problem is not None:
        raise StreamdetError(f"cannot show frames in a window: {problem}; write an annotated video "
                             f"instead (--output-video or sinks.overlay.video)")


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


def draw_overlay(frame: np.ndarray, class_names: Sequence[str], view: SourceView, *, top_k: int = 3,
                 source: str = "") -> np.ndarray:
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
    roi = frame[0:panel_h, 0:min(w, panel_w)]
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
            cv2.putText(frame, f"{class_names[idx]} {p:.2f}", (x0 + bar_w + int(8 * scale), y), font,
                        0.5 * scale, _WHITE, thick, cv2.LINE_AA)
    for label, score in view.open_events:
        y += line_h
        cv2.putText(frame, f"EVENT {label} {score:.2f}", (int(6 * scale), y), font, 0.6 * scale, _RED,
                    thick + 1, cv2.LINE_AA)
    if view.open_events:
        cv2.rectangle(frame, (0, 0), (w - 1, h - 1), _RED, max(2, int(4 * scale)))
    return frame


@dataclass
class _Result:
    last_frame: int
    probs: np.ndarray
    inference_ms: float
    latency_ms: float


class OverlaySink(threading.Thread):
    """Draws and writes every frame of every source (see module docstring).

    Args:
        class_names: model classes.
        video_path: annotated video file; with several sources one file each (``name_<source>.mp4``).
        display: show a window per source with cv2.imshow (StreamdetError at once when no window
            can be opened here: see :func:`check_display`).
        lossless: names of replayed sources whose frames wait for their scores.
        top_k: classes drawn.
        max_frames: bound of the frame queue.
    """

    def __init__(self, class_names: Sequence[str], *, video_path: str | None, display: bool,
                 sources: Sequence[str], lossless: frozenset[str] = frozenset(), top_k: int = 3,
                 max_frames: int = 96, stop_event: threading.Event | None = None) -> None:
        super().__init__(name="overlay", daemon=True)
        if display:
            check_display()
        self.class_names = list(class_names)
        self.video_path = video_path
        self.display = display
        self.sources = list(sources)
        self.lossless = lossless
        self.top_k = top_k
        self.stop_event = stop_event or threading.Event()
        self._frames: queue.Queue[tuple[str, int, np.ndarray, float] | None] = queue.Queue(max_frames)
        # The condition's lock protects _views, _results and _ended.
        self._cond = threading.Condition()
        self._views = {s: SourceView() for s in sources}
        # Per source, in window order; pruned as frames are drawn (see _view_for). The bound is
        # far above what a replay can run ahead (frame queue + ring) and caps a stalled sink.
        self._results: dict[str, deque[_Result]] = {s: deque(maxlen=256) for s in sources}
        self._ended: set[str] = set()
        self._writers: dict[str, cv2.VideoWriter] = {}
        self.video_files: list[str] = []  # annotated videos opened, in order
        self.frames_written = 0
        self.frames_dropped = 0
        self.error: BaseException | None = None
        self.on_key: Callable[[int], None] | None = None

    # -- fed by the capture threads -----------------------------------------------------------

    def put_frame(self, source: str, index: int, frame: np.ndarray, fps: float) -> None:
        if source in self.lossless:
            while not self.stop_event.is_set():
                try:
                    self._frames.put((source, index, frame, fps), timeout=0.2)
                    return
                except queue.Full:
                    continue
        else:
            try:
                self._frames.put_nowait((source, index, frame, fps))
            except queue.Full:
                self.frames_dropped += 1

    # -- fed by the event stage ---------------------------------------------------------------

    def add_result(self, source: str, last_frame: int, probs: np.ndarray, inference_ms: float,
                   latency_ms: float) -> None:
        with self._cond:
            self._results[source].append(_Result(last_frame, probs, inference_ms, latency_ms))
            self._cond.notify_all()

    def set_view(self, source: str, *, open_events: list[tuple[str, float]] | None = None,
                 status: str | None = None, fps_in: float | None = None) -> None:
        with self._cond:
            view = self._views[source]
            if open_events is not None:
                view.open_events = open_events
            if status is not None:
                view.status = status
            if fps_in is not None:
                view.fps_in = fps_in

    def source_ended(self, source: str) -> None:
        with self._cond:
            self._ended.add(source)
            self._cond.notify_all()

    def finish(self) -> None:
        """No more frames will come: drain the queue, close files."""
        while True:
            try:
                self._frames.put(None, timeout=0.2)
                return
            except queue.Full:
                if not self.is_alive():
                    return

    # -- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                item = self._frames.get()
                if item is None:
                    break
                self._draw_and_write(*item)
        except BaseException as exc:
            self.error = exc
            self.stop_event.set()
        finally:
            for writer in self._writers.values():
                writer.release()
            if self.display:
                cv2.destroyAllWindows()

    def _view_for(self, source: str, index: int) -> SourceView:
        with self._cond:
            if source in self.lossless:
                # Wait for the window covering this frame, unless the source is over or we stop.
                while (
                    not any(r.last_frame >= index for r in self._results[source])
                    and source not in self._ended
                    and not self.stop_event.is_set()
                    and not self._frames.full()
                ):
                    self._cond.wait(0.2)
            view = self._views[source]
            results = self._results[source]
            # Frames of a source come in index order: a result followed by one that also ends at
            # or before this frame will never be shown again.
            while len(results) > 1 and results[1].last_frame <= index:
                results.popleft()
            if results and results[0].last_frame <= index:
                r = results[0]
                view.probs, view.window_last_frame = r.probs, r.last_frame
                view.inference_ms, view.latency_ms = r.inference_ms, r.latency_ms
            return SourceView(view.probs, view.window_last_frame, list(view.open_events), view.status,
                              view.fps_in, view.inference_ms, view.latency_ms)

    def _draw_and_write(self, source: str, index: int, frame: np.ndarray, fps: float) -> None:
        view = self._view_for(source, index)
        frame = draw_overlay(frame, self.class_names, view, top_k=self.top_k, source=source)
        if self.video_path:
            writer = self._writers.get(source)
            if writer is None:
                writer = self._open_writer(source, frame, fps)
            if (frame.shape[1], frame.shape[0]) != self._sizes[source]:
                frame = cv2.resize(frame, self._sizes[source])
            writer.write(frame)
        if self.display:
            cv2.imshow(f"streamdet {source}", frame)
            key = cv2.waitKey(1) & 0xFF
            if key in (27, ord("q")):
                self.stop_event.set()
        self.frames_written += 1

    _sizes: dict[str, tuple[int, int]]

    def _open_writer(self, source: str, frame: np.ndarray, fps: float) -> cv2.VideoWriter:
        assert self.video_path is not None
        path = Path(self.video_path)
        if len(self.sources) > 1:
            path = path.with_name(f"{path.stem}_{source}{path.suffix or '.mp4'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamdetError(f"{path}: cannot write video ({exc.strerror or exc})") from exc
        size = (frame.shape[1], frame.shape[0])
        fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
        writer = cv2.VideoWriter(str(path), fourcc, fps or 10.0, size)
        if not writer.isOpened():
            raise StreamdetError(f"{path}: cannot write video (unsupported extension or folder not writable)")
        if not hasattr(self, "_sizes"):
            self._sizes = {}
        self._sizes[source] = size
        self._writers[source] = writer
        self.video_files.append(str(path))
        log.info("writing annotated video %s", path)
        return writer
