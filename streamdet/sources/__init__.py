"""Video sources: opening them, and the capture threads that read them into ring buffers.

One module per part:

- :mod:`~streamdet.sources.opening`: what kind a source is, its short name, which library reads
  it (:func:`backend_for`), cameras read with OpenCV (:class:`OpenCVSource`), the start-up check.
- :mod:`~streamdet.sources.pyav`: files and streams read with PyAV (:class:`PyAVSource`):
  decoded frames and the encoded packets event clips are cut from, from one demuxer.
- :mod:`~streamdet.sources.decoding`: ``decode: cpu`` (host frames, the default) or ``gpu``
  (frames as tensors on a device, :class:`~streamdet.sources.decoding.DevicePath`), and the
  one-warning fallback where ``gpu`` cannot run.
- :mod:`~streamdet.sources.nvdec`: NVDEC decoding through PyNvVideoCodec, PyAV demuxing
  (:class:`~streamdet.sources.nvdec.NvdecSource`).
- :mod:`~streamdet.sources.pacing`: whether a source is live, a paced file or a replay
  (:class:`Pacing`, decided once per source by :func:`pacing_of`), and what that means for
  capture, the ring buffer, the inference scheduler and the outputs.
- :mod:`~streamdet.sources.capture`: a :class:`CaptureThread` per source reads, stamps and
  preprocesses its frames into the source's ring buffer, reconnecting what it loses.
- :mod:`~streamdet.sources.backoff`: the delays between reconnects (:class:`Backoff`).
- :mod:`~streamdet.sources.watchdog`: when a capture session is stuck, and the bound on the
  threads left blocked (:class:`AbandonedThreads`).

Credentials in URLs never leave this package in clear: every URL shown goes through
:func:`redact_url`, every message quoting OpenCV or FFmpeg through :func:`redact_text`, and a
source's secrets are registered (so that ``redact_text`` masks them anywhere) before it is
opened. ``redact_url``, ``redact_text`` and ``register_secrets`` are re-exported from
:mod:`streamdet.redaction`.

Example:
    >>> redact_url("rtsp://admin:s3cret@10.0.0.5:554/stream1")
    'rtsp://admin:***@10.0.0.5:554/stream1'
"""

from streamdet.redaction import redact_text, redact_url, register_secrets
from streamdet.sources.backoff import Backoff
from streamdet.sources.capture import (
    CaptureStats,
    CaptureThread,
    Opener,
    SourceOpener,
    Status,
    StatusChange,
    make_opener,
)
from streamdet.sources.opening import (
    Backend,
    OpenCVSource,
    SourceKind,
    VideoSource,
    backend_for,
    check_sources,
    source_kind,
    source_name,
)
from streamdet.sources.pacing import Pacing, pacing_of
from streamdet.sources.pyav import PyAVSource
from streamdet.sources.watchdog import AbandonedThreads, StuckThreadsError

__all__ = [
    "AbandonedThreads",
    "Backend",
    "Backoff",
    "CaptureStats",
    "CaptureThread",
    "OpenCVSource",
    "Opener",
    "SourceOpener",
    "Pacing",
    "PyAVSource",
    "SourceKind",
    "Status",
    "StatusChange",
    "StuckThreadsError",
    "VideoSource",
    "backend_for",
    "check_sources",
    "make_opener",
    "pacing_of",
    "redact_text",
    "redact_url",
    "register_secrets",
    "source_kind",
    "source_name",
]
