"""Live pictures for every viewer: each source's newest annotated frame, JPEG-encoded once.

The web output's thread draws and encodes a source's frame at most ``mjpeg_fps`` times a second
(:meth:`LiveFrames.due`) and puts the bytes here; every viewer's request thread sends those same
bytes. A viewer waits for a newer frame with :meth:`LiveFrames.wait`, and only ever gets the
newest: one that reads slowly skips frames instead of queueing them, and nothing a viewer does
reaches the output's thread, let alone detection.

Example:
    >>> live = LiveFrames(["cam"], fps=5.0)
    >>> live.due("cam", now=10.0)
    True
    >>> live.put("cam", b"jpeg", wall_time=1.0, now=10.0)
    >>> live.due("cam", now=10.05), live.due("cam", now=10.2)
    (False, True)
    >>> live.latest("cam").seq
    1
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from streamdet.sinks.overlay import SourceView, draw_overlay

LIVE_MAX_WIDTH = 960  # frames wider than this are scaled down for the page (encoding cost)
JPEG_QUALITY = 80


@dataclass(frozen=True)
class LiveFrame:
    """One encoded frame of a source; ``seq`` grows with every frame of any source."""

    source: str
    jpeg: bytes
    seq: int
    wall_time: float  # when the frame was captured (UTC epoch s)
    monotonic: float  # when it was put here


def encode_live(
    frame: np.ndarray,
    class_names: Sequence[str],
    view: SourceView,
    source: str,
    *,
    max_width: int = LIVE_MAX_WIDTH,
    quality: int = JPEG_QUALITY,
) -> bytes:
    """``frame`` (BGR) scaled to at most ``max_width``, annotated like the overlay, as JPEG.

    The frame itself is never drawn on: other outputs share it.
    """
    h, w = frame.shape[:2]
    if w > max_width:
        # (H, W, 3) -> (H * max_width / W, max_width, 3): a new array, drawn on below
        size = (max_width, max(1, round(h * max_width / w)))
        picture = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    else:
        picture = frame.copy()
    picture = draw_overlay(picture, class_names, view, source=source)
    ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot encode a {w}x{h} frame of {source} as JPEG")
    return buf.tobytes()


class LiveFrames:
    """The newest encoded frame of each source, and a condition viewers wait on.

    Args:
        sources: every source's name.
        fps: at most this many frames a second per source (``web.mjpeg_fps``).
    """

    def __init__(self, sources: Collection[str], fps: float) -> None:
        self.interval_s = 1.0 / fps
        # The condition's lock protects the fields below. The output's thread puts; viewers'
        # threads read and wait.
        self._cond = threading.Condition()
        self._frames: dict[str, LiveFrame] = {}
        self._next_due = dict.fromkeys(sources, 0.0)
        self._seq = 0
        self._version = 0  # bumped by every frame and every other change a viewer shows
        self._closed = False

    def due(self, source: str, now: float | None = None) -> bool:
        """A frame of ``source`` should be encoded now (at most ``fps`` a second)."""
        now = time.monotonic() if now is None else now
        with self._cond:
            return now >= self._next_due.get(source, 0.0)

    def put(self, source: str, jpeg: bytes, wall_time: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._cond:
            self._seq += 1
            self._version += 1
            self._frames[source] = LiveFrame(source, jpeg, self._seq, wall_time, now)
            # The next one is due one interval after this one was due, not after it came (a
            # source at exactly mjpeg_fps keeps every frame), but never in a burst after a gap.
            due = max(self._next_due.get(source, 0.0), now - self.interval_s / 2)
            self._next_due[source] = due + self.interval_s
            self._cond.notify_all()

    def changed(self) -> None:
        """Something else a live viewer shows (an event, a status) changed: wake them."""
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every viewer for good: the server is stopping."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def latest(self, source: str) -> LiveFrame | None:
        with self._cond:
            return self._frames.get(source)

    def newer(self, seq: int, sources: Collection[str] | None = None) -> list[LiveFrame]:
        """The newest frame of each source (of ``sources``, or all) if newer than ``seq``."""
        with self._cond:
            return self._newer(seq, sources)

    def _newer(self, seq: int, sources: Collection[str] | None) -> list[LiveFrame]:  # locked
        return [
            f
            for name, f in self._frames.items()
            if f.seq > seq and (sources is None or name in sources)
        ]

    def wait(self, version: int, timeout: float) -> int:
        """Wait until the version passes ``version``, the timeout passes, or :meth:`close`;
        returns the version now."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._version <= version and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._version
