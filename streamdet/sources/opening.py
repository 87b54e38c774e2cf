"""Opening video sources: cameras, files and network streams, and which library reads each.

Files and network streams are read with PyAV (:mod:`streamdet.sources.pyav`), which also gives
the encoded packets event clips are cut from; cameras (webcam indexes) with OpenCV
(:class:`OpenCVSource`), also the fallback for what PyAV cannot read (:func:`backend_for`).

Credentials in URLs never leave this module in clear: every URL shown goes through
:func:`~streamdet.redaction.redact_url`, every message quoting OpenCV or FFmpeg through
:func:`~streamdet.redaction.redact_text`, and a source's secrets are registered (so that
``redact_text`` masks them anywhere) before it is opened.

Example:
    >>> source_kind("rtsp://10.0.0.5/stream1"), source_kind("0"), source_kind("clip.mp4")
    (<SourceKind.STREAM: 'stream'>, <SourceKind.CAMERA: 'camera'>, <SourceKind.FILE: 'file'>)
"""

from __future__ import annotations

import enum
import os
import re
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from streamdet.errors import ConfigError, SourceError
from streamdet.redaction import MASK, redact_text, redact_url, register_secrets

__all__ = [
    "Backend",
    "OpenCVSource",
    "SourceKind",
    "VideoSource",
    "backend_for",
    "check_sources",
    "source_kind",
    "source_name",
]


class SourceKind(enum.Enum):
    CAMERA = "camera"
    FILE = "file"
    STREAM = "stream"


def source_kind(url: str) -> SourceKind:
    """Classify a source string: a camera index, a network URL, or a file path."""
    text = str(url).strip()
    if re.fullmatch(r"\d{1,3}", text):
        return SourceKind.CAMERA
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", text) and not text.lower().startswith("file://"):
        return SourceKind.STREAM
    return SourceKind.FILE


class Backend(enum.Enum):
    """The library that decodes a source."""

    PYAV = "pyav"  # FFmpeg through PyAV: frames and encoded packets from one demuxer
    OPENCV = "opencv"  # OpenCV's VideoCapture: webcams, and the fallback


def backend_for(url: str, option: str = "auto") -> Backend:
    """The backend of a source: ``option`` (``sources[].options.backend``) unless ``auto``,
    which picks PyAV for files and network streams and OpenCV for camera indexes.

    Raises:
        ConfigError: ``pyav`` asked for a camera index (PyAV opens no webcam here).

    Example:
        >>> backend_for("rtsp://10.0.0.5/stream1"), backend_for("0")
        (<Backend.PYAV: 'pyav'>, <Backend.OPENCV: 'opencv'>)
    """
    kind = source_kind(url)
    if option == "auto":
        return Backend.OPENCV if kind is SourceKind.CAMERA else Backend.PYAV
    backend = Backend(option)
    if backend is Backend.PYAV and kind is SourceKind.CAMERA:
        raise ConfigError(
            f"camera {url}: backend pyav reads files and network streams; use opencv or auto"
        )
    return backend


def source_name(url: str, taken: set[str]) -> str:
    """A short unique name for a source given only by its URL (``--source``).

    A stream's name is its host and path with every credential left out, never a secret.

    Example:
        >>> source_name("rtsp://10.0.0.5/user=admin_password=s3cret_channel=1", set())
        '10.0.0.5_channel_1'
    """
    kind = source_kind(url)
    if kind is SourceKind.CAMERA:
        base = f"camera{url.strip()}"
    elif kind is SourceKind.FILE:
        base = Path(url).stem or "file"
    else:
        base = _stream_name(url)
    base = re.sub(r"[^A-Za-z0-9_.\-]+", "_", base)
    base = re.sub(r"_+", "_", base).strip("_")[:48] or "source"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


# A masked parameter with the separator before it, "_password=***": left out of a stream's name.
_MASKED_PARAM = re.compile(r"[/_&;?]?[A-Za-z0-9%._\-]*(?:=|%3[Dd])" + re.escape(MASK))


def _stream_name(url: str) -> str:
    """Host and path of a stream URL, redacted, without its masked parameters."""
    try:
        parsed = urllib.parse.urlsplit(redact_url(url))
        host = parsed.hostname or "stream"
    except ValueError:  # an unclosed IPv6 address, "rtsp://[::1"
        return "stream"
    path = _MASKED_PARAM.sub("", parsed.path).replace(MASK, "")
    return host + path.replace("/", "_")


class VideoSource(Protocol):
    """What capture needs from a source. ``read`` returns None when no frame came.

    A source may also offer ``skip() -> bool``: advance one frame without returning it (False
    when no frame came), which capture uses for frames the model does not sample; and, to keep
    the encoded stream, ``stream_info`` and ``drain_packets(frame_index, wall_time)``
    (:class:`~streamdet.sources.pyav.PyAVSource`).
    """

    fps: float | None

    def read(self) -> np.ndarray | None: ...

    def release(self) -> None: ...


