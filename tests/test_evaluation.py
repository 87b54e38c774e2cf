"""Event-level evaluation: matching rules, event-log reading and the eval-events command."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from streamdet.cli import build_parser, main
from streamdet.errors import ConfigError
from streamdet.evaluation import (
    Interval,
    evaluate_event_log,
    evaluate_files,
    event_metrics,
    match_events,
    read_event_log,
    temporal_iou,
)
from streamdet.events import EventChange
from streamdet.sinks.jsonl import SCHEMA, EventLog, rotated_paths


def run_cli(argv):
    """The handler's own result or exception, without main's error handling."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_match_needs_the_same_label():
    truth = [Interval("fall", 10, 19)]
    assert len(match_events([Interval("fall", 10, 19)], truth)) == 1
    assert match_events([Interval("run", 10, 19)], truth) == []


@pytest.mark.parametrize(("shift", "matched"), [(6, False), (5, True)])
def test_iou_threshold_of_point_three_decides_a_match(shift, matched):
    # truth frames 0..9; detection shifted by `shift` frames: IoU = (10 - shift) / (10 + shift)
    truth = [Interval("enter", 0, 9)]
    det = [Interval("enter", shift, shift + 9)]
    assert (temporal_iou(det[0], truth[0]) >= 0.3) == matched
    assert bool(match_events(det, truth, iou=0.3)) == matched


def test_iou_exactly_at_the_threshold_matches():
    truth, det = [Interval("fall", 0, 2)], [Interval("fall", 0, 9)]  # 3 of 10 frames
    assert temporal_iou(det[0], truth[0]) == pytest.approx(0.3)
    assert len(match_events(det, truth, iou=0.3)) == 1


def test_each_true_event_matches_at_most_one_detection():
    truth = [Interval("run", 0, 9)]
    dets = [Interval("run", 0, 9), Interval("run", 1, 10)]
    m = event_metrics(dets, truth, fps=10)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.f1 == pytest.approx(2 / 3)


def test_onset_delay_is_detection_start_minus_true_start_in_seconds():
    truth = [Interval("run", 0, 9), Interval("fall", 100, 109)]
    dets = [Interval("run", 2, 11), Interval("fall", 104, 113)]
    m = event_metrics(dets, truth, fps=10)
    assert m.onset_delays == pytest.approx([0.2, 0.4])
    assert m.delay_p50 == pytest.approx(0.3)
    assert m.delay_p90 == pytest.approx(0.38)


def test_no_events_on_either_side_is_a_perfect_score():
    assert event_metrics([], []).f1 == 1.0


def _write_log(path, lines):
    """Lines as the event log writes them: its schema first, compact JSON."""
    path.write_text(
        "".join(json.dumps({"schema": SCHEMA, **x}, separators=(",", ":")) + "\n" for x in lines)
    )


def test_open_event_counts_up_to_the_last_frame_seen(tmp_path):
    log = tmp_path / "events.jsonl"
    _write_log(
        log,
        [
            {
                "type": "new",
                "id": "1",
                "source": "cam",
                "label": "fall",
                "start_frame": 40,
                "start_time": "2026-11-26T13:40:04.000Z",
            },
            {"type": "heartbeat", "source": "cam", "frame": 75},
        ],
    )
    events = read_event_log(log).events
    assert len(events) == 1 and (events[0].start_frame, events[0].end_frame) == (40, 75)


def test_eval_events_prints_f1_for_a_run_log(tmp_path, capsys):
    log, truth = tmp_path / "events.jsonl", tmp_path / "truth.json"
    _write_log(
        log,
        [
            {
                "type": "new",
                "id": "1",
                "source": "demo",
                "label": "enter",
                "start_frame": 10,
                "start_time": "2026-11-26T13:40:01.000Z",
            },
            {
                "type": "end",
                "id": "1",
                "source": "demo",
                "label": "enter",
                "start_frame": 10,
                "end_frame": 22,
                "start_time": "2026-11-26T13:40:01.000Z",
                "end_time": "2026-11-26T13:40:02.300Z",
            },
            {
                "type": "end",
                "id": "2",
                "source": "demo",
                "label": "run",
                "start_frame": 50,
                "end_frame": 60,
                "start_time": "2026-11-26T13:40:05.000Z",
                "end_time": "2026-11-26T13:40:06.100Z",
            },
        ],
    )
    truth.write_text(
        json.dumps(
            {
                "format": "streamdet-truth/1",
                "fps": 10.0,
                "events": [
                    {"label": "enter", "start_frame": 8, "end_frame": 20},
                    {"label": "fall", "start_frame": 90, "end_frame": 99},
                ],
            }
        )
    )
    assert run_cli(["eval-events", "--events", str(log), "--truth", str(truth)]) == 0
    out = capsys.readouterr().out
    assert "F1 0.500" in out  # 1 match, 1 false alarm (run), 1 missed (fall)
    assert "p50 0.20 s" in out  # detected 2 frames after the true start


