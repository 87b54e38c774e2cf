"""``streamdet run`` with MQTT, end to end: the bundled demo in a real subprocess, a real
Mosquitto broker and a real paho subscriber. Bad ``sinks.mqtt`` sections through the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from mosquitto import Mosquitto, Watcher, free_port

from streamdet import demo
from streamdet.cli import main

REPO = Path(__file__).resolve().parent.parent
DEMO = demo.config_path().parent
PASSWORD = "hunter2-Xk47"  # grepped for in everything a run prints
EVENT_TYPES = ("new", "update", "end")
RUN_TIMEOUT_S = 120


def demo_config(tmp_path: Path, mqtt: dict[str, Any] | None, *, fps: float | None = None) -> Path:
    """The bundled demo's config with its paths made absolute, no annotated video, the event
    log in ``tmp_path`` and ``mqtt`` as ``sinks.mqtt``. ``fps``: paced like a camera at that
    rate (the 600-frame demo lasts 600/fps seconds) instead of read as fast as possible."""
    cfg = yaml.safe_load(demo.config_path().read_text())
    source = cfg["sources"][0]
    source["url"] = str(DEMO / source["url"])
    if fps is not None:
        source["realtime"] = True
        source["options"] = {"fps": fps}
    cfg["model"]["weights"] = str(DEMO / cfg["model"]["weights"])
    cfg.pop("truth")
    cfg["sinks"] = {"events": {"path": str(tmp_path / "events.jsonl")}}
    if mqtt is not None:
        cfg["sinks"]["mqtt"] = mqtt
    cfg["progress_interval_s"] = 0.5
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_run(config: Path, tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamdet", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **env},
        cwd=tmp_path,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Wait for the run to end by itself; (stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return out, err


def event_lines(path: Path) -> list[dict[str, Any]]:
    """The log's new/update/end lines."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if line["type"] in EVENT_TYPES]


def received_events(watcher: Watcher) -> list[dict[str, Any]]:
    """The ``after`` of every event message, QoS 1 redeliveries removed."""
    seen: list[dict[str, Any]] = []
    for message in watcher.on("streamdet/events"):
        after = message.json()["after"]
        if after not in seen:
            seen.append(after)
    return seen


