"""How a source's frames are timed: live, paced or replayed, decided once per source.

:func:`pacing_of` decides it from the source's config; the pipeline hands the one value to the
parts it concerns, and every setting that depends on it is derived here or from it there:

==============  =========================  ==========================  ===========================
part            ``LIVE`` (camera, stream)  ``PACED`` (file, realtime)  ``REPLAY`` (file, default)
==============  =========================  ==========================  ===========================
capture         frames at the source's     the file read at its own    as fast as inference takes
                pace, stamped when read    fps, stamped when read      them, stamped on the file's
                                                                       timeline
ring buffer     overwrites the oldest      overwrites the oldest       the writer waits: nothing
                                                                       skipped (``lossless``)
scheduler       the newest window when     the newest window when      every window, in order
                inference lags             inference lags
FFmpeg decode   FFmpeg's choice; one       FFmpeg's choice; one        one thread
                thread with as many        thread with as many         (``decode_threads``)
                sources as cores           sources as cores
overlay         the capture's frames       the capture's frames        its own read of the file
==============  =========================  ==========================  ===========================

A run whose sources are all replays also pads every forward pass to one batch size, so that its
events repeat exactly (:class:`~streamdet.inference.InferenceThread`'s ``fixed_batch``).

Example:
    >>> from streamdet.config import SourceConfig
    >>> pacing_of(SourceConfig(name="cam", url="rtsp://10.0.0.5/stream1"))
    <Pacing.LIVE: 'live'>
    >>> pacing_of(SourceConfig(name="clip", url="clip.mp4", realtime=True))
    <Pacing.PACED: 'paced'>
    >>> pacing_of(SourceConfig(name="clip", url="clip.mp4")).lossless
    True
    >>> import os
    >>> Pacing.LIVE.decode_threads(sources=os.cpu_count() or 1), Pacing.REPLAY.decode_threads()
    (1, 1)
"""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING

from streamdet.sources.opening import SourceKind, source_kind

if TYPE_CHECKING:
    from streamdet.config import SourceConfig

__all__ = ["Pacing", "pacing_of"]


class Pacing(enum.Enum):
    """How a source's frames are timed (see the module's table for what each part does)."""

    LIVE = "live"  # a camera or a stream: frames come when they come
    PACED = "paced"  # a file (realtime: true) read at its frame rate, like a camera
    REPLAY = "replay"  # a file (realtime: false) read as fast as inference takes its windows

    @property
    def lossless(self) -> bool:
        """True when no frame and no window may be skipped: capture waits for inference instead
        (a replay). Otherwise a ring overwrites the oldest frames and the scheduler takes the
        newest window when inference lags, so latency stays bounded."""
        return self is Pacing.REPLAY

    def decode_threads(self, sources: int = 1) -> int | None:
        """FFmpeg decoding threads for one of a run's ``sources`` sources.

        One for a replay, whose inference keeps every core busy (see
        :class:`~streamdet.sources.opening.OpenCVSource`), and for any source of a run with at
        least as many sources as cores, whose decoders already share every core between them:
        frame threading there only adds thread switches and a frame of latency per thread (27
        paced 10-fps cameras took 5-6% less CPU per frame on one thread each, see
        ``benchmarks/RESULTS.md``, 'Motion gating, fifth pass'). Else None: FFmpeg's choice.
        """
        if self is Pacing.REPLAY or sources >= (os.cpu_count() or 1):
            return 1
        return None


def pacing_of(source: SourceConfig) -> Pacing:
    """The pacing of a configured source: cameras and streams are live; a file is paced with
    ``realtime: true`` and replayed otherwise (``realtime`` is ignored for cameras and streams)."""
    if source_kind(source.url) is not SourceKind.FILE:
        return Pacing.LIVE
    return Pacing.PACED if source.realtime else Pacing.REPLAY