_ffmpeg_env_lock = threading.Lock()


def _configure_ffmpeg_once() -> None:
    # Must be set before the first FFmpeg open in the process. TCP avoids UDP loss on RTSP;
    # a short analyzeduration cuts seconds off the time to first frame.
    with _ffmpeg_env_lock:
        os.environ.setdefault(
            "OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp|analyzeduration;500000"
        )
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # quiet: FFmpeg may print URLs
        # OpenCV's own log lines can contain URLs with passwords; we report failures ourselves.
        cv2.utils.logging.setLogLevel(
            cv2.utils.logging.LOG_LEVEL_SILENT
        )  # cv2.setLogLevel: not in OpenCV 5


class OpenCVSource:
    """A camera, file or stream read with OpenCV.

    Args:
        url: camera index ("0"), file path, or rtsp:// / http(s):// URL.
        open_timeout_s: for URLs, give up opening after this long.
        read_timeout_s: for URLs, a read blocking this long fails.
        fps: override the reported frame rate.
        decode_threads: FFmpeg decoding threads for a file or stream (None: FFmpeg's choice, one
            per core). One costs less CPU per H.264 frame than frame threading on two (see
            benchmarks/RESULTS.md, 'Inference workers: two one-thread workers instead of one
            two-thread team'), so a replay whose inference keeps every core busy decodes on one.

    Raises:
        SourceError: the source cannot be opened (the message never contains a password).
    """

    def __init__(
        self,
        url: str,
        *,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        fps: float | None = None,
        decode_threads: int | None = None,
    ) -> None:
        _configure_ffmpeg_once()
        register_secrets(url)
        self.url = url
        self.kind = source_kind(url)
        shown = redact_url(url)
        try:
            self._open(url, shown, open_timeout_s, read_timeout_s, decode_threads)
        except cv2.error as exc:  # e.g. a malformed URL or a corrupt header; never a traceback
            raise SourceError(
                f"{shown}: cannot open ({redact_text(' '.join(str(exc).split()))})"
            ) from None
        reported = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps or (reported if reported and 0 < reported <= 1000 else None)
        self.frame_count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def _open(
        self,
        url: str,
        shown: str,
        open_timeout_s: float,
        read_timeout_s: float,
        decode_threads: int | None,
    ) -> None:
        threads = [] if decode_threads is None else [cv2.CAP_PROP_N_THREADS, decode_threads]
        if self.kind is SourceKind.CAMERA:
            self._cap = cv2.VideoCapture(int(url))
            if not self._cap.isOpened():
                raise SourceError(f"camera {url}: cannot open (no such video device?)")
        elif self.kind is SourceKind.FILE:
            path = _video_file(url)
            self._cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, threads)
            if not self._cap.isOpened():
                raise SourceError(f"{path}: cannot decode video (corrupt or unsupported format)")
        else:
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(read_timeout_s * 1000),
                *threads,
            ]
            self._cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
            if not self._cap.isOpened():
                self._cap.release()
                raise SourceError(
                    f"{shown}: cannot open stream (unreachable, refused, unauthorized or timed out)"
                )

    def read(self) -> np.ndarray | None:
        try:
            ok, frame = self._cap.read()
        except cv2.error:  # a corrupt packet the decoder cannot survive: treat as a failed read
            return None
        if not ok or frame is None or frame.size == 0:
            return None
        return frame

    def skip(self) -> bool:
        """Advance one frame without converting it to BGR (``grab``): for H.264 the
        conversion is a large share of a ``read``'s cost, for MJPEG a smaller one."""
        try:
            return bool(self._cap.grab())
        except cv2.error:
            return False

    def release(self) -> None:
        self._cap.release()

    def __enter__(self) -> OpenCVSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _video_file(url: str) -> Path:
    """The path of a file source; SourceError when it is missing, empty or not a file."""
    path = Path(url.removeprefix("file://"))
    if not path.exists():
        raise SourceError(f"{path}: video file not found")
    if not path.is_file() or path.stat().st_size == 0:
        raise SourceError(f"{path}: not a readable video file (empty or not a file)")
    return path


def check_sources(urls: Sequence[str], *, open_files: bool = True) -> None:
    """Fail fast, with a clear message, when there is no source, or a file source is missing,
    empty or (``open_files``) not a video FFmpeg can open: its container is opened, not decoded,
    which takes milliseconds for an H.264 file. Without ``open_files`` only the path is checked;
    a capture reports a file it cannot open with the same message."""
    if not urls:
        raise ConfigError("no sources: give --source URL or list sources in the config")
    for url in urls:
        if source_kind(url) is SourceKind.FILE:
            if open_files:
                OpenCVSource(url, decode_threads=1).release()
            else:
                _video_file(url)
