"""Media retention: delete clips and snapshots older than ``retain.days`` and keep the media
folder under ``retain.max_gb``, oldest first, never a file being written.

Files being written are never deleted: temporary names (``.<name>.part``, see
:func:`streamdet.media.clips.temp_path`) and the files an open event still writes (its snapshot
is rewritten as its score rises) are left, though they count towards the folder's size.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "old.mp4").write_bytes(b"x" * 10)
    >>> os.utime(folder / "old.mp4", (0, 0))
    >>> [p.name for p in sweep(folder, max_age_s=86400.0, max_bytes=None, busy=set())]
    ['old.mp4']
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from streamdet.media.clips import is_temp

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0


@dataclass(frozen=True)
class _File:
    path: Path
    mtime: float
    size: int


def _files(folder: Path) -> list[_File]:
    found = []
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root, name)
            try:
                st = path.stat()
            except OSError:  # deleted meanwhile
                continue
            found.append(_File(path, st.st_mtime, st.st_size))
    return found


def sweep(
    folder: Path,
    *,
    max_age_s: float | None,
    max_bytes: int | None,
    busy: Collection[Path],
    now: float | None = None,
) -> list[Path]:
    """Delete the media under ``folder`` older than ``max_age_s``, then the oldest until the
    folder holds at most ``max_bytes``; never a temporary file or one in ``busy``.

    Returns:
        The files deleted, oldest first.
    """
    now = time.time() if now is None else now
    files = sorted(_files(folder), key=lambda f: f.mtime)
    total = sum(f.size for f in files)
    deleted: list[Path] = []
    for f in files:
        too_old = max_age_s is not None and now - f.mtime > max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break  # oldest first: every later file is younger, and the folder fits
        if is_temp(f.path) or f.path in busy:
            continue
        try:
            f.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("retention: cannot delete %s: %s", f.path, exc)
            continue
        total -= f.size
        deleted.append(f.path)
    return deleted


class RetentionThread(threading.Thread):
    """Sweeps the media folder (see :func:`sweep`) at start, whenever :meth:`wake` is called (a
    clip or snapshot was added) and every ``interval_s``, until ``stop_event`` is set.

    Args:
        folder: the media folder.
        days: delete media older than this (None: no age limit).
        max_gb: keep the folder under this many gigabytes (None: no size limit).
        busy: the files still being written under their final names (called from this thread).
        stop_event: set when the run stops.
        interval_s: seconds between sweeps (the first is at once).
    """

    def __init__(
        self,
        folder: Path,
        *,
        days: float | None,
        max_gb: float | None,
        busy: Callable[[], Collection[Path]],
        stop_event: threading.Event,
        interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        super().__init__(name="media-retention", daemon=True)
        self.folder = folder
        self.max_age_s = None if days is None else days * 86400.0
        self.max_bytes = None if max_gb is None else int(max_gb * 1e9)
        self.busy = busy
        self.stop_event = stop_event
        self.interval_s = interval_s
        self.deleted = 0
        self._wake = threading.Event()

    def wake(self) -> None:
        """Sweep soon (media was added, or the run stops)."""
        self._wake.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._sweep()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _sweep(self) -> None:
        try:
            gone = sweep(
                self.folder,
                max_age_s=self.max_age_s,
                max_bytes=self.max_bytes,
                busy=set(self.busy()),
            )
        except OSError as exc:  # the folder itself went away: try again next time
            log.warning("retention: cannot sweep %s: %s", self.folder, exc)
            gone = []
        if gone:
            self.deleted += len(gone)
            log.info("retention: deleted %d media file(s) under %s", len(gone), self.folder)