def test_iso_times_are_matched_from_the_stream_start_when_truth_has_no_frames(tmp_path):
    log, truth = tmp_path / "events.jsonl", tmp_path / "truth.json"
    _write_log(
        log,
        [
            {
                "type": "end",
                "id": "1",
                "source": "cam",
                "label": "light_off",
                "start_frame": None,
                "end_frame": None,
                "start_time": "2026-11-26T13:40:10.000Z",
                "end_time": "2026-11-26T13:40:12.000Z",
            },
        ],
    )
    truth.write_text(
        json.dumps(
            {
                "start_utc": "2026-11-26T13:40:00.000Z",
                "events": [{"label": "light_off", "start_time": 10.5, "end_time": 12.0}],
            }
        )
    )
    m = evaluate_files(log, truth)
    assert (m.tp, m.fp, m.fn) == (1, 0, 0)
    assert m.onset_delays == pytest.approx([-0.5])


def _end_line(n: int) -> EventChange:
    """The end of the n-th 'run' event of source cam: frames 20n..20n+9 at 10 fps."""
    start = 20 * n
    return EventChange(
        type="end",
        id=f"cam-run-{n}",
        source="cam",
        label="run",
        class_index=1,
        score=0.2,
        peak_score=0.9,
        threshold=0.6,
        start_time=start / 10,
        end_time=(start + 10) / 10,
        start_frame=start,
        end_frame=start + 9,
        window_first_frame=start,
        window_last_frame=start + 15,
        window_time=(start + 15) / 10,
        end_reason="score_drop",
    )


def test_a_run_whose_log_rotated_is_scored_on_every_event(tmp_path):
    """Only events.jsonl itself was read: the events in events.jsonl.1, .2, ... were missed."""
    log, truth = tmp_path / "events.jsonl", tmp_path / "truth.json"
    with EventLog(log, {"name": "m", "sha256": "-"}, run_id="r", rotate_bytes=1) as writer:
        for n in range(6):  # a file for each line: events.jsonl.5 (the oldest) ... events.jsonl
            writer.write_event(_end_line(n), latency_ms=1.0)
    assert all(p.exists() for p in rotated_paths(log))
    truth.write_text(
        json.dumps(
            {
                "fps": 10,
                "events": [
                    {"label": "run", "start_frame": 20 * n, "end_frame": 20 * n + 9}
                    for n in range(6)
                ],
            }
        )
    )

    m = evaluate_files(log, truth)

    assert (m.tp, m.fp, m.fn) == (6, 0, 0)


def test_lines_the_log_did_not_write_are_skipped(tmp_path, caplog):
    log, truth = tmp_path / "events.jsonl", tmp_path / "truth.json"
    _write_log(log, [GOOD_END])
    with log.open("a") as f:
        f.write(
            '{"type": "end", "id": "2", "source": "cam", "label": "run", "start_frame": 50, '
            '"end_frame": 59}\n'
        )  # an edit: not the log's own line
    truth.write_text(json.dumps(GOOD_TRUTH))

    m = evaluate_files(log, truth)

    assert (m.tp, m.fp, m.fn) == (1, 0, 0)
    assert "1 line(s) not written by streamdet skipped (first at " in caplog.text


@pytest.mark.parametrize(
    ("content", "expectation"),
    [
        (
            '{"events": [{"label": "x", "start_frame": 1, "end_frame": 2}]}',
            contextlib.nullcontext(),
        ),
        ('{"events": [{"label": "x"}]}', pytest.raises(ConfigError, match="needs start_frame")),
        ("not json", pytest.raises(ConfigError, match="not JSON")),
    ],
)
def test_truth_file_problems_are_config_errors(tmp_path, content, expectation):
    log, truth = tmp_path / "e.jsonl", tmp_path / "t.json"
    log.write_text("")
    truth.write_text(content)
    with expectation:
        evaluate_files(log, truth)


def test_only_the_latest_run_of_an_appended_log_is_evaluated_by_default(tmp_path):
    log, truth = tmp_path / "events.jsonl", tmp_path / "truth.json"
    end = {
        "type": "end",
        "id": "demo-run-1",
        "source": "demo",
        "label": "run",
        "start_frame": 0,
        "end_frame": 9,
    }
    _write_log(log, [{**end, "run_id": "old", "label": "fall"}, {**end, "run_id": "new"}])
    truth.write_text(
        json.dumps({"fps": 10, "events": [{"label": "run", "start_frame": 0, "end_frame": 9}]})
    )
    assert evaluate_files(log, truth).f1 == 1.0
    assert evaluate_files(log, truth, run_id="old").f1 == 0.0
    assert "F1 1.000" in str(evaluate_event_log(log, truth, run_id="new"))


