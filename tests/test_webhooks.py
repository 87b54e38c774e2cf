"""Signed webhooks against a real HTTP server on 127.0.0.1 (tests/webhook_receiver.py), which
checks each signature with its own code written from the Standard Webhooks spec.

Lines are real event-log lines (an EventLog in tmp_path). Backoff delays are a few ms; every
wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import base64
import contextlib
import doctest
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from webhook_receiver import Receiver, Reply, key_of

import streamdet.sinks.webhooks
from streamdet.config import WebhookConfig, load_config
from streamdet.errors import ConfigError
from streamdet.events import EventChange
from streamdet.sinks.base import EventMessage, MediaMessage
from streamdet.sinks.configured import SinkContext, build_sinks
from streamdet.sinks.jsonl import EventLog, event_line
from streamdet.sinks.webhooks import WebhooksSink, backoff_s, retry_after_s

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
MODEL = {"name": "tiny.safetensors", "sha256": "ab" * 32}
DEADLINE_S = 30.0  # for what should take milliseconds: machines and load differ


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(key_of(SECRET)) as r:
        yield r


@pytest.fixture
def event_log(tmp_path: Path) -> Iterator[EventLog]:
    with EventLog(tmp_path / "events.jsonl", MODEL, run_id="run1") as log_:
        yield log_


@contextlib.contextmanager
def webhooks(*hooks: dict[str, Any], **options: Any) -> Iterator[WebhooksSink]:
    """A sink for ``hooks`` with short backoff delays, closed at the end."""
    options = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, **options}
    sink = WebhooksSink(
        [WebhookConfig(**h) for h in hooks],
        run_id="run1",
        model=MODEL,
        stride=8,
        length=16,
        **options,
    )
    try:
        yield sink
    finally:
        sink.close()


def change(
    kind: str = "new",
    n: int = 1,
    *,
    source: str = "cam",
    label: str = "fall",
    score: float = 0.9,
    peak: float | None = None,
) -> EventChange:
    return EventChange(
        type=kind,  # type: ignore[arg-type]
        id=f"run1-{source}-{label}-{n}",
        source=source,
        label=label,
        class_index=1,
        score=score,
        peak_score=score if peak is None else peak,
        threshold=0.6,
        start_time=1_700_000_000.0,
        end_time=1_700_000_001.5,
        start_frame=0,
        end_frame=23,
        window_first_frame=8,
        window_last_frame=23,
        window_time=1_700_000_001.5,
        end_reason="score_drop" if kind == "end" else None,
    )


def logged(log_: EventLog, ch: EventChange) -> EventMessage:
    return EventMessage(ch, log_.write_event(ch, latency_ms=12.5), 12.5)


def until(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def counts(sink: WebhooksSink, i: int = 0) -> tuple[int, int, int, int]:
    c = sink.endpoints[i].counts()
    return c.delivered, c.retried, c.failed, c.dropped


# -- what is sent ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_line_arrives_as_the_log_wrote_it_with_standard_webhooks_headers_and_signature(
    tmp_path: Path, receiver: Receiver, event_log: EventLog
) -> None:
    url = receiver.url("/hook?team=ops", userinfo="alice:pa%40ss@")
    with webhooks({"url": url, "secret": SECRET, "headers": {"X-Team": "ops"}}) as sink:
        msg = logged(event_log, change("new"))
        sink.on_event(msg)
        assert receiver.wait_for(lambda: len(receiver.on("/hook")) == 1, DEADLINE_S)
        assert until(lambda: counts(sink) == (1, 0, 0, 0))

    (got,) = receiver.on("/hook")
    assert got.signature_ok is True
    assert got.path == "/hook?team=ops"
    assert got.body + b"\n" == (tmp_path / "events.jsonl").read_bytes()  # the log's line
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-id"] == "run1-cam-fall-1-new-1"
    assert abs(time.time() - int(got.headers["webhook-timestamp"])) < 60
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.headers["x-team"] == "ops"
    assert got.headers["authorization"] == "Basic " + base64.b64encode(b"alice:pa@ss").decode()
    port = receiver.server.server_address[1]
    assert sink.summary_lines() == [
        f"webhook http://alice:***@127.0.0.1:{port}/hook?team=ops: "
        "1 delivered, 0 retried, 0 failed, 0 dropped"
    ]


@pytest.mark.timeout(60)
def test_a_secret_without_whsec_prefix_signs_with_its_own_bytes(event_log: EventLog) -> None:
    with Receiver(b"plain text secret") as receiver:
        with webhooks({"url": receiver.url("/hook"), "secret": "plain text secret"}) as sink:
            sink.on_event(logged(event_log, change("new")))
            assert receiver.wait_for(lambda: len(receiver.on("/hook")) == 1, DEADLINE_S)
        assert receiver.on("/hook")[0].signature_ok is True


@pytest.mark.timeout(60)
def test_without_a_secret_nothing_is_signed(receiver: Receiver, event_log: EventLog) -> None:
    with webhooks({"url": receiver.url("/hook")}) as sink:
        sink.on_event(logged(event_log, change("new")))
        assert receiver.wait_for(lambda: len(receiver.on("/hook")) == 1, DEADLINE_S)
    (got,) = receiver.on("/hook")
    assert "webhook-signature" not in got.headers
    assert got.headers["webhook-id"] == "run1-cam-fall-1-new-1"


@pytest.mark.timeout(60)
def test_a_run_without_an_event_log_sends_the_fields_the_log_would_have_written(
    receiver: Receiver, event_log: EventLog
) -> None:
    ch = change("end", score=0.3, peak=0.91)
    written = event_log.write_event(ch, latency_ms=7.25)
    built = event_line(
        ch, seq=written["seq"], run_id="run1", model=MODEL, stride=8, length=16, latency_ms=7.25
    )
    assert json.dumps(built) == json.dumps(written)  # same keys, in the same order

    with webhooks({"url": receiver.url("/hook")}) as sink:
        sink.on_event(EventMessage(change("new"), None, 3.0))
        sink.on_event(EventMessage(ch, None, 7.25))
        assert receiver.wait_for(lambda: len(receiver.on("/hook")) == 2, DEADLINE_S)
    bodies = [json.loads(r.body) for r in receiver.on("/hook")]
    assert [b["seq"] for b in bodies] == [1, 2]  # the lines this output was handed
    assert bodies[1] == {**written, "seq": 2}
    assert [r.headers["webhook-id"] for r in receiver.on("/hook")] == [
        "run1-cam-fall-1-new-1",
        "run1-cam-fall-1-end-2",
    ]


# -- filters -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_filters_pick_lines_by_type_source_label_and_peak_score(
    receiver: Receiver, event_log: EventLog
) -> None:
    every = ["new", "update", "end", "clip", "snapshot"]
    hooks = {
        "/default": {},  # new and end
        "/every": {"events": every},
        "/cam2": {"sources": ["cam2"]},
        "/fall": {"labels": ["fall"], "events": ["new", "end", "clip"]},
        # The end line's score (0.3) is below 0.8, its peak is not: the event is sent whole.
        "/score": {"min_score": 0.8, "events": every},
    }
    msgs: list[EventMessage | MediaMessage] = [
        logged(event_log, change("new", peak=0.9)),
        logged(event_log, change("update", peak=0.95)),
        logged(event_log, change("new", source="cam2", label="walk", score=0.65)),
        logged(event_log, change("end", score=0.3, peak=0.95)),
        logged(event_log, change("end", source="cam2", label="walk", score=0.2, peak=0.65)),
        # clip lines carry no label or score: judged by their event's
        MediaMessage(
            event_log.write_media(
                {"type": "clip", "id": "run1-cam-fall-1", "source": "cam", "path": "a.mp4"}
            )
        ),
        MediaMessage(
            event_log.write_media(
                {"type": "clip", "id": "run1-cam2-walk-1", "source": "cam2", "path": "b.mp4"}
            )
        ),
        MediaMessage(
            event_log.write_media(
                {"type": "snapshot", "id": "run1-cam-fall-1", "source": "cam", "path": "a.jpg"}
            )
        ),
    ]
    with webhooks(*({"url": receiver.url(path), **h} for path, h in hooks.items())) as sink:
        for msg in msgs:
            if isinstance(msg, EventMessage):
                sink.on_event(msg)
            else:
                sink.on_media(msg)
        assert receiver.wait_for(lambda: len(receiver.on("/every")) == len(msgs), DEADLINE_S)

    def got(path: str) -> list[str]:
        return [r.headers["webhook-id"].removeprefix("run1-") for r in receiver.on(path)]

    assert got("/default") == [
        "cam-fall-1-new-1",
        "cam2-walk-1-new-3",
        "cam-fall-1-end-4",
        "cam2-walk-1-end-5",
    ]
    assert len(got("/every")) == 8
    assert got("/cam2") == ["cam2-walk-1-new-3", "cam2-walk-1-end-5"]
    assert got("/fall") == ["cam-fall-1-new-1", "cam-fall-1-end-4", "cam-fall-1-clip-6"]
    assert got("/score") == [
        "cam-fall-1-new-1",
        "cam-fall-1-update-2",
        "cam-fall-1-end-4",
        "cam-fall-1-clip-6",
        "cam-fall-1-snapshot-8",
    ]


def test_labels_the_model_does_not_have_are_a_config_error_before_the_run() -> None:
    cfg = load_config(
        None, {"sinks": {"webhooks": [{"url": "http://127.0.0.1:9/", "labels": ["fall", "fal"]}]}}
    )
    ctx = SinkContext(
        run_id="run1",
        class_names=("none", "fall", "walk"),
        sources=(),
        urls={},
        model=MODEL,
        stop_event=threading.Event(),
        record_media=dict,
    )
    with pytest.raises(ConfigError) as err:
        build_sinks(cfg, ctx)
    assert str(err.value) == (
        "sinks.webhooks[0].labels: 'fal' not among the model's classes (none, fall, walk)"
    )


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ({"url": "ftp://example.com/x"}, "url: must be an http:// or https:// URL with a host"),
        ({"url": "http://h/", "timeout_s": "ten"}, "timeout_s: Input should be a valid number"),
        ({"url": "http://h/", "secret": "whsec_%%%"}, "secret: starts with whsec_ but what"),
        ({"url": "http://h/", "secret": ""}, "secret: is empty"),
        ({"url": "http://h/", "headers": {"Webhook-Signature": "x"}}, "headers: 'Webhook-"),
        ({"url": "http://h/", "headers": {"X-Key": "a\r\nb"}}, "headers: the value of"),
        ({"url": "http://h/", "events": ["status"]}, "events[0]: Input should be 'new'"),
        ({"url": "http://h/", "max_attempts": 0}, "max_attempts: Input should be greater"),
    ],
)
def test_a_bad_webhook_config_names_its_key(hook: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"sinks": {"webhooks": [hook]}})
    assert f"sinks.webhooks[0].{message}" in str(err.value)
    assert "\n" not in str(err.value)


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_500s_then_200_is_delivered_with_the_same_webhook_id_on_every_try(
    receiver: Receiver, event_log: EventLog
) -> None:
    receiver.script("/flaky", Reply(500), Reply(500), Reply(200))
    with webhooks({"url": receiver.url("/flaky"), "secret": SECRET}) as sink:
        sink.on_event(logged(event_log, change("new")))
        assert until(lambda: counts(sink) == (1, 2, 0, 0)), counts(sink)
    tries = receiver.on("/flaky")
    assert len(tries) == 3
    assert {r.headers["webhook-id"] for r in tries} == {"run1-cam-fall-1-new-1"}
    assert all(r.signature_ok for r in tries)
    assert sink.progress_text() == "1 sent, 2 retried"


@pytest.mark.timeout(60)
def test_410_disables_the_endpoint_once_and_later_lines_are_dropped(
    receiver: Receiver, event_log: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script("/gone", Reply(410))
    caplog.set_level(logging.DEBUG, logger="streamdet")
    with webhooks({"url": receiver.url("/gone"), "max_attempts": 5}) as sink:
        for n in (1, 2, 3):
            sink.on_event(logged(event_log, change("new", n)))
        assert until(lambda: sink.endpoints[0].counts().gone)
        sink.on_event(logged(event_log, change("new", 4)))
        assert until(lambda: counts(sink) == (0, 0, 1, 3)), counts(sink)
    assert len(receiver.on("/gone")) == 1  # never tried again, nor sent the others
    gone = [r for r in caplog.records if "410" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.WARNING
    assert sink.summary_lines()[0].endswith(
        "0 delivered, 0 retried, 1 failed, 3 dropped (disabled: the endpoint answered 410 Gone)"
    )
    assert sink.progress_text() == "0 sent, 1 failed, 3 dropped, 1 disabled"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [400, 401, 404, 422, 301, 302, 307, 308])
def test_a_4xx_or_a_redirect_fails_the_line_without_retrying_or_following(
    receiver: Receiver, event_log: EventLog, status: int
) -> None:
    receiver.script("/hook", Reply(status, {"Location": receiver.url("/moved")}))
    with webhooks({"url": receiver.url("/hook"), "max_attempts": 5}) as sink:
        sink.on_event(logged(event_log, change("new")))
        assert until(lambda: counts(sink) == (0, 0, 1, 0)), counts(sink)
    assert len(receiver.on("/hook")) == 1
    assert receiver.on("/moved") == []
    assert f"(last failure: HTTP {status}" in sink.summary_lines()[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("retry_after", "cap_s", "min_gap_s", "max_gap_s"),
    [
        ("1", 60.0, 0.9, 20.0),  # seconds
        (None, 60.0, 1.0, 20.0),  # an HTTP date 2 s ahead (whole seconds: at least 1 s)
        ("3600", 0.2, 0.0, 20.0),  # capped
    ],
    ids=["seconds", "http-date", "capped"],
)
def test_429_waits_as_retry_after_says(
    receiver: Receiver,
    event_log: EventLog,
    retry_after: str | None,
    cap_s: float,
    min_gap_s: float,
    max_gap_s: float,
) -> None:
    value = retry_after or formatdate(time.time() + 2, usegmt=True)
    receiver.script("/busy", Reply(429, {"Retry-After": value}), Reply(200))
    with webhooks({"url": receiver.url("/busy")}, retry_after_cap_s=cap_s) as sink:
        sink.on_event(logged(event_log, change("new")))
        assert until(lambda: counts(sink) == (1, 1, 0, 0)), counts(sink)
    first, second = receiver.on("/busy")
    assert min_gap_s <= second.at - first.at < max_gap_s  # backoff alone would wait <= 10 ms
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


@pytest.mark.timeout(60)
def test_no_answer_within_the_timeout_is_tried_again(
    receiver: Receiver, event_log: EventLog
) -> None:
    receiver.script("/slow", Reply(hang=True), Reply(200))
    with webhooks({"url": receiver.url("/slow"), "timeout_s": 0.5}) as sink:
        sink.on_event(logged(event_log, change("new")))
        assert until(lambda: counts(sink) == (1, 1, 0, 0)), counts(sink)
    first, second = receiver.on("/slow")
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


@pytest.mark.timeout(60)
def test_a_refused_connection_is_retried_up_to_max_attempts_then_failed(
    event_log: EventLog,
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with webhooks({"url": f"http://127.0.0.1:{port}/x", "max_attempts": 3}) as sink:
        sink.on_event(logged(event_log, change("new")))
        assert until(lambda: counts(sink) == (0, 2, 1, 0)), counts(sink)
    assert "(last failure: ConnectionRefusedError" in sink.summary_lines()[0]


# -- isolation and bounds ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_hung_endpoint_delays_neither_another_endpoint_nor_the_sinks_thread(
    receiver: Receiver, event_log: EventLog
) -> None:
    receiver.script("/hang", Reply(hang=True))
    hooks = ({"url": receiver.url("/hang"), "timeout_s": 120}, {"url": receiver.url("/fast")})
    with webhooks(*hooks, close_timeout_s=1.0) as sink:
        msgs = [logged(event_log, change("new", n)) for n in range(1, 6)]
        started = time.monotonic()
        for msg in msgs:
            sink.on_event(msg)
        offered_in = time.monotonic() - started
        assert receiver.wait_for(lambda: len(receiver.on("/fast")) == 5, DEADLINE_S)
        fast_in = time.monotonic() - started
        closing = time.monotonic()
    closed_in = time.monotonic() - closing
    assert offered_in < 1.0  # the sink's thread only enqueues
    assert fast_in < 60  # far below the hung endpoint's 120 s timeout (ms when idle)
    assert closed_in < 1.0 + 5.0  # close_timeout_s, not timeout_s * max_attempts
    assert counts(sink, 0) == (0, 0, 0, 5)  # one in flight and four queued: dropped at close
    assert counts(sink, 1) == (5, 0, 0, 0)


@pytest.mark.timeout(60)
def test_a_full_queue_drops_and_counts_what_does_not_fit(
    receiver: Receiver, event_log: EventLog
) -> None:
    receiver.script("/hang", Reply(hang=True))
    with webhooks({"url": receiver.url("/hang"), "max_queued": 2}, close_timeout_s=0.5) as sink:
        sink.on_event(logged(event_log, change("new", 1)))
        assert receiver.wait_for(lambda: len(receiver.on("/hang")) == 1, DEADLINE_S)
        for n in range(2, 7):
            sink.on_event(logged(event_log, change("new", n)))
        assert counts(sink) == (0, 0, 0, 3)  # 1 in flight, 2 queued, 3 dropped
    assert counts(sink) == (0, 0, 0, 6)


@pytest.mark.timeout(60)
def test_close_gives_retrying_lines_a_bounded_time_then_counts_them_dropped(
    receiver: Receiver, event_log: EventLog
) -> None:
    receiver.script("/down", Reply(503))
    hook = {"url": receiver.url("/down"), "max_attempts": 100, "timeout_s": 30}
    options = {"backoff_base_s": 0.2, "backoff_cap_s": 0.5, "close_timeout_s": 1.0}
    with webhooks(hook, **options) as sink:
        for n in (1, 2, 3):
            sink.on_event(logged(event_log, change("new", n)))
        assert receiver.wait_for(lambda: len(receiver.on("/down")) >= 2, DEADLINE_S)
        closing = time.monotonic()
    assert time.monotonic() - closing < 1.0 + 5.0
    delivered, _, failed, dropped = counts(sink)
    assert (delivered, failed, dropped) == (0, 0, 3)


# -- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("  7 ", 7.0),
        ("3600", 60.0),  # capped
        ("Thu, 01 Jan 1970 00:00:30 GMT", 20.0),  # now is 10
        ("Thu, 01 Jan 1970 00:00:05 GMT", 0.0),  # in the past
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str | None, expected: float) -> None:
    assert retry_after_s(value, now=10.0, cap_s=60.0) == expected


def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling() -> None:
    rng = random.Random(5)
    for tries, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (80, 5.0)]:
        delays = [backoff_s(tries, 0.5, 5.0, rng) for _ in range(500)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling  # spread over it


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_secrets_never_reach_logs_errors_or_the_summary(
    receiver: Receiver,
    event_log: EventLog,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secrets = ["hunter2pw", "tok3nvalue", "hdrvalue9", SECRET, SECRET.removeprefix("whsec_")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    receiver.script("/down", Reply(500))
    receiver.script("/gone", Reply(410))
    receiver.script("/moved", Reply(302, {"Location": "http://u:hunter2pw@elsewhere/"}))
    base = {"secret": SECRET, "headers": {"X-Api-Key": "hdrvalue9"}, "max_attempts": 2}
    urls = [
        receiver.url("/down?token=tok3nvalue", userinfo="bob:hunter2pw@"),
        receiver.url("/gone?token=tok3nvalue", userinfo="bob:hunter2pw@"),
        receiver.url("/moved?token=tok3nvalue", userinfo="bob:hunter2pw@"),
        f"http://bob:hunter2pw@127.0.0.1:{closed_port}/x?token=tok3nvalue",
    ]
    caplog.set_level(logging.DEBUG)
    with webhooks(*({"url": u, **base} for u in urls)) as sink:
        sink.on_event(logged(event_log, change("new")))
        assert until(lambda: all(e.counts().failed == 1 for e in sink.endpoints))
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            {
                "sinks": {
                    "webhooks": [
                        {"url": "ftp://bob:hunter2pw@h/?token=tok3nvalue", "secret": SECRET}
                    ]
                }
            },
        )
    out, errs = capsys.readouterr()
    texts = [caplog.text, out, errs, str(err.value), sink.progress_text(), *sink.summary_lines()]
    assert "bob:***@" in "\n".join(sink.summary_lines())
    for secret in secrets:
        for text in texts:
            assert secret not in text


def test_docstring_examples_run() -> None:
    result = doctest.testmod(streamdet.sinks.webhooks)
    assert result.attempted > 0 and result.failed == 0
