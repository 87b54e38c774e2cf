"""Signed webhooks: event-log lines POSTed as JSON to HTTP endpoints, as Standard Webhooks say.

Each ``sinks.webhooks`` entry is an :class:`Endpoint`: one thread and one bounded queue. The
sink's own thread (:class:`WebhooksSink`, run by a ``SinkWorker``) only filters lines and puts
them in the queues of the endpoints that want them; it never waits on the network, so an
endpoint that hangs delays neither another endpoint nor detection.

What is sent:

- Body: the event-log line as compact JSON, byte for byte the line the log holds (without its
  newline). A run without an event log sends the same fields, with ``seq`` counting the lines
  this output was handed (the log would count its status lines too).
- Headers (https://www.standardwebhooks.com): ``content-type: application/json``;
  ``webhook-id`` = ``<event id>-<type>-<seq>`` (characters other than letters, digits, ``_`` and
  ``-`` become ``_``: the spec forbids ``.``), the same on every try of a line, so a receiver
  can drop repeats; ``webhook-timestamp`` = unix seconds of the try; with a ``secret``,
  ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``. The key is the
  base64 after ``whsec_`` for a secret written that way, else the secret's UTF-8 bytes. A
  user and password in the URL go as HTTP Basic authentication; the config's ``headers`` are
  added as given.
- Filters: ``events`` (the line's type), ``sources``, ``labels``, and ``min_score`` against the
  line's ``peak_score``. The peak only rises, so once an event passes ``min_score`` every later
  line of it passes too (an ``end`` line's own ``score`` is below the exit threshold, and
  would never pass). A ``clip`` line is judged by its event's label and peak, remembered from
  the event's lines.

Answers: 2xx is delivered. 429, 5xx, a timeout or a network error is tried again, up to
``max_attempts`` tries, after an exponential backoff with full jitter (a random delay between 0
and ``min(cap, base * 2**(try - 1))``), or after ``Retry-After`` (seconds or an HTTP date,
capped) when the answer has one. 410 Gone disables the endpoint (logged once; its queue and
later lines count as dropped). A redirect is a failure and is never followed, to this host or
another (the spec's advice: the URL should be updated); other 4xx are failures, not retried.
Lines of one endpoint go out in order, so a line being retried holds back the ones behind it.

Counters per endpoint: delivered, retried (tries after the first), failed (lines given up on),
dropped (a full queue, a disabled endpoint, or left when the run closed). At the end the
endpoints get ``close_timeout_s`` (3 s) together to send what is queued; what is left then,
and a request still in flight, count as dropped.

Secrets: endpoints are named by :func:`~streamdet.redaction.redact_url` of their URL; the
secret, header values and response bodies are never logged.

Requests use the standard library's ``http.client``: one connection per request (events come
seconds apart; a kept-alive connection the server has closed would cost a failed try), no
redirect handling to switch off (``urllib.request`` follows redirects unless told otherwise),
and no dependency beyond Python.

Example:
    >>> from streamdet.config import WebhookConfig
    >>> sink = WebhooksSink([WebhookConfig(url="http://127.0.0.1:9/hook")], run_id="r1",
    ...                     model={"name": "m", "sha256": "0"}, stride=8, length=16)
    >>> sink.close()
    >>> sink.summary_lines()
    ['webhook http://127.0.0.1:9/hook: 0 delivered, 0 retried, 0 failed, 0 dropped']
"""

from __future__ import annotations

import base64
import email.utils
import enum
import hashlib
import hmac
import http.client
import json
import logging
import random
import re
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timezone
from typing import Any
from urllib.parse import unquote, urlsplit

from streamdet import __version__
from streamdet.config import WebhookConfig, WindowConfig
from streamdet.errors import ConfigError
from streamdet.redaction import redact_text, redact_url
from streamdet.sinks.base import BaseSink, EventMessage, MediaMessage
from streamdet.sinks.jsonl import event_line

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0  # the first retry waits up to this long
BACKOFF_CAP_S = 60.0  # no backoff delay is longer
RETRY_AFTER_CAP_S = 60.0  # a longer Retry-After is cut to this (lines queue up behind it)
CLOSE_TIMEOUT_S = 3.0  # for every endpoint together to send its queue at the end of a run
MAX_REMEMBERED_EVENTS = 4096  # events whose label and peak a later clip line is judged by
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class Outcome(enum.Enum):
    """What one try of a line came to."""

    DELIVERED = "delivered"  # 2xx
    RETRY = "retry"  # 429, 5xx, a timeout or a network error: try again after a delay
    FAILED = "failed"  # a redirect or another 4xx: trying again would not help
    GONE = "gone"  # 410: the receiver wants no more