def test_a_run_id_not_in_the_log_is_an_error_that_lists_its_runs(tmp_path):
    log, truth = tmp_path / "events.jsonl", tmp_path / "truth.json"
    end = {
        "type": "end",
        "id": "demo-run-1",
        "source": "demo",
        "label": "run",
        "start_frame": 0,
        "end_frame": 9,
    }
    _write_log(log, [{**end, "run_id": "old"}, {**end, "run_id": "new"}])
    truth.write_text(
        json.dumps({"fps": 10, "events": [{"label": "run", "start_frame": 0, "end_frame": 9}]})
    )

    with pytest.raises(
        ConfigError, match=r"no run 'typo' in this log \(its runs, oldest first: old, new\)"
    ):
        run_cli(["eval-events", "--events", str(log), "--truth", str(truth), "--run-id", "typo"])


# -- bad input through the command line: one error line, exit 2 ---------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"  # a binary file given by mistake
GOOD_END = {
    "type": "end",
    "id": "1",
    "source": "cam",
    "label": "run",
    "start_frame": 0,
    "end_frame": 9,
}
GOOD_TRUTH = {"fps": 10, "events": [{"label": "run", "start_frame": 0, "end_frame": 9}]}


def _truth_with(**fields):
    return {**GOOD_TRUTH, "events": [{**GOOD_TRUTH["events"][0], **fields}]}


@pytest.mark.parametrize(
    ("log", "truth", "message"),
    [
        (PNG, GOOD_TRUTH, "e.jsonl:1: not UTF-8 text (byte 0x89 at offset 0): not an event log"),
        (
            b"sources:\n  - {name: cam, url: '0'}\n",
            GOOD_TRUTH,
            'e.jsonl:1: does not begin with {"schema":"streamdet.event/: not an event log',
        ),
        ([GOOD_END], PNG, "t.json: not UTF-8 text (byte 0x89 at offset 0): not a truth JSON"),
        (
            [GOOD_END],
            _truth_with(start_frame="x"),
            "events[0].start_frame must be a number, but got 'x'",
        ),
        (
            [GOOD_END],
            _truth_with(end_frame=None),
            "events[0].end_frame must be a number, but got None",
        ),
        (
            [GOOD_END],
            _truth_with(label=["run"]),
            "events[0].label must be a string, but got ['run']",
        ),
        ([GOOD_END], {**GOOD_TRUTH, "fps": "ten"}, "fps must be a number > 0, but got 'ten'"),
        ([GOOD_END], {**GOOD_TRUTH, "start_utc": "noon"}, "start_utc: Invalid isoformat string"),
        ([GOOD_END], {**GOOD_TRUTH, "start_utc": 5}, "start_utc must be an ISO-8601 time string"),
        (
            [{**GOOD_END, "start_frame": [0]}],
            GOOD_TRUTH,
            "e.jsonl:1: start_frame must be an integer frame number, but got [0]",
        ),
        (
            [{**GOOD_END, "start_time": "noon", "end_time": 1.0}],
            GOOD_TRUTH,
            "e.jsonl:1: start_time: Invalid isoformat string",
        ),
    ],
    ids=[
        "binary-log",
        "config-as-log",
        "binary-truth",
        "truth-frame-string",
        "truth-frame-null",
        "truth-label-list",
        "truth-fps-string",
        "truth-start-utc-not-iso",
        "truth-start-utc-number",
        "log-frame-list",
        "log-time-not-iso",
    ],
)
def test_eval_events_on_bad_input_is_one_error_line_and_exit_2(
    tmp_path, capsys, log, truth, message
):
    """Each of these was an internal error (exit 1: UnicodeDecodeError, ValueError, TypeError)."""
    events, truth_path = tmp_path / "e.jsonl", tmp_path / "t.json"
    if isinstance(log, bytes):
        events.write_bytes(log)
    else:
        _write_log(events, log)
    truth_path.write_bytes(truth if isinstance(truth, bytes) else json.dumps(truth).encode())

    code = main(["eval-events", "--events", str(events), "--truth", str(truth_path)])

    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("error: ") and message in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("which", ["events", "truth"])
def test_eval_events_refuses_a_fifo_by_what_it_is(tmp_path, capsys, which):
    events, truth = tmp_path / "e.jsonl", tmp_path / "t.json"
    _write_log(events, [GOOD_END])
    truth.write_text(json.dumps(GOOD_TRUTH))
    fifo = events if which == "events" else truth
    fifo.unlink()
    os.mkfifo(fifo)

    code = main(["eval-events", "--events", str(events), "--truth", str(truth)])

    assert code == 2
    assert f"error: {fifo}: is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
