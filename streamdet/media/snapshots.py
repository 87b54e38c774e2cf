"""Event snapshots: a JPEG of the frame at an event's highest score.

A live source's frames reach the media output through its bounded frame queue (drops possible),
so :class:`FrameBuffer` keeps the last few seconds of them by frame index, bounded in frames and
bytes; a file's frame is read from the file itself (:func:`read_file_frame`). A snapshot is
written to a temporary name and renamed (:func:`write_jpeg`), so it is never seen half written.

Example:
    >>> import numpy as np
    >>> buffer = FrameBuffer(max_frames=2, max_bytes=10**6)
    >>> for i in range(3):
    ...     buffer.add(i, np.zeros((4, 4, 3), np.uint8))
    >>> buffer.nearest(0)[0], buffer.newest_index
    (1, 2)
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import av
import cv2
import numpy as np

from streamdet.media.clips import finish_file, temp_path


class FrameBuffer:
    """The newest decoded frames of one source, by capture frame index (one thread uses it).

    Args:
        max_frames: frames kept.
        max_bytes: bytes of pixels kept (the oldest go first; the newest is always kept).
    """

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[tuple[int, np.ndarray]] = deque()
        self._bytes = 0

    def add(self, index: int, frame: np.ndarray) -> None:
        self._frames.append((index, frame))
        self._bytes += frame.nbytes
        while len(self._frames) > 1 and (
            len(self._frames) > self.max_frames or self._bytes > self.max_bytes
        ):
            _, old = self._frames.popleft()
            self._bytes -= old.nbytes

    @property
    def newest_index(self) -> int | None:
        return self._frames[-1][0] if self._frames else None

    def nearest(self, index: int) -> tuple[int, np.ndarray] | None:
        """The kept frame closest to ``index`` (the earlier one on a tie); None when empty."""
        best = None
        for kept in self._frames:
            if best is None or abs(kept[0] - index) < abs(best[0] - index):
                best = kept
        return best

    def clear(self) -> None:
        self._frames.clear()
        self._bytes = 0


def render(frame: np.ndarray, *, height: int | None, caption: str | None) -> np.ndarray:
    """``frame`` resized to ``height`` (aspect kept; never enlarged) with ``caption`` drawn."""
    if height is not None and frame.shape[0] > height:
        width = max(1, round(frame.shape[1] * height / frame.shape[0]))
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    if caption:
        frame = frame.copy()
        scale = max(0.4, frame.shape[0] / 600)
        thickness = max(1, round(scale * 2))
        (w, h), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        cv2.rectangle(frame, (0, 0), (w + 8, h + base + 8), (0, 0, 0), -1)
        cv2.putText(
            frame,
            caption,
            (4, h + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )
    return frame


def write_jpeg(path: Path, frame: np.ndarray, quality: int) -> int:
    """Write ``frame`` (BGR) as a JPEG at ``path``, whole or not at all; returns its size.

    Raises:
        OSError: the file cannot be written.
        ValueError: OpenCV cannot encode the frame.
    """
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot encode a {frame.shape} frame as JPEG")
    temp = temp_path(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data.tobytes())
    finally:
        os.close(fd)
    finish_file(temp, path)
    return int(data.size)


def read_file_frame(path: Path, index: int) -> np.ndarray | None:
    """Frame ``index`` (0 = the first decoded) of a video file, BGR; None when it has none.

    The file is sought to the keyframe before the frame's time (``index / fps`` on the
    stream's timeline) and decoded from there.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or stream.time_base is None:
            return None
        offset = stream.start_time or 0
        target = offset + int(index / rate / stream.time_base)
        half_frame = int(1 / rate / stream.time_base / 2)
        container.seek(target, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= target - half_frame:
                return frame.to_ndarray(format="bgr24")
    return None