@dataclass(frozen=True)
class Answer:
    """One try's outcome; ``reason`` says why in words (no secrets), ``retry_after_s`` is the
    delay the server asked for (None: it did not)."""

    outcome: Outcome
    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Delivery:
    """One line for one endpoint: its idempotency key and its body."""

    webhook_id: str
    body: bytes


@dataclass(frozen=True)
class Counts:
    """An endpoint's figures so far: lines delivered, tries after a line's first, lines failed
    (given up on) and dropped; whether a 410 disabled it, and why its last line failed."""

    delivered: int = 0
    retried: int = 0
    failed: int = 0
    dropped: int = 0
    gone: bool = False
    last_failure: str = ""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: the base64 after ``whsec_``, else the text's UTF-8 bytes.

    Example:
        >>> signing_key("whsec_c2VjcmV0"), signing_key("plain")
        (b'secret', b'plain')
    """
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    return secret.encode()


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of
    ``<id>.<timestamp>.<body>``."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def webhook_id(line: Mapping[str, Any]) -> str:
    """``<event id>-<type>-<seq>``, with characters a webhook id may not hold replaced by ``_``.

    Example:
        >>> webhook_id({"id": "ab12-cam.1-fall-3", "type": "new", "seq": 7})
        'ab12-cam_1-fall-3-new-7'
    """
    return _UNSAFE_ID_CHARS.sub("_", f"{line.get('id')}-{line.get('type')}-{line.get('seq')}")


def retry_after_s(value: str | None, now: float, cap_s: float) -> float | None:
    """The delay a ``Retry-After`` header asks for, at most ``cap_s``; None when there is none
    or it cannot be read.

    Args:
        value: the header: seconds (``"120"``) or an HTTP date.
        now: the current unix time, to turn a date into a delay.
        cap_s: the longest delay obeyed.

    Example:
        >>> retry_after_s("120", now=0.0, cap_s=60.0)
        60.0
        >>> retry_after_s("Thu, 01 Jan 1970 00:00:30 GMT", now=0.0, cap_s=60.0)
        30.0
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap_s)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=timezone.utc)
    return min(max(0.0, when.timestamp() - now), cap_s)


