"""Motion gating: a cheap activity measure per source, and the decision to skip a quiet window.

Most of a monitoring camera's day is an empty scene. :class:`ActivityMeter` looks at each
preprocessed frame as the capture writes it into its ring (a few tens of microseconds, see
``benchmarks/RESULTS.md``, 'Motion gating') and says how far it is from a slow reference of the
scene, relative to a noise floor it learns per source. :class:`Gate` then lets the inference
scheduler skip a window none of whose new frames (those the source's previous window did not
hold) was active, once the source's last active frame has reached the window's centre: the
window is handed to the event tracker as pure background, so open events end as they would,
without a forward pass. An active stretch of A frames so costs about (A + lag + hangover) /
stride scored windows, not (A + lag + 15) / stride + hangover as when a window was judged by
all 16 of its frames (see ``benchmarks/RESULTS.md``, 'Motion gating').

The measure compares each frame with the one ``lag_frames`` before it, on grids of 8x8-pixel
block means of each colour plane (3 x 14x14 blocks at 112x112; colour, not luma: a purple
object entering a tan room has the room's luma, and a luma measure missed it on a held-out
stream):

- ``local``: the largest block change against the reference once a global gain and offset
  (fitted by least squares over the blocks) are taken out, so a small object crossing counts
  while flicker, auto-exposure and a slow brightness ramp do not;
- ``global``: the mean absolute block change, so lights off, a covered or moved camera count.

Each is divided by its own threshold, ``median + sensitivity * 1.4826 * MAD + margin`` of its
recent history (the adaptive floor: sensor noise, rain, compression flicker raise it). The
history takes the value of every quiet frame, and of one active frame in ``ACTIVE_SAMPLE``
clipped to twice the threshold: on a busy stream, events hardly move the median (taking every
frame, a held-out synthetic stream, about half events, had its floor raised tenfold), and a
lasting rise in noise is still learnt, within a few history lengths.

Why a short lag, not a slow running reference of the scene: against a reference with a time
constant of 20 frames, what arrived and stayed counted for seconds after, and those decaying
tails, judged quiet once below the threshold, fed the floor's history and raised it until real
events (a fall, a camera covered) no longer counted. A lag only sees change while it happens,
which is what the event classes are (what stays still afterwards is background to the model too).

Example:
    >>> import numpy as np
    >>> meter = ActivityMeter()
    >>> rng = np.random.default_rng(0)
    >>> scene = rng.normal(0, 1, (3, 112, 112)).astype(np.float32)
    >>> quiet = [meter.update(scene + rng.normal(0, 0.05, scene.shape)) for _ in range(64)]
    >>> max(quiet[WARMUP_FRAMES:]) < 1.0
    True
    >>> moved = scene.copy()
    >>> moved[:, 40:60, 40:52] += 1.5  # a small object appears
    >>> meter.update(moved) > 1.0
    True
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from streamdet.buffer import Scene, Window

BLOCK = 8  # pixels per block side: 8x8 block means of a 112x112 frame make a 14x14 grid
WARMUP_FRAMES = 16  # frames after a (re)start left unmeasured (activity inf): no reference yet
HISTORY_FRAMES = 256  # frames of measures the noise floor is taken from
FLOOR_EVERY = 8  # frames between recomputations of the floor (a median of the history)
ACTIVE_SAMPLE = 8  # one active frame in this many enters the history


@dataclass(frozen=True)
class GateSettings:
    """How one source's activity is measured and gated (``window.gating`` in the config).

    Args:
        sensitivity: floor = median + sensitivity * (1.4826 * MAD) of the measure's history;
            larger is less sensitive.
        local_margin: least block change (normalised units) above the floor that counts.
        global_margin: least mean block change (normalised units) above the floor that counts.
        lag_frames: each frame is compared with the one this many frames before it.
        keepalive_s: a quiet source is looked at once this many seconds (of its frame times)
            have passed since it was last scored or looked at: scored if its scene has drifted
            from the one last scored (a change too slow for the activity measure), else not.
        keepalive_max_s: a quiet source is scored at least this often even when its scene is
            unchanged (None: 10 x ``keepalive_s``; ``keepalive_s`` scores every keep-alive).
        hangover_frames: windows are still scored until the newest active frame lies this many
            frames back from their newest frame. The default, 8, half the model's 16-frame
            window, scores until the end of an event has reached the window's centre, which is
            where the model was trained to place what it names (the stride does not matter:
            2 windows at stride 4, 1 at stride 8).
    """

    sensitivity: float = 1.5
    local_margin: float = 0.1
    global_margin: float = 0.08
    lag_frames: int = 4
    keepalive_s: float = 30.0
    keepalive_max_s: float | None = None
    hangover_frames: int = 8

    def __post_init__(self) -> None:
        if self.lag_frames < 1:
            raise ValueError(f"lag_frames must be >= 1, but got {self.lag_frames}")
        if self.sensitivity < 0 or self.local_margin < 0 or self.global_margin < 0:
            raise ValueError("sensitivity and margins must be >= 0")
        if self.hangover_frames < 0:
            raise ValueError(f"hangover_frames must be >= 0, but got {self.hangover_frames}")
        if self.keepalive_s <= 0:
            raise ValueError(f"keepalive_s must be > 0, but got {self.keepalive_s}")
        if self.keepalive_max_s is not None and self.keepalive_max_s < self.keepalive_s:
            raise ValueError(
                f"keepalive_max_s must be >= keepalive_s ({self.keepalive_s}), but got "
                f"{self.keepalive_max_s}"
            )

    @property
    def keepalive_max(self) -> float:
        """``keepalive_max_s``, or its default, 10 x ``keepalive_s``."""
        return 10 * self.keepalive_s if self.keepalive_max_s is None else self.keepalive_max_s


class _Floor:
    """The adaptive noise floor of one measure: median + k * MAD of its clipped history."""

    def __init__(self, sensitivity: float, margin: float) -> None:
        self.sensitivity = sensitivity
        self.margin = margin
        self._history = np.zeros(HISTORY_FRAMES, np.float32)
        self._count = 0
        self.threshold = math.inf  # until the first recomputation: everything is active
        self._active_seen = 0

    def add(self, value: float, active: bool) -> None:
        """Learn from one frame's ``value``; ``active``: the frame was judged active."""
        if active and math.isfinite(self.threshold):
            self._active_seen += 1
            if self._active_seen % ACTIVE_SAMPLE:
                return
            value = min(value, 2.0 * self.threshold)
        self._history[self._count % HISTORY_FRAMES] = value
        self._count += 1
        if self._count >= WARMUP_FRAMES and self._count % FLOOR_EVERY == 0:
            self._recompute()

    def _recompute(self) -> None:
        history = self._history[: min(self._count, HISTORY_FRAMES)]
        median = float(np.median(history))
        mad = float(np.median(np.abs(history - median)))
        self.threshold = median + self.sensitivity * 1.4826 * mad + self.margin


