"""Clip data sets for training and evaluation: synthetic events and UCF101-style folders.

Every clip goes through :func:`streamdet.preprocess.preprocess_frame`, the function live capture
uses, so a model sees the same pixels in training and in production.

A UCF101-style folder is ``root/<class>/<video>``. Optional split files list one video per line
as ``<class>/<video>`` (a trailing label number, as in UCF101's ``trainlist01.txt``, is ignored).

Example:
    >>> ds = SyntheticClips(seed=0, length=4)
    >>> x, y = ds[0]
    >>> tuple(x.shape), 0 <= y < 8
    ((3, 16, 112, 112), True)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from streamdet.data import synthetic
from streamdet.errors import ConfigError, SourceError
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract, preprocess_frame

CLIP_LENGTH = 16


def frames_to_clip(
    frames: Sequence[np.ndarray] | np.ndarray, contract: PreprocessContract = DEFAULT_CONTRACT
) -> torch.Tensor:
    """Preprocess decoded BGR frames into one model input clip (3, T, crop, crop)."""
    out = np.empty((len(frames), 3, contract.crop, contract.crop), np.float32)
    for i, frame in enumerate(frames):
        preprocess_frame(frame, contract, out=out[i])
    # (T, C, H, W) -> (C, T, H, W)
    return torch.from_numpy(out).permute(1, 0, 2, 3).contiguous()


@dataclass(frozen=True)
class Augment:
    """Clip augmentation. Flips are skipped for classes in ``no_flip`` (their meaning would change)."""

    hflip: bool = True
    no_flip: frozenset[int] = frozenset()
    brightness: float = 0.0
    contrast: float = 0.0

    def __call__(self, clip: torch.Tensor, label: int, rng: np.random.Generator) -> torch.Tensor:
        if self.hflip and label not in self.no_flip and rng.random() < 0.5:
            clip = clip.flip(-1)
        if self.contrast > 0 or self.brightness > 0:
            a = 1.0 + rng.uniform(-self.contrast, self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            clip = clip * a + b
        return clip


class SyntheticClips(Dataset):
    """Synthetic event clips; item ``i`` is a pure function of ``(seed, start + i)``.

    Args:
        seed: data set seed (training and validation use different seeds).
        length: number of clips.
        start: index of the first clip (training moves on by one epoch of clips every epoch).
        difficulty: a float, or a callable ``index -> difficulty`` for a curriculum.
        background_videos: see :func:`synthetic.load_background_frames`.
        augment: training augmentation (None for evaluation).
    """

    classes = synthetic.CLASSES

    def __init__(
        self,
        seed: int,
        length: int,
        *,
        start: int = 0,
        difficulty: float | _Curriculum = 1.0,
        background_videos: Sequence[str] = (),
        augment: Augment | None = None,
        contract: PreprocessContract = DEFAULT_CONTRACT,
    ) -> None:
        self.seed = seed
        self.length = length
        self.start = start
        self.difficulty = difficulty
        self.background_videos = tuple(background_videos)
        self.augment = augment
        self.contract = contract
        if self.background_videos:
            _load_backgrounds_here(self.background_videos)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = self.start + int(i)
        d = self.difficulty(index) if callable(self.difficulty) else self.difficulty
        real = (
            synthetic.load_background_frames(self.background_videos)
            if self.background_videos
            else ()
        )
        frames, label = synthetic.make_clip(self.seed, index, difficulty=d, background_frames=real)
        clip = frames_to_clip(frames, self.contract)
        if self.augment is not None:
            clip = self.augment(clip, label, np.random.default_rng([self.seed, index, 0xA6]))
        return clip, label


def _load_backgrounds_here(specs: Sequence[str]) -> None:
    """Read the background videos in this process, once (they are cached; forked DataLoader
    workers inherit the cache). A video that cannot be read is one clear SourceError naming it;
    raised in a worker, it would arrive wrapped in that worker's traceback."""
    from streamdet.sources import check_sources

    paths = [str(synthetic.resolve_video_path(spec)) for spec in specs]  # SourceError: missing
    try:  # empty or not a video: opened the way sources are, FFmpeg kept quiet
        check_sources(paths)
        synthetic.load_background_frames(specs)
    except SourceError as exc:
        raise SourceError(f"background video {exc}") from None


@dataclass(frozen=True)
class _Curriculum:
    """Difficulty as a function of the global clip index (picklable for worker processes)."""

    clips_per_epoch: int
    start: float
    final: float
    epochs: int

    def __call__(self, index: int) -> float:
        if self.epochs <= 0:
            return self.final
        epoch = index / self.clips_per_epoch
        u = min(1.0, epoch / self.epochs)
        return self.start + (self.final - self.start) * u


def curriculum(clips_per_epoch: int, start: float, final: float, epochs: int) -> _Curriculum:
    return _Curriculum(clips_per_epoch, start, final, epochs)


# --------------------------------------------------------------------------------------------
# UCF101-style folders


@dataclass(frozen=True)
class VideoItem:
    path: Path
    label: int


