"""Tests of the event tracker: example behaviour, settings validation and log invariants."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdet.events import ClassRule, EventChange, EventTracker, TrackerSettings, window_span

NAMES = ("none", "fall", "fight")
T0 = 1_700_000_000.0  # stream start, UTC epoch s
FPS = 10.0
LENGTH = 16  # frames per window
STRIDE = 8  # frames between window starts: windows span 1.5 s and come every 0.8 s


def window(k: int) -> tuple[int, int, float, float]:
    """Returns (first_frame, last_frame, first_time, last_time) of the k-th window."""
    first = k * STRIDE
    last = first + LENGTH - 1
    return first, last, T0 + first / FPS, T0 + last / FPS


def probs(fall: float = 0.0, fight: float = 0.0) -> list[float]:
    return [max(0.0, 1.0 - fall - fight), fall, fight]


def feed(
    tracker: EventTracker, rows: list[list[float]], source: str = "cam", start: int = 0
) -> list[list[EventChange]]:
    """Feeds windows start, start + 1, ... and returns the lines of each window."""
    return [tracker.update(source, *window(start + k), row) for k, row in enumerate(rows)]


def make_tracker(**overrides) -> EventTracker:
    """A tracker with raw scores (no smoothing) unless overridden."""
    return EventTracker(TrackerSettings(class_names=NAMES, **{"smoothing": 1, **overrides}))


def test_event_opens_after_open_windows_consecutive_windows_above_enter() -> None:
    tracker = make_tracker(open_windows=3)

    lines = feed(tracker, [probs(fall=0.7)] * 3)

    assert lines[0] == [] and lines[1] == []
    (new,) = lines[2]
    assert (new.type, new.label, new.class_index, new.id) == ("new", "fall", 1, "cam-fall-1")
    # The onset is the first window of the run, not the window that confirmed it.
    assert (new.start_frame, new.start_time) == (window(0)[0], window(0)[2])
    assert (new.end_frame, new.end_time) == (window(2)[1], window(2)[3])
    assert (new.window_first_frame, new.window_last_frame, new.window_time) == (
        window(2)[0],
        window(2)[1],
        window(2)[3],
    )
    assert new.score == pytest.approx(0.7) and new.peak_score == pytest.approx(0.7)
    assert new.threshold == 0.6 and new.end_reason is None


def test_broken_run_restarts_the_open_windows_count() -> None:
    tracker = make_tracker(open_windows=2)

    lines = feed(tracker, [probs(fall=0.7), probs(fall=0.5), probs(fall=0.7), probs(fall=0.7)])

    assert lines[:3] == [[], [], []]
    assert [line.type for line in lines[3]] == ["new"]
    assert lines[3][0].start_frame == window(2)[0]


def test_hysteresis_keeps_event_open_between_exit_and_enter() -> None:
    tracker = make_tracker(open_windows=1, update_min_delta=1.0)
    scores = [0.7, 0.5, 0.45, 0.55, 0.3]

    lines = feed(tracker, [probs(fall=s) for s in scores])

    assert [[line.type for line in window_lines] for window_lines in lines] == [
        ["new"],
        [],
        [],
        [],
        ["end"],
    ]
    end = lines[4][0]
    assert end.end_reason == "score_drop" and end.score == pytest.approx(0.3)
    # The event ends with the last window that kept it open, not the one that closed it.
    assert (end.end_frame, end.end_time) == (window(3)[1], window(3)[3])
    assert end.window_last_frame == window(4)[1]
    assert end.peak_score == pytest.approx(0.7)


def test_per_class_override_threshold_applies() -> None:
    tracker = make_tracker(rules={"fight": ClassRule(enter=0.9, exit=0.5)})

    quiet = feed(tracker, [probs(fall=0.2, fight=0.75)] * 2)
    loud = feed(tracker, [probs(fall=0.7, fight=0.25)] * 2, start=2)
    fight = feed(tracker, [probs(fight=0.95)] * 2, start=4)

    assert quiet == [[], []]
    assert [(c.type, c.label, c.threshold) for c in loud[1]] == [("new", "fall", 0.6)]
    assert [(c.type, c.label, c.threshold) for c in fight[0]] == [("end", "fall", 0.6)]
    assert [(c.type, c.label, c.threshold) for c in fight[1]] == [("new", "fight", 0.9)]


def test_smoothing_averages_the_last_k_windows() -> None:
    tracker = make_tracker(smoothing=3, open_windows=1, update_min_delta=1.0)

    # Smoothed fall scores: 0.3, 0.6 (= enter exactly), 0.7, then (0.9 + 0.9 + 0.0) / 3 = 0.6.
    lines = feed(tracker, [probs(fall=0.3), probs(fall=0.9), probs(fall=0.9), probs()])

    assert lines[0] == []
    assert [c.type for c in lines[1]] == ["new"]
    assert lines[1][0].score == pytest.approx(0.6)
    assert lines[1][0].start_frame == window(1)[0]
    assert lines[3] == []
    assert tracker.open_events()[0].score == pytest.approx(0.6)


def test_steady_probability_equal_to_enter_opens_despite_rounding() -> None:
    """Regression: the mean of three 0.7s is 0.6999999999999998, which missed enter=0.7."""
    tracker = make_tracker(smoothing=3, open_windows=3, default_rule=ClassRule(0.7, 0.7))

    lines = feed(tracker, [probs(fall=0.7)] * 4)

    assert [[c.type for c in cs] for cs in lines] == [[], [], ["new"], []]


def test_update_is_rate_limited() -> None:
    tracker = make_tracker(open_windows=1, update_min_delta=0.05, update_min_interval_s=2.0)
    scores = [0.6, 0.7, 0.8, 0.9, 0.95]  # windows 0.8 s apart

    lines = feed(tracker, [probs(fall=s) for s in scores])

    assert [[c.type for c in window_lines] for window_lines in lines] == [
        ["new"],
        [],  # 0.8 s after the new: too soon
        [],  # 1.6 s: too soon
        ["update"],  # 2.4 s
        [],  # 0.8 s after the update
    ]
    update = lines[3][0]
    assert update.peak_score == pytest.approx(0.9) and update.id == lines[0][0].id


def test_update_needs_peak_to_rise_by_update_min_delta() -> None:
    tracker = make_tracker(open_windows=1, update_min_delta=0.1, update_min_interval_s=0.0)
    scores = [0.6, 0.65, 0.72, 0.75, 0.6, 0.83]

    lines = feed(tracker, [probs(fall=s) for s in scores])

    updates = [(k, c.peak_score) for k, cs in enumerate(lines) for c in cs if c.type == "update"]
    assert updates == [(2, pytest.approx(0.72)), (5, pytest.approx(0.83))]


def test_update_with_zero_delta_still_needs_a_higher_peak() -> None:
    tracker = make_tracker(open_windows=1, update_min_delta=0.0, update_min_interval_s=0.0)

    lines = feed(tracker, [probs(fall=s) for s in [0.7, 0.7, 0.65, 0.71]])

    assert [[c.type for c in cs] for cs in lines] == [["new"], [], [], ["update"]]


def test_several_classes_can_be_open_at_once_on_one_source() -> None:
    tracker = make_tracker(open_windows=1, rules={"fight": ClassRule(enter=0.3, exit=0.2)})

    lines = feed(tracker, [probs(fall=0.6, fight=0.35), probs(fall=0.1, fight=0.3)])

    assert [(c.type, c.label) for c in lines[0]] == [("new", "fall"), ("new", "fight")]
    assert [(c.type, c.label) for c in lines[1]] == [("end", "fall")]
    assert [c.label for c in tracker.open_events("cam")] == ["fight"]


def test_sources_are_smoothed_and_tracked_independently() -> None:
    tracker = make_tracker(smoothing=2, open_windows=1)

    a = tracker.update("a", *window(0), probs(fall=0.9))
    b = tracker.update("b", *window(0), probs(fall=0.1))
    b += tracker.update("b", *window(1), probs(fall=0.1))

    assert [(c.type, c.source, c.id) for c in a] == [("new", "a", "a-fall-1")]
    assert b == []  # b's scores are not averaged with a's 0.9
    assert [c.source for c in tracker.open_events()] == ["a"]
    assert tracker.open_events("b") == []


def test_close_source_ends_its_events_with_the_given_reason() -> None:
    tracker = make_tracker(open_windows=1)
    feed(tracker, [probs(fall=0.9), probs(fall=0.8)], source="a")
    feed(tracker, [probs(fight=0.9)], source="b")

    (end,) = tracker.close_source("a", "stream_lost")

    assert (end.type, end.source, end.end_reason) == ("end", "a", "stream_lost")
    assert (end.end_frame, end.end_time, end.window_last_frame) == (
        window(1)[1],
        window(1)[3],
        window(1)[1],
    )
    assert end.score == pytest.approx(0.8) and end.peak_score == pytest.approx(0.9)
    assert [c.source for c in tracker.open_events()] == ["b"]
    assert tracker.close_source("a", "stream_lost") == []
    assert tracker.close_source("never-seen", "stream_ended") == []


def test_close_source_resets_smoothing() -> None:
    tracker = make_tracker(smoothing=3, open_windows=1)
    feed(tracker, [probs(fall=0.9)] * 2)
    tracker.close_source("cam", "stream_lost")

    # Without the reset the score would be (0.9 + 0.9 + 0.3) / 3 = 0.7 and open an event.
    after = feed(tracker, [probs(fall=0.3)], start=10)

    assert after == [[]]


def test_close_source_resets_the_open_windows_count() -> None:
    tracker = make_tracker(open_windows=2)
    feed(tracker, [probs(fall=0.9)])
    tracker.close_source("cam", "stream_lost")

    after = feed(tracker, [probs(fall=0.9)] * 2, start=10)

    assert after[0] == []
    assert [c.type for c in after[1]] == ["new"]
    assert after[1][0].start_frame == window(10)[0]


def test_close_all_ends_every_source_and_ids_keep_counting() -> None:
    tracker = make_tracker(open_windows=1)
    feed(tracker, [probs(fall=0.9)], source="a")
    feed(tracker, [probs(fall=0.9)], source="b")

    ends = tracker.close_all()
    (again,) = feed(tracker, [probs(fall=0.9)], source="a", start=5)

    assert [(c.id, c.end_reason) for c in ends] == [
        ("a-fall-1", "shutdown"),
        ("b-fall-2", "shutdown"),
    ]
    assert [c.id for c in again] == ["a-fall-3"]


@pytest.mark.parametrize("reason", ["score_drop", "lost", ""])
def test_close_rejects_unknown_reason(reason: str) -> None:
    tracker = make_tracker()
    with pytest.raises(ValueError, match="reason must be one of"):
        tracker.close_source("cam", reason)  # type: ignore[arg-type]


def test_short_blip_below_min_duration_emits_nothing() -> None:
    # Events last 1.5 s after one window, 2.3 s after two, 3.1 s after three.
    tracker = make_tracker(open_windows=1, min_duration_s=3.0)

    lines = feed(tracker, [probs(fall=0.9), probs(fall=0.9), probs(fall=0.1)])

    assert lines == [[], [], []]
    assert tracker.open_events() == []
    assert tracker.close_all() == []


def test_event_is_announced_once_it_lasts_min_duration() -> None:
    tracker = make_tracker(open_windows=1, min_duration_s=3.0)

    lines = feed(tracker, [probs(fall=0.9)] * 3)

    assert lines[:2] == [[], []]
    (new,) = lines[2]
    assert new.type == "new" and new.id == "cam-fall-1"
    assert new.start_frame == window(0)[0]
    assert new.end_time - new.start_time >= 3.0


def test_event_lasting_exactly_min_duration_is_announced() -> None:
    """Regression: epoch-time rounding made a 2.3 s event last 2.29999995 s."""
    tracker = make_tracker(open_windows=1, min_duration_s=2.3)

    lines = feed(tracker, [probs(fall=0.9)] * 2)

    assert [[c.type for c in cs] for cs in lines] == [[], ["new"]]


def test_close_source_drops_events_not_yet_announced() -> None:
    tracker = make_tracker(open_windows=1, min_duration_s=3.0)
    feed(tracker, [probs(fall=0.9)])

    assert tracker.close_source("cam", "stream_ended") == []


def test_background_class_never_opens_events() -> None:
    tracker = make_tracker(open_windows=1)

    lines = feed(tracker, [[1.0, 0.0, 0.0]] * 3)

    assert lines == [[], [], []]


def test_background_none_lets_every_class_open_events() -> None:
    tracker = make_tracker(open_windows=1, background=None)

    (lines,) = feed(tracker, [[1.0, 0.0, 0.0]])

    assert [(c.type, c.label) for c in lines] == [("new", "none")]


def test_ids_are_stable_over_an_event_and_unique_per_event() -> None:
    tracker = make_tracker(open_windows=1, update_min_interval_s=0.0)
    scores = [0.7, 0.9, 0.1, 0.7, 0.1]

    lines = [c for cs in feed(tracker, [probs(fall=s) for s in scores]) for c in cs]

    assert [(c.type, c.id) for c in lines] == [
        ("new", "cam-fall-1"),
        ("update", "cam-fall-1"),
        ("end", "cam-fall-1"),
        ("new", "cam-fall-2"),
        ("end", "cam-fall-2"),
    ]


def test_open_events_is_a_snapshot_of_latest_state() -> None:
    tracker = make_tracker(open_windows=1, update_min_delta=1.0)
    feed(tracker, [probs(fall=0.7), probs(fall=0.9), probs(fall=0.8)])

    (snapshot,) = tracker.open_events()

    assert snapshot.type == "update" and snapshot.id == "cam-fall-1"
    assert snapshot.score == pytest.approx(0.8) and snapshot.peak_score == pytest.approx(0.9)
    assert snapshot.end_frame == window(2)[1] and snapshot.window_time == window(2)[3]


@pytest.mark.parametrize(
    ("row", "expectation"),
    [
        (probs(fall=0.5), contextlib.nullcontext()),
        (np.array(probs(fall=0.5), dtype=np.float32), contextlib.nullcontext()),
        ([0.5, 0.5], pytest.raises(ValueError, match="3 entries")),
        ([[0.5, 0.5, 0.0]], pytest.raises(ValueError, match="3 entries")),
        ([0.5, math.nan, 0.0], pytest.raises(ValueError, match="finite")),
        ([0.5, math.inf, 0.0], pytest.raises(ValueError, match="finite")),
    ],
    ids=["list", "float32-array", "too-short", "2d", "nan", "inf"],
)
def test_update_validates_probs(row, expectation) -> None:
    tracker = make_tracker()
    with expectation:
        tracker.update("cam", *window(0), row)


def test_update_rejects_bad_window() -> None:
    tracker = make_tracker()
    with pytest.raises(ValueError, match="before first_frame"):
        tracker.update("cam", 15, 0, T0, T0 + 1.5, probs())
    with pytest.raises(ValueError, match="times must be finite"):
        tracker.update("cam", 0, 15, math.nan, T0, probs())


def _raises(match: str) -> contextlib.AbstractContextManager:
    return pytest.raises(ValueError, match=match)


def _settings(**kwargs) -> TrackerSettings:
    return TrackerSettings(**{"class_names": NAMES, **kwargs})


_OK = contextlib.nullcontext()


@pytest.mark.parametrize(
    ("make", "expectation"),
    [
        pytest.param(lambda: _settings(), _OK, id="defaults"),
        pytest.param(lambda: _settings(background=None), _OK, id="no-background"),
        pytest.param(
            lambda: _settings(class_names=list(NAMES), rules={"fall": ClassRule(0.5, 0.5)}),
            _OK,
            id="list-names-and-override",
        ),
        pytest.param(lambda: ClassRule(0.4, 0.6), _raises("exit <= enter"), id="exit-above-enter"),
        pytest.param(lambda: ClassRule(1.2, 0.5), _raises("enter=1.2"), id="enter-above-1"),
        pytest.param(lambda: ClassRule(0.6, -0.1), _raises("exit=-0.1"), id="exit-below-0"),
        pytest.param(lambda: ClassRule(math.nan, 0.1), _raises("enter=nan"), id="nan-threshold"),
        pytest.param(lambda: _settings(smoothing=0), _raises("smoothing=0"), id="smoothing-0"),
        pytest.param(
            lambda: _settings(open_windows=0), _raises("open_windows=0"), id="open-windows-0"
        ),
        pytest.param(
            lambda: _settings(rules={"jump": ClassRule(0.5, 0.4)}),
            _raises("'jump'.*not in class_names"),
            id="rule-for-unknown-class",
        ),
        pytest.param(
            lambda: _settings(rules={"fall": (0.5, 0.4)}),
            _raises("fall must be a ClassRule, but got tuple"),
            id="rule-not-a-classrule",
        ),
        pytest.param(
            lambda: _settings(class_names=("fall", "fight")),
            _raises("background 'none' is not in class_names"),
            id="background-not-a-class",
        ),
        pytest.param(
            lambda: _settings(class_names=()), _raises("non-empty and unique"), id="no-classes"
        ),
        pytest.param(
            lambda: _settings(class_names=("none", "fall", "fall")),
            _raises("non-empty and unique"),
            id="duplicate-classes",
        ),
        pytest.param(
            lambda: _settings(min_duration_s=-1.0),
            _raises("min_duration_s must be finite and >= 0"),
            id="negative-min-duration",
        ),
        pytest.param(
            lambda: _settings(update_min_delta=-0.1),
            _raises("update_min_delta"),
            id="negative-delta",
        ),
        pytest.param(
            lambda: _settings(update_min_interval_s=math.inf),
            _raises("update_min_interval_s"),
            id="infinite-interval",
        ),
    ],
)
def test_invalid_settings_raise_clear_error(make, expectation) -> None:
    with expectation:
        make()


def test_settings_are_immutable() -> None:
    rules = {"fall": ClassRule(0.5, 0.4)}
    s = TrackerSettings(NAMES, rules=rules)
    rules["fight"] = ClassRule(0.9, 0.1)

    assert s.class_names == NAMES and isinstance(s.class_names, tuple)
    assert set(s.rules) == {"fall"}
    with pytest.raises(TypeError):
        s.rules["fight"] = ClassRule(0.9, 0.1)  # type: ignore[index]


# --- Invariants over random streams ---------------------------------------------------------

SOURCES = ("a", "b")


@st.composite
def class_rules(draw) -> ClassRule:
    threshold = st.sampled_from([0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]) | st.floats(0, 1)
    low, high = sorted(draw(st.tuples(threshold, threshold)))
    return ClassRule(enter=high, exit=low)


@st.composite
def scenarios(draw) -> tuple[TrackerSettings, list[tuple[str, str, list[float] | None]]]:
    n = draw(st.integers(2, 4))
    names = tuple(f"c{i}" for i in range(n))
    tracker_settings = TrackerSettings(
        class_names=names,
        default_rule=draw(class_rules()),
        rules=draw(st.dictionaries(st.sampled_from(names), class_rules(), max_size=n)),
        smoothing=draw(st.integers(1, 4)),
        open_windows=draw(st.integers(1, 3)),
        min_duration_s=draw(st.sampled_from([0.0, 1.5, 2.0, 3.1, 5.0])),
        background=draw(st.none() | st.sampled_from(names)),
        update_min_delta=draw(st.sampled_from([0.0, 0.01, 0.05, 0.2])),
        update_min_interval_s=draw(st.sampled_from([0.0, 0.8, 1.0, 3.0])),
    )
    prob = st.sampled_from([0.0, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0]) | st.floats(0, 1)
    # A steady scene: the same probabilities for 1..6 windows of one source.
    scene = st.tuples(
        st.just("window"),
        st.sampled_from(SOURCES),
        st.lists(prob, min_size=n, max_size=n),
        st.integers(1, 6),
    )
    close = st.tuples(
        st.sampled_from(["stream_lost", "stream_ended"]),
        st.sampled_from(SOURCES),
        st.none(),
        st.just(1),
    )
    steps = draw(st.lists(st.one_of(scene, scene, scene, scene, close), max_size=30))  # 4:1
    ops = [(kind, source, row) for kind, source, row, repeat in steps for _ in range(repeat)]
    return tracker_settings, ops


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_event_log_invariants_hold_on_random_streams(scenario) -> None:
    tracker_settings, ops = scenario
    tracker = EventTracker(tracker_settings)
    next_window = dict.fromkeys(SOURCES, 0)
    log: list[EventChange] = []
    announced: set[str] = set()
    ended: set[str] = set()
    for kind, source, row in ops:
        if row is None:
            changes = tracker.close_source(source, kind)  # type: ignore[arg-type]
            assert all(c.end_reason == kind and c.source == source for c in changes)
        else:
            changes = tracker.update(source, *window(next_window[source]), row)
            next_window[source] += 1
        log += changes
        announced |= {c.id for c in changes if c.type == "new"}
        ended |= {c.id for c in changes if c.type == "end"}
        assert {c.id for c in tracker.open_events()} == announced - ended
    log += tracker.close_all()
    assert tracker.open_events() == []

    by_id: dict[str, list[EventChange]] = defaultdict(list)
    for change in log:
        by_id[change.id].append(change)
    for event_id, lines in by_id.items():
        first = lines[0]
        rule = tracker_settings.rule_for(first.label)
        # Exactly one new, first; exactly one end, last; nothing after the end.
        assert [c.type for c in lines] == ["new", *["update"] * (len(lines) - 2), "end"]
        assert event_id == f"{first.source}-{first.label}-{event_id.rsplit('-', 1)[1]}"
        assert first.label != tracker_settings.background
        assert first.end_time - first.start_time >= tracker_settings.min_duration_s - 1e-6
        peak = -math.inf
        for c in lines:
            # One event: same identity and onset on every line.
            assert (c.source, c.label, c.start_frame, c.start_time) == (
                first.source,
                first.label,
                first.start_frame,
                first.start_time,
            )
            assert c.class_index == tracker_settings.class_names.index(c.label)
            assert c.threshold == rule.enter
            assert c.end_time >= c.start_time and c.end_frame >= c.start_frame
            assert c.peak_score >= c.score and c.peak_score >= peak
            if c.type == "update":
                assert c.peak_score > peak  # an update reports a higher peak
            peak = c.peak_score
            assert (c.end_reason is None) == (c.type != "end")
        end = lines[-1]
        assert end.end_reason in ("score_drop", "stream_lost", "stream_ended", "shutdown")
        if end.end_reason == "score_drop":
            assert end.score < rule.exit


def test_window_span_is_the_central_stride_frames_or_the_whole_window():
    times = [T0 + t / FPS for t in range(LENGTH)]
    assert window_span(0, 15, times, stride=8) == (4, 11, times[4], times[11])
    assert window_span(0, 15, times, stride=1) == (7, 7, times[7], times[7])
    assert window_span(0, 15, times, stride=16) == (0, 15, times[0], times[15])
    assert window_span(0, 15, times, stride=40) == (0, 15, times[0], times[15])
    # frames sampled every 3rd source frame: indices are interpolated, times exact
    assert window_span(30, 75, times, stride=8)[:2] == (42, 63)


def test_an_event_with_spans_covers_the_central_frames_of_its_windows():
    tracker = EventTracker(TrackerSettings(class_names=NAMES, smoothing=1, open_windows=1))
    lines = []
    for k, fall in enumerate([0.0, 0.9, 0.9, 0.9, 0.0]):
        first, last, t_first, t_last = window(k)
        times = [T0 + (first + i) / FPS for i in range(LENGTH)]
        lines += tracker.update(
            "cam",
            first,
            last,
            t_first,
            t_last,
            probs(fall=fall),
            span=window_span(first, last, times, STRIDE),
        )
    end = [c for c in lines if c.type == "end"][0]
    # windows 1..3 cover frames 8..47; their central 8 frames are 12..19, 20..27, 28..35
    assert (end.start_frame, end.end_frame) == (12, 35)
    assert end.start_time == pytest.approx(T0 + 1.2) and end.end_time == pytest.approx(T0 + 3.5)
    assert (end.window_first_frame, end.window_last_frame) == (32, 47)  # the window itself


def test_a_span_outside_its_window_is_refused():
    tracker = EventTracker(TrackerSettings(class_names=NAMES))
    with pytest.raises(ValueError, match="must lie inside the window"):
        tracker.update("cam", *window(0), probs(fall=0.9), span=(10, 20, T0 + 1.0, T0 + 2.0))