class ActivityMeter:
    """Activity of one source's frames against a slow reference and a learnt noise floor.

    Args:
        settings: thresholds and rates (the defaults suit normalised 112x112 frames).

    ``update`` returns the frame's activity: the larger of its local and global measure, each
    divided by its threshold. Above 1.0 the frame is active; infinite while warming up.
    """

    def __init__(self, settings: GateSettings | None = None) -> None:
        self.settings = settings or GateSettings()
        self._local = _Floor(self.settings.sensitivity, self.settings.local_margin)
        self._global = _Floor(self.settings.sensitivity, self.settings.global_margin)
        self._past: deque[np.ndarray] = deque(maxlen=self.settings.lag_frames)
        self._since_reset = 0
        self._scene: Scene | None = None

    def reset(self) -> None:
        """Forget the past frames (a reconnect or a new resolution); the floor is kept."""
        self._past = deque(maxlen=self.settings.lag_frames)
        self._since_reset = 0
        self._scene = None

    def update(self, frame: np.ndarray) -> float:
        """Measures one preprocessed (C, H, W) frame and learns from it; returns its activity."""
        grid = block_means(frame)
        past = self._past  # read once: reset() may come from a watchdog's thread
        if past and past[0].shape != grid.shape:
            past.clear()
            self._since_reset = 0
        reference = past[0] if past else grid
        local, global_ = change_measures(grid, reference)
        past.append(grid)
        self._since_reset += 1
        activity = max(local / self._local.threshold, global_ / self._global.threshold)
        self._local.add(local, activity > 1.0)
        self._global.add(global_, activity > 1.0)
        if self._since_reset <= WARMUP_FRAMES:
            self._scene = None
            return math.inf
        self._scene = Scene(grid, self._local.threshold, self._global.threshold)
        return activity

    def scene(self) -> Scene | None:
        """The last frame's block grid and the thresholds it was judged by; None in a warm-up."""
        return self._scene


