"""The MQTT output against a real Mosquitto broker and a real paho subscriber, in-process:
discovery, the outage queue and its order, refusals, secrets, stats and a clean close."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mosquitto import Mosquitto, Watcher, free_port
from pydantic import SecretStr

from streamdet.config import MqttConfig
from streamdet.events import EventChange
from streamdet.sinks import mqtt as mqtt_module
from streamdet.sinks.base import EventMessage, RunStats, SourceStats, StatusMessage
from streamdet.sinks.mqtt import MqttSink

LABELS = ("fall", "run")
PASSWORD = "hunter2-Zq81"  # grepped for in everything a test captures

# Home Assistant's documented required keys (https://www.home-assistant.io/integrations/
# event.mqtt/ and binary_sensor.mqtt/): state_topic for both, event_types for event; with
# discovery, unique_id ties an entity to its device, whose identifiers name it.
HA_REQUIRED = {
    "event": {"state_topic", "event_types", "unique_id", "device"},
    "binary_sensor": {"state_topic", "unique_id", "device"},
}


@pytest.fixture(autouse=True)
def fast_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconnect within a second or two, not up to 30 s (the backoff is the same mechanism)."""
    monkeypatch.setattr(mqtt_module, "RECONNECT_MAX_S", 2)


@pytest.fixture
def sinks() -> Iterator[Callable[..., MqttSink]]:
    """Factory of MqttSinks on 127.0.0.1 (``port``, other MqttConfig fields as keywords); every
    one is closed after the test."""
    made: list[MqttSink] = []

    def make(port: int, **fields: Any) -> MqttSink:
        cfg = MqttConfig(host="127.0.0.1", port=port, client_id=f"test-{len(made)}", **fields)
        sink = MqttSink(
            cfg, sources=["cam"], labels=LABELS, run_id="r1", model={"name": "m", "sha256": "0"}
        )
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def change(n: int, kind: str = "new", label: str = "fall") -> EventMessage:
    """Event ``n`` of a run (``kind`` new/update/end), as the router hands it over."""
    c = EventChange(
        type=kind,  # type: ignore[arg-type]
        id=f"r1-cam-{label}-{n}",
        source="cam",
        label=label,
        class_index=LABELS.index(label) + 1,
        score=0.9,
        peak_score=0.9,
        threshold=0.6,
        start_time=1000.0 + n,
        end_time=1001.0 + n,
        start_frame=10 * n,
        end_frame=10 * n + 9,
        window_first_frame=10 * n,
        window_last_frame=10 * n + 15,
        window_time=1001.0 + n,
        end_reason="score_drop" if kind == "end" else None,
    )
    line = {"type": kind, "id": c.id, "seq": n, "source": "cam", "label": label, "score": 0.9}
    return EventMessage(c, line, 5.0)


def events_of(watcher: Watcher) -> list[dict[str, Any]]:
    return [m.json() for m in watcher.on("streamdet/events")]


