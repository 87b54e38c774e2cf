"""Turn per-window class probabilities into event lines: ``new``, ``update`` and ``end``.

Pure logic: no I/O, no threads, no clock. All times are the capture times passed in, so replaying
a recording gives the same log. Per source and class, the score is the mean of the last
``smoothing`` window probabilities. A class opens an event after ``open_windows`` consecutive
scores at or above its ``enter`` threshold and closes it when the score falls below ``exit``
(hysteresis). The event starts at the first window of that run, so confirmation does not delay
the onset. An event spans the frames its windows *stand for*: by default the whole window; with
``span`` (see :func:`window_span`) the central ``stride`` frames, so overlapping 16-frame windows
do not stretch a 1-second event by a window length on each side.

Example:
    >>> tracker = EventTracker(TrackerSettings(class_names=("none", "fall"), smoothing=1))
    >>> tracker.update("cam1", 0, 15, 100.0, 101.5, [0.1, 0.9])
    []
    >>> (new,) = tracker.update("cam1", 8, 23, 100.8, 102.3, [0.2, 0.8])
    >>> new.type, new.id, new.start_frame, new.end_frame
    ('new', 'cam1-fall-1', 0, 23)
    >>> [(c.type, c.end_reason) for c in tracker.close_all()]
    [('end', 'shutdown')]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

EventType = Literal["new", "update", "end"]
EndReason = Literal["score_drop", "stream_lost", "stream_ended", "shutdown"]
_CLOSE_REASONS = ("stream_lost", "stream_ended", "shutdown")

# Tolerances for comparisons, so that a mean of probabilities equal to a threshold reaches it,
# and a duration of exactly min_duration_s counts (epoch seconds near 1.7e9 resolve ~0.2 us).
_SCORE_EPS = 1e-9
_TIME_EPS = 1e-6


@dataclass(frozen=True)
class ClassRule:
    """Hysteresis thresholds of one class.

    Attributes:
        enter: a smoothed score at or above this (for ``open_windows`` windows) opens an event.
        exit: a smoothed score below this closes the event. ``0 <= exit <= enter <= 1``.
    """

    enter: float
    exit: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.exit <= self.enter <= 1.0:  # also rejects NaN
            raise ValueError(
                f"thresholds must satisfy 0 <= exit <= enter <= 1, "
                f"but got enter={self.enter}, exit={self.exit}"
            )


@dataclass(frozen=True)
class TrackerSettings:
    """How an :class:`EventTracker` turns scores into events.

    Attributes:
        class_names: model class labels, in the order of the probabilities.
        default_rule: thresholds of every class without an entry in ``rules``.
        rules: per-class threshold overrides, by label.
        smoothing: a class's score is the mean of its last ``smoothing`` window probabilities.
        open_windows: consecutive scores >= ``enter`` needed to open an event.
        min_duration_s: an event is announced only once ``end_time - start_time`` reaches
            this; an event that closes earlier produces no line at all.
        background: label that never produces events, or None when every class can.
        update_min_delta: an ``update`` needs the peak score to have risen (by at least this)
            since the event's last line.
        update_min_interval_s: ...and at least this much stream time since that line.
    """

    class_names: tuple[str, ...]
    default_rule: ClassRule = ClassRule(enter=0.6, exit=0.4)
    rules: Mapping[str, ClassRule] = field(default_factory=dict)
    smoothing: int = 3
    open_windows: int = 2
    min_duration_s: float = 0.0
    background: str | None = "none"
    update_min_delta: float = 0.05
    update_min_interval_s: float = 1.0

    def __post_init__(self) -> None:
        names = tuple(self.class_names)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))
        if not names or len(set(names)) != len(names):
            raise ValueError(f"class_names must be non-empty and unique, but got {names}")
        unknown = sorted(set(self.rules) - set(names))
        if unknown:
            raise ValueError(f"rules name classes {unknown} that are not in class_names {names}")
        for label, rule in [("default_rule", self.default_rule), *self.rules.items()]:
            if not isinstance(rule, ClassRule):
                raise ValueError(f"{label} must be a ClassRule, but got {type(rule).__name__}")
        if self.background is not None and self.background not in names:
            raise ValueError(
                f"background {self.background!r} is not in class_names {names} "
                f"(use background=None when there is no background class)"
            )
        if self.smoothing < 1 or self.open_windows < 1:
            raise ValueError(
                f"smoothing and open_windows must be >= 1, "
                f"but got smoothing={self.smoothing}, open_windows={self.open_windows}"
            )
        for name in ("min_duration_s", "update_min_delta", "update_min_interval_s"):
            value = getattr(self, name)
            if not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, but got {value}")

    def rule_for(self, label: str) -> ClassRule:
        """Returns the thresholds of class ``label``."""
        return self.rules.get(label, self.default_rule)


@dataclass(frozen=True)
class EventChange:
    """One line of the event log.

    Attributes:
        type: ``new`` when an event is announced, ``update`` when its peak rose, ``end``.
        id: ``f"{id_prefix}{source}-{label}-{n}"``; the same on every line of an event, unique in
            a run (and across runs when the prefix is the run id).
        source: the video source the event happened on.
        label: class label of the event.
        class_index: index of ``label`` in ``class_names``.
        score: smoothed score of the class at this line.
        peak_score: highest smoothed score of the event so far.
        threshold: the class's ``enter`` threshold.
        start_time: capture time (UTC epoch s) of the first frame of the event's first window's
            span (the whole window unless ``update`` was given a ``span``).
        end_time: capture time of the last frame of the span of the event's latest window whose
            score kept it open (on ``end`` after a score drop: the window before the drop).
        start_frame: first frame of the first window's span.
        end_frame: last frame of the span that set ``end_time``.
        window_first_frame: first frame of the window that caused this line (for ``end`` from a
            ``close_*`` call: the source's latest window).
        window_last_frame: newest frame of that window.
        window_time: capture time of that window's newest frame.
        end_reason: None, except on ``end`` lines.
    """

    type: EventType
    id: str
    source: str
    label: str
    class_index: int
    score: float
    peak_score: float
    threshold: float
    start_time: float
    end_time: float
    start_frame: int
    end_frame: int
    window_first_frame: int
    window_last_frame: int
    window_time: float
    end_reason: EndReason | None = None


@dataclass(frozen=True)
class _Window:
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    span: tuple[int, int, float, float]  # frames and times the window stands for in an event


def window_span(
    first_frame: int, last_frame: int, frame_times: Sequence[float] | np.ndarray, stride: int
) -> tuple[int, int, float, float]:
    """The part of a window an event is credited with: its central ``stride`` frames.

    Windows overlap when ``stride`` is less than their length, and each one shows an event some
    frames before and after the event itself. Giving each window only the ``stride`` frames around
    its centre tiles the stream with no overlap, and an event's extent then follows the frames
    that made its windows score. With ``stride`` >= the window's length the whole window is used.

    Args:
        first_frame: index of the window's first frame.
        last_frame: index of the window's newest frame.
        frame_times: capture time of each of the window's frames, oldest first.
        stride: frames between consecutive windows.

    Returns:
        ``(first_frame, last_frame, first_time, last_time)`` of the span. Frame indices are
        interpolated between ``first_frame`` and ``last_frame`` (exact when no frame was skipped).

    Example:
        >>> window_span(0, 15, [t / 10 for t in range(16)], stride=4)
        (6, 9, 0.6, 0.9)
    """
    n = len(frame_times)
    if n < 1 or stride < 1:
        raise ValueError(f"need at least one frame time and stride >= 1, but got {n} and {stride}")
    lo = max(0, (n - stride) // 2)
    hi = min(n - 1, lo + stride - 1)
    step = (last_frame - first_frame) / (n - 1) if n > 1 else 0.0
    return (
        first_frame + round(lo * step),
        first_frame + round(hi * step),
        float(frame_times[lo]),
        float(frame_times[hi]),
    )


@dataclass
class _Track:
    """One class on one source, from the first window of a run >= enter until it closes.

    Pending (not ``opened``) while the run is shorter than ``open_windows``; opened but silent
    (``id`` None) while shorter than ``min_duration_s``; announced once it has an ``id``.
    """

    start_time: float
    start_frame: int
    end_time: float = 0.0
    end_frame: int = 0
    score: float = 0.0
    peak: float = 0.0
    windows: int = 0
    opened: bool = False
    id: str | None = None
    emitted_peak: float = 0.0
    emitted_time: float = 0.0

    def extend(self, score: float, window: _Window) -> None:
        self.end_frame, self.end_time = window.span[1], window.span[3]
        self.score, self.peak = score, max(self.peak, score)
        self.windows += 1


@dataclass
class _Source:
    history: deque[np.ndarray]
    window: _Window
    tracks: dict[int, _Track] = field(default_factory=dict)  # by class index


class EventTracker:
    """Opens, updates and closes events from a stream of window probabilities per source.

    Not thread-safe: call it from one thread (the stage that owns the event log).

    Args:
        settings: thresholds, smoothing and rate limits.
        id_prefix: put before every event id, e.g. the run id, so ids stay unique in a log
            that several runs append to.
    """

    def __init__(self, settings: TrackerSettings, *, id_prefix: str = "") -> None:
        self.settings = settings
        self.id_prefix = id_prefix
        self._names = settings.class_names
        self._rules = tuple(settings.rule_for(name) for name in self._names)
        self._event_classes = tuple(
            i for i, name in enumerate(self._names) if name != settings.background
        )
        self._sources: dict[str, _Source] = {}
        self._count = 0  # events announced so far; numbers the ids

    def update(
        self,
        source: str,
        first_frame: int,
        last_frame: int,
        first_time: float,
        last_time: float,
        probs: Sequence[float] | np.ndarray,
        *,
        span: tuple[int, int, float, float] | None = None,
    ) -> list[EventChange]:
        """Feeds one window of ``source`` and returns the lines it causes, by class index.

        Args:
            source: name of the video source.
            first_frame: index of the window's first frame.
            last_frame: index of the window's newest frame.
            first_time: capture time (UTC epoch s) of the first frame.
            last_time: capture time of the newest frame.
            probs: one probability per class, in ``class_names`` order.
            span: ``(first_frame, last_frame, first_time, last_time)`` of the frames this window
                stands for in an event's extent (:func:`window_span`); the whole window if None.

        Raises:
            ValueError: ``probs`` has the wrong length or a non-finite value, a time is not
                finite, or ``last_frame < first_frame``.
        """
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (len(self._names),):
            raise ValueError(
                f"probs must have {len(self._names)} entries (one per class), "
                f"but got shape {p.shape}"
            )
        if not np.isfinite(p).all():
            raise ValueError(f"probs must be finite, but got {p.tolist()}")
        if not (math.isfinite(first_time) and math.isfinite(last_time)):
            raise ValueError(f"times must be finite, but got {first_time}, {last_time}")
        if last_frame < first_frame:
            raise ValueError(f"last_frame {last_frame} is before first_frame {first_frame}")
        if span is None:
            span = (first_frame, last_frame, first_time, last_time)
        elif not (
            first_frame <= span[0] <= span[1] <= last_frame
            and first_time <= span[2] <= span[3] <= last_time
        ):
            raise ValueError(f"span {span} must lie inside the window {first_frame}..{last_frame}")
        window = _Window(first_frame, last_frame, first_time, last_time, span)
        state = self._sources.get(source)
        if state is None:
            state = self._sources[source] = _Source(deque(maxlen=self.settings.smoothing), window)
        state.window = window
        state.history.append(p)
        scores = np.mean(state.history, axis=0)
        changes = (self._step(source, state, i, float(scores[i])) for i in self._event_classes)
        return [change for change in changes if change is not None]

    def close_source(self, source: str, reason: EndReason) -> list[EventChange]:
        """Ends the open events of ``source`` and forgets its history (no smoothing over a gap).

        Events not yet announced (shorter than ``min_duration_s``) end silently.

        Args:
            source: name of the video source; an unknown one returns no lines.
            reason: ``"stream_lost"``, ``"stream_ended"`` or ``"shutdown"``.

        Raises:
            ValueError: ``reason`` is not one of those.
        """
        if reason not in _CLOSE_REASONS:
            raise ValueError(f"reason must be one of {_CLOSE_REASONS}, but got {reason!r}")
        state = self._sources.pop(source, None)
        if state is None:
            return []
        return [
            self._line("end", source, i, track, state.window, track.score, reason)
            for i, track in sorted(state.tracks.items())
            if track.id is not None
        ]

    def close_all(self, reason: EndReason = "shutdown") -> list[EventChange]:
        """Ends the open events of every source; see :meth:`close_source`."""
        changes: list[EventChange] = []
        for source in list(self._sources):
            changes += self.close_source(source, reason)
        return changes

    def open_events(self, source: str | None = None) -> list[EventChange]:
        """Returns the latest state of each announced open event, as ``update`` lines.

        Args:
            source: only events of this source; None for all.
        """
        return [
            self._line("update", name, i, track, state.window, track.score)
            for name, state in self._sources.items()
            if source is None or name == source
            for i, track in sorted(state.tracks.items())
            if track.id is not None
        ]

    def _step(self, source: str, state: _Source, i: int, score: float) -> EventChange | None:
        """Advances class ``i`` of ``source`` by the window in ``state.window``."""
        rule, window, track = self._rules[i], state.window, state.tracks.get(i)
        if track is None or not track.opened:
            if score < rule.enter - _SCORE_EPS:
                state.tracks.pop(i, None)  # the run of windows >= enter is broken
                return None
            if track is None:
                track = state.tracks[i] = _Track(window.span[2], window.span[0])
            track.extend(score, window)
            track.opened = track.windows >= self.settings.open_windows
            if not track.opened:
                return None
        elif score < rule.exit - _SCORE_EPS:
            del state.tracks[i]
            if track.id is None:  # shorter than min_duration_s: never announced, never ended
                return None
            return self._line("end", source, i, track, window, score, "score_drop")
        else:
            track.extend(score, window)

        if track.id is None:
            if track.end_time - track.start_time < self.settings.min_duration_s - _TIME_EPS:
                return None
            self._count += 1
            track.id = f"{self.id_prefix}{source}-{self._names[i]}-{self._count}"
            return self._emit("new", source, i, track, window)
        rise, since = track.peak - track.emitted_peak, window.last_time - track.emitted_time
        rose = rise > 0 and rise >= self.settings.update_min_delta - _SCORE_EPS
        waited = since >= self.settings.update_min_interval_s - _TIME_EPS
        return self._emit("update", source, i, track, window) if rose and waited else None

    def _emit(
        self, type_: EventType, source: str, i: int, track: _Track, window: _Window
    ) -> EventChange:
        """Returns a ``new`` or ``update`` line and remembers it for rate limiting."""
        track.emitted_peak, track.emitted_time = track.peak, window.last_time
        return self._line(type_, source, i, track, window, track.score)

    def _line(
        self,
        type_: EventType,
        source: str,
        i: int,
        track: _Track,
        window: _Window,
        score: float,
        reason: EndReason | None = None,
    ) -> EventChange:
        assert track.id is not None
        return EventChange(
            type=type_,
            id=track.id,
            source=source,
            label=self._names[i],
            class_index=i,
            score=score,
            peak_score=track.peak,
            threshold=self._rules[i].enter,
            start_time=track.start_time,
            end_time=track.end_time,
            start_frame=track.start_frame,
            end_frame=track.end_frame,
            window_first_frame=window.first_frame,
            window_last_frame=window.last_frame,
            window_time=window.last_time,
            end_reason=reason,
        )