def backoff_s(tries: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter: a random delay in ``[0, min(cap_s, base_s * 2**(tries - 1))]`` after
    ``tries`` failed tries."""
    return rng.uniform(0.0, min(cap_s, base_s * 2.0 ** min(tries - 1, 60)))


class Target:
    """Where and how one endpoint's requests go: URL parts, fixed headers, signing key."""

    def __init__(self, cfg: WebhookConfig) -> None:
        parts = urlsplit(cfg.url)
        self.name = redact_url(cfg.url)
        self.https = parts.scheme.lower() == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = cfg.timeout_s
        self.key = signing_key(cfg.secret.get_secret_value()) if cfg.secret else None
        self._ssl = ssl.create_default_context() if self.https else None
        ours = {"content-type": "application/json", "user-agent": f"streamdet/{__version__}"}
        if parts.username is not None:
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            ours["authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
        given = {name.lower() for name in cfg.headers}  # the config's win, whatever their case
        self.headers = {k: v for k, v in ours.items() if k not in given} | cfg.headers

    def post(self, delivery: Delivery, timeout_s: float, retry_after_cap_s: float) -> Answer:
        """One try: POST the body with fresh timestamp and signature; what came of it."""
        timestamp = int(time.time())
        headers = dict(self.headers)
        headers["webhook-id"] = delivery.webhook_id
        headers["webhook-timestamp"] = str(timestamp)
        if self.key is not None:
            headers["webhook-signature"] = sign(
                self.key, delivery.webhook_id, timestamp, delivery.body
            )
        conn = self._connection(timeout_s)
        try:
            conn.request("POST", self.path, body=delivery.body, headers=headers)
            response = conn.getresponse()
            status, retry_after = response.status, response.getheader("retry-after")
        except TimeoutError:
            return Answer(Outcome.RETRY, f"no answer within {timeout_s:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return Answer(Outcome.RETRY, redact_text(f"{type(exc).__name__}: {exc}"))
        finally:
            conn.close()
        return classify(status, retry_after_s(retry_after, time.time(), retry_after_cap_s))

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout_s, context=self._ssl
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)


def classify(status: int, retry_after: float | None) -> Answer:
    """What an HTTP status means for a line.

    Example:
        >>> classify(503, 2.0)
        Answer(outcome=<Outcome.RETRY: 'retry'>, reason='HTTP 503', retry_after_s=2.0)
    """
    reason = f"HTTP {status}"
    if 200 <= status < 300:
        return Answer(Outcome.DELIVERED, reason)
    if status == 410:
        return Answer(Outcome.GONE, f"{reason} Gone")
    if status == 429 or 500 <= status < 600:
        return Answer(Outcome.RETRY, reason, retry_after)
    if 300 <= status < 400:
        return Answer(Outcome.FAILED, f"{reason}: redirects are not followed (update the URL)")
    return Answer(Outcome.FAILED, reason)


class Endpoint(threading.Thread):
    """One endpoint's thread and bounded queue; :meth:`offer` never blocks.

    Args:
        cfg: the endpoint's config.
        backoff_base_s: the first retry waits up to this long (doubling per try).
        backoff_cap_s: no backoff delay is longer.
        retry_after_cap_s: no ``Retry-After`` is obeyed beyond this.
        rng: randomness of the jitter.
    """

    def __init__(
        self,
        cfg: WebhookConfig,
        *,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        retry_after_cap_s: float = RETRY_AFTER_CAP_S,
        rng: random.Random | None = None,
    ) -> None:
        self.target = Target(cfg)
        super().__init__(name=f"webhook-{self.target.host}", daemon=True)
        self.max_attempts = cfg.max_attempts
        self.max_queued = cfg.max_queued
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.retry_after_cap_s = retry_after_cap_s
        self._rng = rng or random.Random()
        # The condition's lock protects the queue, the counters, the flags and _in_flight.
        self._cond = threading.Condition()
        self._queue: deque[Delivery] = deque()
        self._in_flight = False
        self._deadline: float | None = None  # monotonic; set when the run closes
        self._abandoned = False  # past the deadline: nothing more is counted or sent
        self._delivered = self._retried = self._failed = self._dropped = 0
        self._gone = False
        self._last_failure = ""

    @property
    def redacted_url(self) -> str:
        """The endpoint's URL with its credentials masked: how logs and the summary name it."""
        return self.target.name

    def counts(self) -> Counts:
        with self._cond:
            return Counts(
                self._delivered,
                self._retried,
                self._failed,
                self._dropped,
                self._gone,
                self._last_failure,
            )

    # -- called by the sink's thread: never block ---------------------------------------------

    def offer(self, delivery: Delivery) -> None:
        with self._cond:
            if self._gone or self._deadline is not None or len(self._queue) >= self.max_queued:
                self._dropped += 1
                return
            self._queue.append(delivery)
            self._cond.notify()
        if self.ident is None:  # started by its first line
            self.start()

    def begin_close(self, deadline: float) -> None:
        """Send what is queued until ``deadline`` (monotonic), then stop."""
        with self._cond:
            self._deadline = deadline
            self._cond.notify_all()

    def abandon(self) -> None:
        """The deadline passed: what is queued or in flight counts as dropped."""
        with self._cond:
            if self._abandoned:
                return
            self._abandoned = True
            self._dropped += len(self._queue) + int(self._in_flight)
            self._queue.clear()
            self._cond.notify_all()

    # -- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        while (delivery := self._next()) is not None:
            self._deliver(delivery)

    def _next(self) -> Delivery | None:
        with self._cond:
            while True:
                if self._abandoned or self._gone:
                    return None
                if self._queue:
                    self._in_flight = True
                    return self._queue.popleft()
                if self._deadline is not None:
                    return None
                self._cond.wait()

    def _deliver(self, delivery: Delivery) -> None:
        tries = 0
        while True:
            tries += 1
            answer = self.target.post(delivery, self._timeout_s(), self.retry_after_cap_s)
            if answer.outcome is Outcome.RETRY and tries < self.max_attempts:
                delay = answer.retry_after_s
                if delay is None:
                    delay = backoff_s(tries, self.backoff_base_s, self.backoff_cap_s, self._rng)
                log.debug(
                    "webhook %s: %s, try %d again in %.2f s",
                    self.redacted_url,
                    answer.reason,
                    tries + 1,
                    delay,
                )
                if not self._wait_to_retry(delay):
                    return
                continue
            self._finish(answer, tries)
            return

    def _timeout_s(self) -> float:
        """The request timeout: the config's, cut to the time left once the run is closing."""
        with self._cond:
            if self._deadline is None:
                return self.target.timeout_s
            return max(0.05, min(self.target.timeout_s, self._deadline - time.monotonic()))

    def _wait_to_retry(self, delay: float) -> bool:
        """Wait ``delay`` seconds; False (the line counts as dropped) when the close deadline
        comes first."""
        until = time.monotonic() + delay
        with self._cond:
            while True:
                if self._abandoned:
                    return False
                if self._deadline is not None and until > self._deadline:
                    self._dropped += 1
                    self._in_flight = False
                    return False
                left = until - time.monotonic()
                if left <= 0:
                    self._retried += 1
                    return True
                self._cond.wait(left)

    def _finish(self, answer: Answer, tries: int) -> None:
        with self._cond:
            if self._abandoned:  # already counted as dropped
                return
            self._in_flight = False
            if answer.outcome is Outcome.DELIVERED:
                self._delivered += 1
                return
            self._failed += 1
            self._last_failure = answer.reason
            first_failure = self._failed == 1
            if answer.outcome is Outcome.GONE:
                self._gone = True
                self._dropped += len(self._queue)
                self._queue.clear()
        if answer.outcome is Outcome.GONE:
            log.warning(
                "webhook %s: %s: endpoint disabled, later lines are dropped",
                self.redacted_url,
                answer.reason,
            )
        elif first_failure:
            log.warning(
                "webhook %s: a line was not delivered (%s, after %d %s); further failures are "
                "counted in the summary",
                self.redacted_url,
                answer.reason,
                tries,
                "try" if tries == 1 else "tries",
            )


class WebhooksSink(BaseSink):
    """Every ``sinks.webhooks`` endpoint of a run, fed from the event stage.

    Args:
        configs: the endpoints.
        run_id: the run's id.
        model: ``{"name": ..., "sha256": ...}``, for lines of a run without an event log.
        stride: window stride, for those lines.
        length: window length, for those lines.
        backoff_base_s: the first retry waits up to this long (doubling per try).
        backoff_cap_s: no backoff delay is longer.
        retry_after_cap_s: no ``Retry-After`` is obeyed beyond this.
        close_timeout_s: at the end, for all endpoints together to send what is queued.
    """

    name = "webhooks"

    def __init__(
        self,
        configs: Sequence[WebhookConfig],
        *,
        run_id: str,
        model: Mapping[str, str],
        stride: int,
        length: int,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        retry_after_cap_s: float = RETRY_AFTER_CAP_S,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.configs = list(configs)
        self.endpoints = [
            Endpoint(
                cfg,
                backoff_base_s=backoff_base_s,
                backoff_cap_s=backoff_cap_s,
                retry_after_cap_s=retry_after_cap_s,
            )
            for cfg in self.configs
        ]
        self.run_id = run_id
        self.model = dict(model)
        self.stride, self.length = stride, length
        self.close_timeout_s = close_timeout_s
        self._lines = 0  # lines handed to this output: the seq of lines without a log
        # event id -> (label, peak score), to judge clip lines (the sink's thread only)
        self._events: OrderedDict[str, tuple[str, float]] = OrderedDict()

    # -- the sink's thread: filter and enqueue, never I/O ------------------------------------

    def on_event(self, msg: EventMessage) -> None:
        self._lines += 1
        line = msg.line
        if line is None:
            line = event_line(
                msg.change,
                seq=self._lines,
                run_id=self.run_id,
                model=self.model,
                stride=self.stride,
                length=self.length,
                latency_ms=msg.latency_ms,
            )
        label, peak = msg.change.label, float(line["peak_score"])  # as the receiver sees it
        self._remember(msg.change.id, label, peak)
        self._send(line, msg.change.source, label, peak)

    def on_media(self, msg: MediaMessage) -> None:
        self._lines += 1
        line = dict(msg.line)
        line.setdefault("seq", self._lines)
        label, peak = self._events.get(str(line.get("id")), (line.get("label"), None))
        if peak is None and isinstance(line.get("peak_score"), int | float):
            peak = float(line["peak_score"])
        self._send(line, line.get("source"), label, peak)

    def _remember(self, event_id: str, label: str, peak: float) -> None:
        self._events[event_id] = (label, peak)
        self._events.move_to_end(event_id)
        while len(self._events) > MAX_REMEMBERED_EVENTS:
            self._events.popitem(last=False)

    def _send(self, line: Mapping[str, Any], source: Any, label: Any, peak: float | None) -> None:
        wanted = [
            e
            for e, cfg in zip(self.endpoints, self.configs, strict=True)
            if _wants(cfg, line.get("type"), source, label, peak)
        ]
        if not wanted:
            return
        try:
            body = json.dumps(line, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:  # NaN in a line without a log: not JSON, never sent
            log.warning("webhooks: a %s line cannot be sent: %s", line.get("type"), exc)
            return
        delivery = Delivery(webhook_id(line), body)
        for endpoint in wanted:
            endpoint.offer(delivery)

    # -- the run's thread ------------------------------------------------------------------

    def progress_text(self) -> str:
        """``12 sent``, then retries, failures, drops and disabled endpoints when there are any."""
        counts = [e.counts() for e in self.endpoints]
        parts = [f"{sum(c.delivered for c in counts)} sent"]
        for word, total in [
            ("retried", sum(c.retried for c in counts)),
            ("failed", sum(c.failed for c in counts)),
            ("dropped", sum(c.dropped for c in counts)),
            ("disabled", sum(c.gone for c in counts)),
        ]:
            if total:
                parts.append(f"{total} {word}")
        return ", ".join(parts)

    def summary_lines(self) -> list[str]:
        lines = []
        for e in self.endpoints:
            c = e.counts()
            line = (
                f"webhook {e.redacted_url}: {c.delivered} delivered, {c.retried} retried, "
                f"{c.failed} failed, {c.dropped} dropped"
            )
            if c.gone:
                line += " (disabled: the endpoint answered 410 Gone)"
            elif c.last_failure:
                line += f" (last failure: {c.last_failure})"
            lines.append(line)
        return lines

    def close(self) -> None:
        """Give every endpoint until one shared deadline to send its queue; count the rest as
        dropped."""
        deadline = time.monotonic() + self.close_timeout_s
        for e in self.endpoints:
            e.begin_close(deadline)
        for e in self.endpoints:
            if e.ident is not None:
                e.join(max(0.0, deadline - time.monotonic()))
        for e in self.endpoints:
            if e.is_alive():  # a request in flight: left to time out on its daemon thread
                e.abandon()


def _wants(cfg: WebhookConfig, kind: Any, source: Any, label: Any, peak: float | None) -> bool:
    if kind not in cfg.events:
        return False
    if cfg.sources is not None and source not in cfg.sources:
        return False
    if cfg.labels is not None and label not in cfg.labels:
        return False
    return cfg.min_score <= 0.0 or (peak is not None and peak >= cfg.min_score)


def build_webhooks(
    configs: Sequence[WebhookConfig],
    *,
    class_names: Sequence[str],
    run_id: str,
    model: Mapping[str, str],
    window: WindowConfig,
) -> WebhooksSink:
    """The webhooks output of a run.

    Raises:
        ConfigError: an endpoint names labels the model does not have.
    """
    for i, cfg in enumerate(configs):
        unknown = sorted(set(cfg.labels or ()) - set(class_names))
        if unknown:
            shown = ", ".join(repr(label) for label in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            classes = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
            raise ConfigError(
                f"sinks.webhooks[{i}].labels: {shown}{more} not among the model's classes "
                f"({classes})"
            )
    return WebhooksSink(
        configs, run_id=run_id, model=model, stride=window.stride, length=window.length
    )
