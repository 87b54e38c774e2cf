"""Events, source status and run figures to an MQTT broker, with Home Assistant discovery.

Topics (``<prefix>`` is ``sinks.mqtt.topic_prefix``), modelled on Frigate's:

==================================  =========================================================
``<prefix>/available``              retained ``online`` after every (re)connect, once the
                                    retained state below is republished; ``offline`` as the
                                    last will (the broker sends it when the run dies);
                                    ``stopped`` on a clean stop
``<prefix>/events``                 ``{"type": "new"|"update"|"end", "before", "after"}``:
                                    ``after`` is the event-log line, ``before`` the event's
                                    previous ``after`` (null on ``new``); media lines go here
                                    as ``{"type": "clip"|"snapshot", "before": null, ...}``
``<prefix>/<source>/<label>``       retained ``ON`` while an event of ``label`` is open
``<prefix>/<source>/status``        retained ``online`` / ``offline``
``<prefix>/<source>/event``         ``{"event_type": label, ...}`` on ``new`` (Home
                                    Assistant's event entity)
``<prefix>/stats``                  the run's figures, every ``stats_interval_s``
==================================  =========================================================

Delivery: the paho network thread connects in the background (a broker that is down never
delays the run) and reconnects with exponential backoff. While it is away, events wait in a
bounded queue (the oldest are dropped and counted) and go out in order after the reconnect;
retained state is not queued but republished from the current state on every connect, so no
stale ``ON`` survives. With QoS 1 a message the broker received but had not acknowledged when
the connection dropped is sent again: subscribers may see it twice (at least once).

Locking: ``_lock`` protects the connection flag, the queue, the retained state and the counters;
it is taken before paho's own locks (publishing under it keeps messages in order between the
sink thread and ``on_connect``). ``_acks`` is a leaf: paho calls ``on_publish`` holding its
message lock, so ``on_publish`` takes nothing but ``_acks``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from streamdet.config import MqttConfig, MqttTlsConfig
from streamdet.errors import ConfigError
from streamdet.events import EventChange
from streamdet.sinks.base import (
    BaseSink,
    EventMessage,
    MediaMessage,
    RunStats,
    StatusMessage,
)
from streamdet.sinks.jsonl import event_line, iso_utc

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1  # paho doubles the delay after each failed try, up to RECONNECT_MAX_S
RECONNECT_MAX_S = 30
KEEPALIVE_S = 30  # a silently dead connection is noticed within 1.5x this
CONNECT_TIMEOUT_S = 3.0  # one connect attempt; close() may wait for one in progress
CLOSE_WAIT_S = 2.0  # at close, for the broker to acknowledge what is in flight
AVAILABLE_QOS = 1  # the availability topic and its will, whatever `qos` says
RESERVED_LEVELS = ("status", "event")  # per-source topics beside the labels'
_NOT_IN_TOPIC = re.compile(r"[/+#\x00]")
_NOT_IN_DISCOVERY_ID = re.compile(r"[^A-Za-z0-9_-]")


class Link(Enum):
    """Where the connection to the broker stands."""

    CONNECTING = "connecting"  # the first attempt has not answered yet
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # lost, or never reached: retrying with backoff
    REFUSED = "refused"  # the broker answered with a refusal (bad credentials...): retrying
    CLOSED = "closed"  # disconnected cleanly by close()


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    topic: str
    payload: str
    qos: int
    retain: bool = False


def default_client_id() -> str:
    """``streamdet-<hostname>``: one id per machine (two clients with one id kick each other
    off a broker in a loop)."""
    return f"streamdet-{socket.gethostname()}"[:128]


def topic_level(name: str) -> str:
    """``name`` as one topic level: ``/``, ``+``, ``#`` and NUL become ``_``.

    Example:
        >>> topic_level("slip/fall")
        'slip_fall'
    """
    return _NOT_IN_TOPIC.sub("_", name)


class Topics:
    """The topic names under one prefix."""

    def __init__(self, prefix: str, discovery_prefix: str, node_id: str) -> None:
        self.prefix = prefix
        self.available = f"{prefix}/available"
        self.events = f"{prefix}/events"
        self.stats = f"{prefix}/stats"
        self.discovery_status = f"{discovery_prefix}/status"
        self._discovery_prefix = discovery_prefix
        self.node_id = _NOT_IN_DISCOVERY_ID.sub("_", node_id)

    def label(self, source: str, label: str) -> str:
        return f"{self.prefix}/{source}/{topic_level(label)}"

    def status(self, source: str) -> str:
        return f"{self.prefix}/{source}/status"

    def ha_event(self, source: str) -> str:
        return f"{self.prefix}/{source}/event"

    def discovery(self, component: str, object_id: str) -> str:
        """``<discovery_prefix>/<component>/<node_id>/<object_id>/config``."""
        object_id = _NOT_IN_DISCOVERY_ID.sub("_", object_id)
        return f"{self._discovery_prefix}/{component}/{self.node_id}/{object_id}/config"


def discovery_configs(
    topics: Topics, sources: Sequence[str], labels: Sequence[str], model_name: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Home Assistant discovery configs: per source a device with an ``event`` entity (one
    event type per label) and a ``binary_sensor`` per label. Yields (topic, config).

    Keys as https://www.home-assistant.io/integrations/event.mqtt/ and
    https://www.home-assistant.io/integrations/binary_sensor.mqtt/ document them.
    ``availability_template`` maps ``stopped`` (a clean stop) to unavailable as well.
    """
    availability = {
        "availability_topic": topics.available,
        "availability_template": "{{ 'online' if value == 'online' else 'offline' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    for source in sources:
        device_id = f"{topics.node_id}_{source}"
        device = {
            "identifiers": [device_id],
            "name": f"streamdet {source}",
            "manufacturer": "streamdet",
            "model": model_name,
        }
        yield (
            topics.discovery("event", f"{source}_event"),
            {
                "name": "Event",
                "unique_id": f"{device_id}_event",
                "state_topic": topics.ha_event(source),
                "event_types": list(labels),
                "device": device,
                **availability,
            },
        )
        for label in labels:
            yield (
                topics.discovery("binary_sensor", f"{source}_{label}"),
                {
                    "name": label,
                    "unique_id": f"{device_id}_{_NOT_IN_DISCOVERY_ID.sub('_', label)}",
                    "state_topic": topics.label(source, label),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device": device,
                    **availability,
                },
            )


def stats_payload(stats: RunStats) -> dict[str, Any]:
    """The ``<prefix>/stats`` message (nan, nothing measured yet, as null)."""
    return {
        "time": iso_utc(time.time()),
        "sources": {
            name: {
                "fps": _number(s.fps_in),
                "status": s.status,
                "windows": s.windows,
                "windows_skipped": s.windows_skipped,
                "frames_skipped": s.frames_skipped,
                "reconnects": s.reconnects,
                "latency_ms_p50": _number(s.latency_ms_p50),
                "latency_ms_p99": _number(s.latency_ms_p99),
            }
            for name, s in stats.sources.items()
        },
        "inference_ms_p50": _number(stats.inference_ms_p50),
        "inference_ms_p99": _number(stats.inference_ms_p99),
        "latency_ms_p50": _number(stats.latency_ms_p50),
        "latency_ms_p99": _number(stats.latency_ms_p99),
        "events_opened": stats.events_opened,
    }


def tls_context(tls: MqttTlsConfig) -> ssl.SSLContext:
    """The client's TLS context, as paho's ``tls_set`` makes it: the broker's certificate must
    chain to ``ca_certs`` (the system's CAs without it) and name the host; ``insecure`` is
    applied on the client (``tls_insecure_set``: the name check only, never the chain).

    Raises:
        ConfigError: a file cannot be read or does not hold what it should (an encrypted key
            among them: OpenSSL would ask for its password on the terminal), naming its key.
    """
    for key in ("ca_certs", "certfile", "keyfile"):
        path = getattr(tls, key)
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(
                    f"sinks.mqtt.tls.{key}: cannot read {path}: {exc.strerror or exc}"
                ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # certificate and hostname required
    try:
        if tls.ca_certs is not None:
            context.load_verify_locations(tls.ca_certs)
        else:
            context.load_default_certs()
    except ssl.SSLError as exc:
        raise ConfigError(
            f"sinks.mqtt.tls.ca_certs: {tls.ca_certs} holds no PEM CA certificate: "
            f"{exc.reason or exc}"
        ) from None
    if tls.certfile is not None:
        key = tls.keyfile or tls.certfile

        def refuse_password() -> bytes:  # raised through load_cert_chain
            raise ConfigError(
                f"sinks.mqtt.tls.keyfile: {key} is encrypted; give an unencrypted key"
            )

        try:
            context.load_cert_chain(tls.certfile, tls.keyfile, password=refuse_password)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"sinks.mqtt.tls: certfile {tls.certfile} and keyfile {key} are not a PEM "
                f"certificate and its key: {exc.reason or exc}"
            ) from None
    return context


def connect_failure(exc: BaseException | None) -> str:
    """Why a connect attempt failed, in a few words.

    Example:
        >>> connect_failure(ConnectionRefusedError(111, "Connection refused"))
        'Connection refused'
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return "no answer"


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 2)


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


class MqttSink(BaseSink):
    """Publishes the run to an MQTT broker (see the module docstring for the topics).

    Args:
        cfg: the ``sinks.mqtt`` section.
        sources: every source's name.
        labels: the classes that make events (the model's, without the background class).
        run_id: the run's id (for lines built when there is no event log).
        model: ``{"name": ..., "sha256": ...}`` of the model in use.

    Raises:
        ConfigError: the TLS files cannot be loaded, or a label would share a source's
            ``status`` or ``event`` topic.

    The connection starts with the first message (from the sink's thread), so building the
    sink costs nothing when the run fails before it starts.

    Example:
        >>> sink = MqttSink(MqttConfig(host="127.0.0.1"), sources=["cam"], labels=["fall"],
        ...                 run_id="r1", model={"name": "m", "sha256": ""})
        >>> sink.progress_text()
        'connecting, 0 published, 0 queued, 0 dropped, 0 reconnects'
        >>> sink.close()
    """

    name = "mqtt"

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        sources: Sequence[str],
        labels: Sequence[str],
        run_id: str,
        model: Mapping[str, str],
        stride: int = 8,
        length: int = 16,
    ) -> None:
        clashes = sorted({topic_level(x) for x in labels} & set(RESERVED_LEVELS))
        if clashes:
            raise ConfigError(
                f"sinks.mqtt: the model's class {clashes[0]!r} would share the topic "
                f"<prefix>/<source>/{clashes[0]} with {', '.join(RESERVED_LEVELS)}"
            )
        self.cfg = cfg
        self.client_id = cfg.client_id or default_client_id()
        self.topics = Topics(cfg.topic_prefix, cfg.discovery_prefix, self.client_id)
        self.sources = tuple(sources)
        self.labels = tuple(labels)
        self.run_id = run_id
        self.model = dict(model)
        self.window = (stride, length)  # for the lines of a run without an event log
        self._lines_made = 0
        self.address = f"{cfg.host}:{cfg.port}"
        self._client = self._build_client()
        self._started = False  # the network thread runs (touched by the sink's thread only)
        self._last_stats = -math.inf
        self._after: dict[str, Mapping[str, Any]] = {}  # open event id -> its latest line
        self._socket_error = ""  # paho's last error message, for a warning (see _on_log)

        self._lock = threading.Lock()  # protects everything below (see the module docstring)
        self._link = Link.CONNECTING
        self._refusal = ""
        self._queue: deque[Outgoing] = deque()
        self._label_state = {(s, x): "OFF" for s in self.sources for x in self.labels}
        self._source_status = dict.fromkeys(self.sources, "offline")
        self._available = "online"
        self._connects = 0
        self.dropped = 0

        self._acks = threading.Condition()  # leaf lock: protects the two below
        self._pending: deque[paho.MQTTMessageInfo] = deque()  # handed to paho, not yet acked
        self.published = 0  # acknowledged by the broker (QoS 0: written to the socket)

    def __repr__(self) -> str:
        return f"MqttSink({self.address!r}, client_id={self.client_id!r})"

    # -- the paho client ------------------------------------------------------------------

    def _build_client(self) -> paho.Client:
        cfg = self.cfg
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True
        )
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_queued_messages_set(0)  # our queue bounds what waits; paho's holds in-flight
        if cfg.user is not None and cfg.password is not None:
            client.username_pw_set(cfg.user, cfg.password.get_secret_value())
        if cfg.tls is not None:
            client.tls_set_context(tls_context(cfg.tls))
            client.tls_insecure_set(cfg.tls.insecure)
        client.will_set(self.topics.available, "offline", qos=AVAILABLE_QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log
        return client

    def _start(self) -> None:
        """Start connecting in the background (from the sink's thread, at its first message)."""
        if self._started:
            return
        self._started = True
        try:
            self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=KEEPALIVE_S)
        except (OSError, ValueError) as exc:  # connect_async only records; kept for safety
            log.warning("mqtt: cannot connect to %s: %s", self.address, exc)
        self._client.loop_start()

    # -- paho's network thread -------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: Any,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:  # a refusal is no connection (Frigate takes it for one)
            with self._lock:
                first = self._link is not Link.REFUSED or self._refusal != str(reason_code)
                self._link, self._refusal = Link.REFUSED, str(reason_code)
            if first:
                log.warning(
                    "mqtt: %s refused the connection (%s); retrying with backoff",
                    self.address,
                    reason_code,
                )
            return
        # What paho still held unacknowledged from the last connection: sent again below, in
        # order and before the queue (paho would send it after whatever we publish here).
        unacked = client.drop_out_messages()
        with self._lock:
            if self.cfg.ha_discovery:
                client.subscribe(self.topics.discovery_status, qos=1)
            with self._acks:
                self._pending.clear()
            for msg in self._state_messages():
                self._publish(msg)
            for m in unacked:
                if not m.retain:  # retained state was superseded by the state just sent
                    self._publish(Outgoing(m.topic, m.payload.decode(), m.qos))
            while self._queue:
                self._publish(self._queue.popleft())
            self._publish(Outgoing(self.topics.available, self._available, AVAILABLE_QOS, True))
            self._link, self._refusal = Link.CONNECTED, ""
            self._connects += 1
            again = self._connects > 1
        log.info("mqtt: %s %s", "reconnected to" if again else "connected to", self.address)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: Any,
        properties: Any,
    ) -> None:
        with self._lock:
            was = self._link
            if self._link not in (Link.REFUSED, Link.CLOSED):
                self._link = Link.DISCONNECTED
        if was is Link.CONNECTED:  # not after close(): the link is CLOSED then
            log.warning(
                "mqtt: lost the connection to %s (%s); retrying with backoff, keeping up to "
                "%d events",
                self.address,
                reason_code,
                self.cfg.max_queued,
            )
        elif was is Link.CONNECTING and reason_code.is_failure:
            # Dropped before the CONNACK of the first attempt: with TLS 1.3 a broker that
            # rejects our client certificate says so here, after the handshake (paho logged it).
            log.warning(
                "mqtt: %s dropped the connection before answering (%s); retrying with backoff, "
                "keeping up to %d events",
                self.address,
                self._socket_error or reason_code,
                self.cfg.max_queued,
            )

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        """A connect attempt failed before the broker answered (nothing listens, the TLS
        handshake failed, ...). paho passes no exception but calls this inside its
        ``except OSError``, so ``sys.exc_info()`` holds the cause."""
        cause = connect_failure(sys.exc_info()[1])
        with self._lock:
            first = self._link is Link.CONNECTING
            if first:
                self._link = Link.DISCONNECTED
        if first:
            log.warning(
                "mqtt: cannot reach %s (%s); retrying with backoff, keeping up to %d events",
                self.address,
                cause,
                self.cfg.max_queued,
            )

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        """Keeps paho's last error (a socket's, as a TLS alert) for the next warning."""
        if level == paho.MQTT_LOG_ERR:
            self._socket_error = buf  # one str assignment: no lock (paho may hold its own)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        with self._acks:
            self.published += 1
            self._acks.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic == self.topics.discovery_status and message.payload == b"online":
            with self._lock:  # Home Assistant restarted: it forgot what it discovered
                if self._link is Link.CONNECTED:
                    for msg in self._discovery_messages():
                        self._publish(msg)

    # -- the sink's thread -------------------------------------------------------------------

    def on_event(self, msg: EventMessage) -> None:
        self._start()
        change = msg.change
        after = dict(msg.line) if msg.line is not None else self._line_of(change)
        before = self._after.pop(change.id, None)
        if change.type != "end":
            self._after[change.id] = after  # forgotten at the end: memory stays bounded
        qos = self.cfg.qos
        body = {"type": change.type, "before": before, "after": after}
        self._send(Outgoing(self.topics.events, _json(body), qos))
        if change.type == "new":
            self._set_label(change.source, change.label, "ON")
            if self.cfg.ha_discovery:
                ha_event = {
                    "event_type": change.label,
                    "id": change.id,
                    "score": after.get("score"),
                    "start_time": after.get("start_time"),
                }
                self._send(Outgoing(self.topics.ha_event(change.source), _json(ha_event), qos))
        elif change.type == "end":
            self._set_label(change.source, change.label, "OFF")

    def on_status(self, msg: StatusMessage) -> None:
        self._start()
        status = "online" if msg.status == "online" else "offline"  # "ended" is offline too
        with self._lock:
            self._source_status[msg.source] = status
            self._publish_state(
                Outgoing(self.topics.status(msg.source), status, self.cfg.qos, True)
            )

    def on_media(self, msg: MediaMessage) -> None:
        self._start()
        body = {"type": msg.line.get("type"), "before": None, "after": dict(msg.line)}
        self._send(Outgoing(self.topics.events, _json(body), self.cfg.qos))

    def on_stats(self, stats: RunStats) -> None:
        self._start()
        now = time.monotonic()
        if now - self._last_stats < self.cfg.stats_interval_s:
            return
        with self._lock:  # figures are not kept for later: the next ones will be newer
            if self._link is Link.CONNECTED:
                self._publish(Outgoing(self.topics.stats, _json(stats_payload(stats)), 0))
                self._last_stats = now

    def close(self) -> None:
        """Publish ``stopped`` and ``OFF`` for open labels, wait up to ``CLOSE_WAIT_S`` for the
        broker to acknowledge, disconnect. What never reached the broker counts as dropped."""
        with self._lock:
            for (source, label), state in self._label_state.items():
                if state == "ON":
                    self._set_label_locked(source, label, "OFF")
            self._available = "stopped"
            self._publish_state(
                Outgoing(self.topics.available, self._available, AVAILABLE_QOS, True)
            )
        if not self._started:
            return
        self._wait_for_acks(CLOSE_WAIT_S)
        with self._lock:
            self.dropped += len(self._queue)
            self._queue.clear()
            if self._link is Link.CONNECTED:
                self._link = Link.CLOSED
        self._client.disconnect()
        self._client.loop_stop()

    def progress_text(self) -> str:
        with self._lock:
            link = self._link.value
            if self._link is Link.REFUSED:
                link = f"refused ({self._refusal})"
            queued, dropped, reconnects = len(self._queue), self.dropped, self._reconnects()
        return (
            f"{link}, {self.published} published, {queued} queued, {dropped} dropped, "
            f"{reconnects} reconnects"
        )

    def summary_lines(self) -> list[str]:
        return [f"mqtt {self.address}: {self.progress_text()}"]

    # -- internals ---------------------------------------------------------------------------

    def _reconnects(self) -> int:  # under _lock
        return max(0, self._connects - 1)

    def _line_of(self, change: EventChange) -> dict[str, Any]:
        """The event-log fields of ``change``, for a run without an event log (``seq`` counts
        the lines this output made)."""
        self._lines_made += 1
        stride, length = self.window
        return event_line(
            change,
            seq=self._lines_made,
            run_id=self.run_id,
            model=self.model,
            stride=stride,
            length=length,
            latency_ms=None,
        )

    def _send(self, msg: Outgoing) -> None:
        """Publish an event now, or queue it while the broker is away (oldest dropped)."""
        with self._lock:
            if self._link is Link.CONNECTED:
                self._publish(msg)
                return
            if len(self._queue) >= self.cfg.max_queued:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(msg)

    def _set_label(self, source: str, label: str, state: str) -> None:
        with self._lock:
            self._set_label_locked(source, label, state)

    def _set_label_locked(self, source: str, label: str, state: str) -> None:  # under _lock
        self._label_state[(source, label)] = state
        self._publish_state(Outgoing(self.topics.label(source, label), state, self.cfg.qos, True))

    def _publish_state(self, msg: Outgoing) -> None:  # under _lock
        """Retained state: published when connected, else sent by the next ``on_connect``."""
        if self._link is Link.CONNECTED:
            self._publish(msg)

    def _state_messages(self) -> Iterator[Outgoing]:  # under _lock
        """Every retained topic's current value, ``available`` excepted."""
        if self.cfg.ha_discovery:
            yield from self._discovery_messages()
        qos = self.cfg.qos
        for source, status in self._source_status.items():
            yield Outgoing(self.topics.status(source), status, qos, True)
        for (source, label), state in self._label_state.items():
            yield Outgoing(self.topics.label(source, label), state, qos, True)

    def _discovery_messages(self) -> Iterator[Outgoing]:
        configs = discovery_configs(
            self.topics, self.sources, self.labels, self.model.get("name", "")
        )
        for topic, config in configs:
            yield Outgoing(topic, _json(config), AVAILABLE_QOS, True)

    def _publish(self, msg: Outgoing) -> None:  # under _lock
        info = self._client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.debug("mqtt: publish to %s: %s", msg.topic, paho.error_string(info.rc))
        with self._acks:
            while self._pending and self._pending[0].is_published():
                self._pending.popleft()
            if msg.qos > 0 or info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._pending.append(info)

    def _wait_for_acks(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged everything handed to paho (while connected)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:  # taken before _acks, never inside it
                connected = self._link is Link.CONNECTED
            with self._acks:
                while self._pending and self._pending[0].is_published():
                    self._pending.popleft()
                remaining = deadline - time.monotonic()
                if not self._pending or not connected or remaining <= 0:
                    return not self._pending
                self._acks.wait(min(remaining, 0.1))


def labels_of(class_names: Collection[str], background: str | None) -> list[str]:
    """The classes that make events: all but the background class."""
    return [c for c in class_names if c != background]