def _read_split(path: Path, root: Path, classes: Sequence[str]) -> list[VideoItem]:
    if not path.is_file():
        raise ConfigError(f"{path}: split file not found")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel = line.split()[0]
        cls = rel.replace("\\", "/").split("/")[0]
        if cls not in classes:
            raise ConfigError(f"{path}:{n}: class {cls!r} is not one of {list(classes)[:6]}...")
        video = root / rel
        if not video.is_file():
            raise ConfigError(f"{path}:{n}: video {video} not found")
        items.append(VideoItem(video, classes.index(cls)))
    return items


def scan_folder(
    root: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    train_list: str | None = None,
    val_list: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    extensions: Sequence[str] = (".avi", ".mp4", ".mkv", ".mov", ".webm"),
) -> tuple[list[str], list[VideoItem], list[VideoItem]]:
    """Classes, training videos and validation videos of a UCF101-style folder.

    Without split files, each class's videos are split with a seeded shuffle, ``val_fraction``
    of them (at least one when a class has two or more) held out.

    Raises:
        ConfigError: missing folder, no classes or no videos, unknown class in a split file.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: data folder not found")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = list(classes) if classes else found
    if not names:
        raise ConfigError(f"{root}: no class sub-folders (expected root/<class>/<video>)")
    missing = [c for c in names if c not in found]
    if missing:
        raise ConfigError(f"{root}: class folders {missing} not found (found {found[:6]})")
    exts = {e.lower() for e in extensions}
    if train_list or val_list:
        train = _read_split(Path(train_list), root, names) if train_list else []
        val = _read_split(Path(val_list), root, names) if val_list else []
    else:
        rng = np.random.default_rng(seed)
        train, val = [], []
        for label, cls in enumerate(names):
            videos = sorted(
                p for p in (root / cls).iterdir() if p.suffix.lower() in exts and p.is_file()
            )
            order = rng.permutation(len(videos))
            n_val = int(round(len(videos) * val_fraction))
            if val_fraction > 0 and len(videos) >= 2:
                n_val = max(1, n_val)
            for rank, j in enumerate(order):
                (val if rank < n_val else train).append(VideoItem(videos[j], label))
    if not train:
        raise ConfigError(f"{root}: no training videos with endings {sorted(exts)}")
    return names, train, val


def read_video_clip(
    path: str | os.PathLike[str],
    *,
    contract: PreprocessContract = DEFAULT_CONTRACT,
    length: int = CLIP_LENGTH,
    position: float | None = 0.5,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Decode ``length`` frames of a video at the contract's frame rate.

    The frame step is ``contract.step_for(video fps)``. ``position`` in [0, 1] places the clip in
    the video (0.5: centred); ``None`` picks a random start with ``rng``. Short videos repeat
    their last frame.

    Raises:
        SourceError: the file cannot be opened or has no frames.
    """
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SourceError(f"{path}: cannot open video")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        step = contract.step_for(fps)
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        span = (length - 1) * step + 1
        room = max(0, total - span)
        if position is None:
            start = int((rng or np.random.default_rng()).integers(0, room + 1))
        else:
            start = int(round(room * position))
        if start > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        frames: list[np.ndarray] = []
        k = 0
        while len(frames) < length:
            ok, frame = cap.read()
            if not ok:
                break
            if k % step == 0:
                frames.append(frame)
            k += 1
    finally:
        cap.release()
    if not frames:
        raise SourceError(f"{path}: no frames could be decoded")
    while len(frames) < length:
        frames.append(frames[-1])
    return frames


class VideoFolderClips(Dataset):
    """Clips from a list of labelled videos, decoded with OpenCV.

    Training (``train=True``) draws ``clips_per_video`` random positions per video, seeded by
    ``(seed, index)``; evaluation takes the centre clip of each video.
    """

    def __init__(
        self,
        items: Sequence[VideoItem],
        classes: Sequence[str],
        *,
        train: bool = False,
        clips_per_video: int = 1,
        seed: int = 0,
        augment: Augment | None = None,
        contract: PreprocessContract = DEFAULT_CONTRACT,
    ) -> None:
        self.items = list(items)
        self.classes = tuple(classes)
        self.train = train
        self.clips_per_video = clips_per_video if train else 1
        self.seed = seed
        self.augment = augment
        self.contract = contract
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items) * self.clips_per_video

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[int(i) % len(self.items)]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        frames = read_video_clip(
            item.path, contract=self.contract, position=None if self.train else 0.5, rng=rng
        )
        clip = frames_to_clip(frames, self.contract)
        if self.augment is not None:
            clip = self.augment(clip, item.label, rng)
        return clip, item.label


class ResumableSampler(Sampler[int]):
    """Indices ``0..n-1`` (shuffled by ``(seed, epoch)`` when ``shuffle``), starting at ``skip``.

    Resuming in the middle of an epoch replays exactly the rest of that epoch's order.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, epoch: int, skip: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch, self.skip = n, shuffle, seed, epoch, skip

    def __iter__(self) -> Iterator[int]:
        order = (
            np.random.default_rng([self.seed, self.epoch, 0x0D]).permutation(self.n)
            if self.shuffle
            else np.arange(self.n)
        )
        return iter(order[self.skip :].tolist())

    def __len__(self) -> int:
        return max(0, self.n - self.skip)