def mqtt_summary(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("[summary] mqtt ")]
    return line


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_the_demo_publishes_its_event_lines_turns_stale_labels_off_and_says_stopped(
    tmp_path: Path, mosquitto: Callable[..., Mosquitto]
) -> None:
    broker = mosquitto()
    with Watcher(broker.port, ["streamdet/#"]) as watcher:
        # A crashed run left a label ON: the next run must not let it survive.
        watcher.client.publish("streamdet/demo/fall", "ON", qos=1, retain=True).wait_for_publish(5)
        watcher.wait_for_text("streamdet/demo/fall", "ON")
        config = demo_config(tmp_path, {"host": "127.0.0.1", "port": broker.port})
        out, err = finish(start_run(config, tmp_path))
        watcher.wait_for_text("streamdet/available", "stopped")

        lines = event_lines(tmp_path / "events.jsonl")
        assert {"new", "end"} <= {line["type"] for line in lines}
        messages = [m.json() for m in watcher.on("streamdet/events")]
        assert [m["after"] for m in messages] == lines  # every line, once, in order
        assert [m["type"] for m in messages] == [line["type"] for line in lines]
        previous: dict[str, Any] = {}
        for m in messages:  # before: the event's previous line, or null
            assert m["before"] == previous.get(m["after"]["id"])
            previous[m["after"]["id"]] = m["after"]

        labels = {line["label"] for line in lines}
        for label in labels | {"fall"}:  # every label ends OFF; fall was reset at the start
            assert watcher.last(f"streamdet/demo/{label}") == "OFF"
        assert [m.text for m in watcher.on("streamdet/demo/fall")][:2] == ["ON", "OFF"]
        assert watcher.last("streamdet/demo/status") == "offline"  # the file ended
        assert watcher.last("streamdet/available") == "stopped"
        (stats,) = [m.json() for m in watcher.on("streamdet/stats")][:1]
        assert set(stats["sources"]) == {"demo"}
        ha = [m.json() for m in watcher.on("streamdet/demo/event")]
        assert [e["event_type"] for e in ha] == [x["label"] for x in lines if x["type"] == "new"]
    summary = mqtt_summary(out)
    assert re.fullmatch(
        rf"\[summary\] mqtt 127\.0\.0\.1:{broker.port}: closed, \d+ published, "
        r"0 queued, 0 dropped, 0 reconnects",
        summary,
    ), summary
    assert "output drops" not in out and "mqtt:" in out  # the progress line shows it


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_a_killed_run_is_announced_offline_by_its_will(
    tmp_path: Path, mosquitto: Callable[..., Mosquitto]
) -> None:
    broker = mosquitto()
    with Watcher(broker.port, ["streamdet/available"]) as watcher:
        config = demo_config(tmp_path, {"host": "127.0.0.1", "port": broker.port}, fps=10)
        proc = start_run(config, tmp_path)
        try:
            watcher.wait_for_text("streamdet/available", "online", timeout=60)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            watcher.wait_for(
                lambda: watcher.last("streamdet/available") == "offline", what="the will"
            )
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 30)
def test_a_broker_down_for_the_whole_run_changes_nothing_in_detection(
    tmp_path: Path,
) -> None:
    """Same events in the log as without MQTT; the run ends by itself, its output never fell
    behind (no output drops), and what it could not send is counted as queued."""
    runs = {}
    for name, mqtt in (("plain", None), ("down", {"host": "127.0.0.1", "port": free_port()})):
        folder = tmp_path / name
        folder.mkdir()
        out, err = finish(start_run(demo_config(folder, mqtt), folder))
        runs[name] = (event_lines(folder / "events.jsonl"), out, err)

    def stable(lines: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        keys = ("type", "label", "score", "peak_score", "start_frame", "end_frame", "end_reason")
        return [tuple(line[k] for k in keys) for line in lines]

    plain, down = runs["plain"][0], runs["down"][0]
    assert plain and stable(down) == stable(plain)
    out, err = runs["down"][1:]
    # Each event line is a message, and each new one an HA event message too.
    expected = len(down) + sum(line["type"] == "new" for line in down)
    # Queued while the run lasted; at its end, what never reached a broker counts as dropped.
    assert f": disconnected, 0 published, 0 queued, {expected} dropped, 0 reconnects" in (
        mqtt_summary(out)
    )
    assert "output drops" not in out
    assert "mqtt: cannot reach 127.0.0.1" in err
    assert "Traceback" not in err


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_a_broker_killed_mid_run_gets_the_events_of_the_outage_after_it_restarts(
    tmp_path: Path, mosquitto: Callable[..., Mosquitto]
) -> None:
    """Every log line arrives, in order, the outage's after the restart; QoS 1 may repeat one
    the broker had not acknowledged (at least once), which ``received_events`` removes."""
    broker = mosquitto(persistence=True)
    log = tmp_path / "events.jsonl"
    # A persistent session: the restarted broker keeps the watcher's messages until it is back.
    watcher = Watcher(broker.port, ["streamdet/events"], client_id="watcher", clean_session=False)
    with watcher:
        broker.save()
        config = demo_config(tmp_path, {"host": "127.0.0.1", "port": broker.port}, fps=30)
        proc = start_run(config, tmp_path)
        try:
            # Kill the broker while the run is frozen with every logged line delivered, so no
            # line is lost inside a dying broker (a broker crash loses what it holds: that is
            # the broker's durability, not ours).
            while True:
                watcher.wait_for(
                    lambda: len(received_events(watcher)) == len(event_lines(log)) > 0,
                    timeout=60,
                    what="the watcher to have every logged line",
                )
                size = log.stat().st_size
                proc.send_signal(signal.SIGSTOP)
                if log.stat().st_size == size and len(received_events(watcher)) == len(
                    event_lines(log)
                ):
                    break
                proc.send_signal(signal.SIGCONT)
            before_outage = len(event_lines(log))
            broker.kill()
            proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 60
            while len(event_lines(log)) < before_outage + 2:  # lines made during the outage
                assert proc.poll() is None, "the run ended before the outage made events"
                assert time.monotonic() < deadline, "no events during the outage"
                time.sleep(0.05)
            broker.start()
            out, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        lines = event_lines(log)
        watcher.wait_for(
            lambda: len(received_events(watcher)) >= len(lines), what="every logged line"
        )
    assert received_events(watcher) == lines
    assert len(lines) > before_outage
    assert ", 1 reconnects" in mqtt_summary(out) and ", 0 dropped," in mqtt_summary(out)
    assert "mqtt: lost the connection to 127.0.0.1" in err
    assert "mqtt: reconnected to 127.0.0.1" in err


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_a_wrong_password_is_reported_refused_the_run_goes_on_and_the_password_never_shows(
    tmp_path: Path, mosquitto: Callable[..., Mosquitto]
) -> None:
    broker = mosquitto(users={"streamdet": "the-right-one"})
    mqtt = {"host": "127.0.0.1", "port": broker.port, "user": "streamdet"}
    mqtt["password"] = "${MQTT_PASSWORD}"
    out, err = finish(start_run(demo_config(tmp_path, mqtt), tmp_path, MQTT_PASSWORD=PASSWORD))

    assert event_lines(tmp_path / "events.jsonl")
    assert "refused (Not authorized), 0 published" in mqtt_summary(out)
    assert "mqtt: 127.0.0.1" in err and "refused the connection (Not authorized)" in err
    for text in (out, err, (tmp_path / "events.jsonl").read_text(), broker.log_text()):
        assert PASSWORD not in text


@pytest.mark.parametrize(
    ("mqtt", "message"),
    [
        ({"user": "streamdet"}, "user and password go together"),
        ({"password": PASSWORD}, "user and password go together"),
        ({"port": 0}, "sinks.mqtt.port"),
        ({"port": 70000}, "sinks.mqtt.port"),
        ({"qos": 3}, "sinks.mqtt.qos"),
    ],
    ids=["user-without-password", "password-without-user", "port-0", "port-70000", "qos-3"],
)
def test_a_bad_mqtt_section_is_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mqtt: dict[str, Any], message: str
) -> None:
    config = demo_config(tmp_path, {"host": "127.0.0.1", **mqtt})

    assert main(["run", str(config)]) == 2

    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert PASSWORD not in out + err