def block_means(frame: np.ndarray) -> np.ndarray:
    """Each plane of a (C, H, W) frame as a grid of about BLOCK x BLOCK means,
    (C, H // BLOCK, W // BLOCK)."""
    c, h, w = frame.shape
    size = (max(1, w // BLOCK), max(1, h // BLOCK))
    # (H, W) -> (H // BLOCK, W // BLOCK) per plane: OpenCV's area mean took a tenth of the time
    # of numpy's reshape-mean
    planes = [cv2.resize(frame[i], size, interpolation=cv2.INTER_AREA) for i in range(c)]
    return np.stack(planes).reshape(c, size[1], size[0]).astype(np.float32, copy=False)


def change_measures(grid: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(local, global) change of ``grid`` against ``reference``, both (C, h, w) block grids.

    local: the largest block residual after a least-squares gain and offset fit of each plane on
    its reference (a global brightness change is explained by the fit); global: the mean
    absolute block change.
    """
    c = grid.shape[0]
    x = reference.reshape(c, -1)
    y = grid.reshape(c, -1)
    dx = x - x.mean(axis=1, keepdims=True)
    dy = y - y.mean(axis=1, keepdims=True)
    var = (dx * dx).sum(axis=1)
    gain = np.where(var > 1e-6, (dx * dy).sum(axis=1) / np.maximum(var, 1e-6), 1.0)
    residual = dy - gain[:, None] * dx
    return float(np.abs(residual).max()), float(np.abs(y - x).mean())


def scene_changed(now: Scene, seen: Scene) -> bool:
    """Whether the scene ``now`` differs from ``seen`` by more than ``now``'s noise thresholds
    (the activity measure at a lag of however long lies between them)."""
    local, global_ = change_measures(now.grid, seen.grid)
    return local > now.local_threshold or global_ > now.global_threshold


class Gate:
    """Decides per window whether it is scored, and counts the decisions per source.

    Args:
        settings: per source name, its settings; a source without an entry is never gated.
        background_probs: the probabilities a gated window is given (all mass on the
            background class).

    Not thread-safe: the inference scheduler calls it under its own lock.
    """

    def __init__(self, settings: Mapping[str, GateSettings], background_probs: np.ndarray) -> None:
        self.settings = dict(settings)
        self.background_probs = np.asarray(background_probs, np.float32)
        self._looked: dict[str, float] = {}  # per source: frame time last scored or looked at
        # per source: the frame time and the scene (None: unmeasured) of its last scored window
        self._last_score: dict[str, tuple[float, Scene | None]] = {}
        self._last_active: dict[str, int] = {}  # seq of the newest active frame seen per source
        self.scored: dict[str, int] = {}
        self.gated: dict[str, int] = {}

    def should_score(self, window: Window) -> bool:
        """True unless ``window``'s source is gated, none of the frames new to the window was
        active, the source's newest active frame lies more than ``hangover_frames`` before the
        window's newest frame, and no keep-alive is due.

        A keep-alive is due once ``keepalive_s`` have passed since the source was last scored
        or looked at. It scores the window if the scene has drifted from the one last scored
        (:func:`scene_changed`: what changes too slowly for the activity measure), if the scene
        was not measured, or if ``keepalive_max_s`` have passed since the last score; otherwise
        the source counts as looked at. A keep-alive of an unchanged scene only repeated what
        the model had said of it (each source's first keep-alive is still scored: the model has
        not seen its scene). See ``benchmarks/RESULTS.md``, 'Motion gating, fourth pass'.

        A source's first keep-alive window comes a fixed fraction of the period
        (:func:`keepalive_phase`) after its first window, so cameras started together spread
        theirs. Unmeasured frames (the meter's warm-up, its first 16 frames after a start or a
        reconnect) are not a reason to score: the window after them is measured. Scoring every
        source's first window made a burst as long as the camera count at every start: 24
        cameras' first windows were 2.4 s of forward passes on 2 cores, so windows were skipped
        at the start of a run the machine held in steady state.
        """
        settings = self.settings.get(window.source)
        score = settings is None or self._wanted(window, settings)
        if score:
            self._looked[window.source] = window.last_time
            self._last_score[window.source] = (window.last_time, window.scene)
            self.scored[window.source] = self.scored.get(window.source, 0) + 1
        else:
            self.gated[window.source] = self.gated.get(window.source, 0) + 1
        return score

    def _wanted(self, window: Window, settings: GateSettings) -> bool:
        """Whether a gated source's ``window`` is active, in its hangover or due a keep-alive."""
        if window.newest_active >= 0:
            self._last_active[window.source] = window.newest_active
        last_active = self._last_active.get(window.source)
        if 1.0 < window.activity < math.inf or (
            last_active is not None and window.seq - last_active <= settings.hangover_frames
        ):
            return True
        now = window.last_time
        looked = self._looked.get(window.source)
        if looked is None:  # the keep-alive clock starts with the source's first window
            looked = now - keepalive_phase(window.source) * settings.keepalive_s
            self._looked[window.source] = looked
        if 0.0 <= now - looked < settings.keepalive_s:
            return False
        # A keep-alive is due (or the clock jumped): score unless the scene is the one scored.
        scored_at, seen = self._last_score.get(window.source, (now, None))
        if seen is None or window.scene is None:
            return True  # never scored, or a scene that was not measured: nothing to compare
        if not 0.0 <= now - scored_at < settings.keepalive_max or scene_changed(window.scene, seen):
            return True
        self._looked[window.source] = now
        return False


def keepalive_phase(source: str) -> float:
    """A fixed fraction in [0, 1) of the keep-alive period for ``source`` (from its name): its
    first keep-alive window comes that much earlier, so sources started together spread theirs.
    """
    return zlib.crc32(source.encode()) % 1000 / 1000