def wait_progress(sink: MqttSink, prefix: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not sink.progress_text().startswith(prefix):
        assert time.monotonic() < deadline, (
            f"progress never said {prefix!r}: {sink.progress_text()}"
        )
        time.sleep(0.02)


def without_repeats(items: list[Any]) -> list[Any]:
    """``items`` with QoS 1 redeliveries removed (a message seen again keeps its first place)."""
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


@pytest.mark.timeout(60)
def test_discovery_has_home_assistants_required_keys_and_is_resent_when_it_restarts(
    mosquitto: Callable[..., Mosquitto], sinks: Callable[..., MqttSink]
) -> None:
    broker = mosquitto()
    with Watcher(broker.port, ["homeassistant/#", "streamdet/available"]) as watcher:
        sink = sinks(broker.port)
        sink.on_status(StatusMessage("cam", "online", "opened", time.time()))
        watcher.wait_for_text("streamdet/available", "online")
        configs = {
            m.topic: m.json() for m in watcher.messages if m.topic.startswith("homeassistant/")
        }

        node = "test-0"
        event = configs.pop(f"homeassistant/event/{node}/cam_event/config")
        assert HA_REQUIRED["event"] <= event.keys()
        assert event["event_types"] == list(LABELS)
        assert event["state_topic"] == "streamdet/cam/event"
        for label in LABELS:
            sensor = configs.pop(f"homeassistant/binary_sensor/{node}/cam_{label}/config")
            assert HA_REQUIRED["binary_sensor"] <= sensor.keys()
            assert sensor["state_topic"] == f"streamdet/cam/{label}"
            assert (sensor["payload_on"], sensor["payload_off"]) == ("ON", "OFF")
            assert sensor["device"] == event["device"]  # one device per source
        assert configs == {}  # nothing else under the discovery prefix
        for config in (event, sensor):
            assert config["availability_topic"] == "streamdet/available"
            assert config["device"]["identifiers"] == [f"{node}_cam"]
        unique_ids = [event["unique_id"]] + [f"{node}_cam_{x}" for x in LABELS]
        assert len(set(unique_ids)) == len(unique_ids)

        # Home Assistant restarted: it announces itself and must get the configs again.
        watcher.clear()
        watcher.client.publish("homeassistant/status", "online", qos=1)
        watcher.wait_for(
            lambda: len([m for m in watcher.messages if m.topic.endswith("/config")]) == 3,
            what="the discovery configs again",
        )


@pytest.mark.timeout(90)
def test_events_made_while_the_broker_is_away_go_out_after_it_returns_in_order(
    mosquitto: Callable[..., Mosquitto], sinks: Callable[..., MqttSink]
) -> None:
    """Regression: paho re-sends what it held unacknowledged *after* whatever ``on_connect``
    publishes, so events the broker never acknowledged came after those queued later."""
    broker = mosquitto(persistence=True)
    # A persistent session: the restarted broker keeps the watcher's events until it is back.
    watcher = Watcher(broker.port, ["streamdet/events"], client_id="watcher", clean_session=False)
    with watcher:
        broker.save()
        sink = sinks(broker.port)
        for n in (1, 2):
            sink.on_event(change(n))
        watcher.wait_for(lambda: len(watcher.on("streamdet/events")) == 2)

        # Frozen, the broker takes 3 and 4 off the wire but never acknowledges them...
        broker.proc.send_signal(signal.SIGSTOP)
        for n in (3, 4):
            sink.on_event(change(n))
        broker.kill()  # ...and dies: they stay with paho, unacknowledged
        wait_progress(sink, "disconnected")
        started = time.monotonic()
        for n in (5, 6):  # queued: the link is known to be down
            sink.on_event(change(n))
        assert time.monotonic() - started < 1.0, "on_event waited for the broker"
        assert ", 4 queued," in sink.progress_text()  # each new: the event and its HA event

        broker.start()  # the same port and database
        watcher.wait_for(
            lambda: {e["after"]["seq"] for e in events_of(watcher)} >= set(range(1, 7)),
            what="events 1-6 after the restart",
        )
    seqs = without_repeats([e["after"]["seq"] for e in events_of(watcher)])
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert sink.progress_text().startswith("connected,")
    assert ", 0 queued, 0 dropped, 1 reconnects" in sink.progress_text()


@pytest.mark.timeout(60)
def test_a_broker_down_at_start_then_refusing_keeps_the_newest_events_and_hides_the_password(
    mosquitto: Callable[..., Mosquitto],
    sinks: Callable[..., MqttSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused CONNACK is not a connection (Frigate counts it as one and publishes into the
    void); the queue waits, oldest dropped first; the password shows nowhere."""
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens yet
    sink = sinks(port, max_queued=3, user="sink", password=SecretStr(PASSWORD), ha_discovery=False)
    started = time.monotonic()
    for n in range(1, 6):
        sink.on_event(change(n))
    assert time.monotonic() - started < 1.0, "on_event waited for an absent broker"
    assert sink.progress_text().endswith("0 published, 3 queued, 2 dropped, 0 reconnects")

    broker = mosquitto(users={"watcher": "w"}, port=port)  # knows the watcher only
    wait_progress(sink, "refused (Not authorized)")
    assert sink.progress_text().endswith("0 published, 3 queued, 2 dropped, 0 reconnects")
    with Watcher(port, ["streamdet/events"], user="watcher", password="w") as watcher:
        broker.set_users({"watcher": "w", "sink": PASSWORD})
        watcher.wait_for(lambda: len(watcher.on("streamdet/events")) >= 3, what="3 events")
        wait_progress(sink, "connected")
    assert without_repeats([e["after"]["seq"] for e in events_of(watcher)]) == [3, 4, 5]
    assert ", 0 queued, 2 dropped, 0 reconnects" in sink.progress_text()

    said = [sink.progress_text(), repr(sink), *sink.summary_lines(), caplog.text]
    said += [str(r.args) for r in caplog.records]
    assert "refused the connection (Not authorized)" in caplog.text
    assert not [text for text in said if PASSWORD in text]


@pytest.mark.timeout(60)
def test_close_turns_open_labels_off_and_says_stopped_and_stats_go_out_on_their_interval(
    mosquitto: Callable[..., Mosquitto], sinks: Callable[..., MqttSink]
) -> None:
    broker = mosquitto()
    with Watcher(broker.port, ["streamdet/#"]) as watcher:
        sink = sinks(broker.port, stats_interval_s=3600)
        stats = RunStats(
            sources={"cam": SourceStats(9.5, 1, 40, 2, 0, "online", 80.0, float("nan"))},
            inference_ms_p50=12.0,
        )
        sink.on_stats(stats)  # not connected yet: figures are not kept for later
        watcher.wait_for_text("streamdet/available", "online")
        sink.on_stats(stats)
        sink.on_event(change(1, "new", "fall"))
        sink.on_event(change(2, "new", "run"))
        sink.on_event(change(2, "end", "run"))
        sink.on_stats(stats)  # within the interval: not sent
        watcher.wait_for_text("streamdet/cam/fall", "ON")
        sink.close()
        watcher.wait_for_text("streamdet/available", "stopped")

        assert [m.text for m in watcher.on("streamdet/cam/fall")] == ["OFF", "ON", "OFF"]
        assert [m.text for m in watcher.on("streamdet/cam/run")] == ["OFF", "ON", "OFF"]
        (sent,) = [m.json() for m in watcher.on("streamdet/stats")]
        assert sent["sources"]["cam"] == {
            "fps": 9.5,
            "status": "online",
            "windows": 40,
            "windows_skipped": 2,
            "frames_skipped": 1,
            "reconnects": 0,
            "latency_ms_p50": 80.0,
            "latency_ms_p99": None,
        }
        assert sent["inference_ms_p50"] == 12.0 and sent["latency_ms_p99"] is None
        updates = events_of(watcher)
        assert [(e["type"], e["before"] and e["before"]["type"]) for e in updates] == [
            ("new", None),
            ("new", None),
            ("end", "new"),  # before: the event's previous line
        ]
        assert [m.json()["event_type"] for m in watcher.on("streamdet/cam/event")] == [
            "fall",
            "run",
        ]
    assert sink.progress_text().startswith("closed,")
