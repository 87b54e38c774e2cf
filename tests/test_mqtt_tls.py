"""The MQTT output over TLS, against a real Mosquitto broker with a TLS listener and a real paho
subscriber: certificates from a throwaway CA made with ``/usr/bin/openssl`` (EC P-256, fast).

What ``sinks.mqtt.tls`` promises: the broker's chain is checked against ``ca_certs`` and its
name against ``host``; ``insecure`` skips the name check only (paho's ``tls_insecure_set``),
never the chain; ``certfile``/``keyfile`` answer a broker that requires client certificates;
a file that cannot be loaded is one ``error:`` line before the model is built.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mosquitto import BrokerTls, Mosquitto, Watcher
from test_mqtt import LABELS, change, wait_progress
from test_mqtt_run import demo_config, event_lines, finish, mqtt_summary, start_run

from streamdet import runner
from streamdet.cli import main
from streamdet.config import MqttConfig, MqttTlsConfig
from streamdet.sinks import mqtt as mqtt_module
from streamdet.sinks.mqtt import MqttSink

OPENSSL = "/usr/bin/openssl"
SERVER_NAMES = "IP:127.0.0.1,DNS:localhost"
# The broker refuses, or the handshake fails, within one connect attempt; the sink's link says
# so by then. A few attempts at the fast backoff below fit in this.
FAILED_BY_S = 20.0

pytestmark = pytest.mark.skipif(not os.access(OPENSSL, os.X_OK), reason=f"needs {OPENSSL}")


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its key."""

    cert: Path
    key: Path


def openssl(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=30)


def new_ca(folder: Path, name: str) -> KeyPair:
    """A self-signed CA, valid for a day."""
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    openssl(
        "req", "-x509", "-new", "-nodes", "-days", "1", "-subj", f"/CN={name}",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", pair.key, "-out", pair.cert,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def issue(folder: Path, name: str, ca: KeyPair, alt_names: str) -> KeyPair:
    """A leaf certificate ``name`` signed by ``ca`` for ``alt_names`` (``IP:..,DNS:..``)."""
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    csr, extensions = folder / f"{name}.csr", folder / f"{name}.ext"
    extensions.write_text(
        f"basicConstraints=CA:FALSE\nsubjectAltName={alt_names}\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    openssl(
        "req", "-new", "-nodes", "-subj", f"/CN={name}",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", pair.key, "-out", csr,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-days", "1", "-extfile", extensions, "-out", pair.cert,
    )  # fmt: skip
    return pair


@dataclass(frozen=True)
class Pki:
    """The certificates of these tests: ``ca`` is the one the sink trusts, ``rogue_ca`` another
    one; ``server`` is right for 127.0.0.1, ``other_name`` is for another host, ``rogue_server``
    is right for 127.0.0.1 but signed by the rogue CA; ``client`` and ``rogue_client`` are
    client certificates of each CA."""

    ca: KeyPair
    rogue_ca: KeyPair
    server: KeyPair
    other_name: KeyPair
    rogue_server: KeyPair
    client: KeyPair
    rogue_client: KeyPair
    encrypted_client_key: Path  # the client's key, with a password


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = new_ca(folder, "ca"), new_ca(folder, "rogue-ca")
    client = issue(folder, "client", ca, "DNS:streamdet-client")
    encrypted = folder / "client-encrypted.key"
    openssl("pkey", "-in", client.key, "-aes256", "-passout", "pass:x", "-out", encrypted)
    return Pki(
        ca=ca,
        rogue_ca=rogue_ca,
        server=issue(folder, "server", ca, SERVER_NAMES),
        other_name=issue(folder, "other-name", ca, "DNS:broker.example.invalid"),
        rogue_server=issue(folder, "rogue-server", rogue_ca, SERVER_NAMES),
        client=client,
        rogue_client=issue(folder, "rogue-client", rogue_ca, "DNS:streamdet-client"),
        encrypted_client_key=encrypted,
    )


def broker_tls(pki: Pki, server: KeyPair, *, require_certificate: bool = False) -> BrokerTls:
    return BrokerTls(pki.ca.cert, server.cert, server.key, require_certificate)


def watcher_tls(pki: Pki) -> dict[str, Any]:
    """The subscriber's TLS: our CA, and our client certificate (for a broker requiring one)."""
    return {"ca_certs": str(pki.ca.cert), "certfile": str(pki.client.cert),
            "keyfile": str(pki.client.key)}  # fmt: skip


@pytest.fixture(autouse=True)
def fast_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry within half a second, not 1 to 30 s (the backoff is the same mechanism)."""
    monkeypatch.setattr(mqtt_module, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(mqtt_module, "RECONNECT_MAX_S", 0.5)


@pytest.fixture
def sinks() -> Iterator[Callable[..., MqttSink]]:
    """Factory of MqttSinks on 127.0.0.1 (``port``, ``tls`` as MqttTlsConfig's fields); every
    one is closed after the test."""
    made: list[MqttSink] = []

    def make(port: int, **tls: Any) -> MqttSink:
        cfg = MqttConfig(
            host="127.0.0.1",
            port=port,
            client_id=f"tls-test-{len(made)}",
            tls=MqttTlsConfig(**tls),
            ha_discovery=False,
        )
        sink = MqttSink(
            cfg, sources=["cam"], labels=LABELS, run_id="r1", model={"name": "m", "sha256": "0"}
        )
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def seqs(watcher: Watcher) -> list[int]:
    """The ``seq`` of every event message received, QoS 1 redeliveries removed."""
    seen: list[int] = []
    for message in watcher.on("streamdet/events"):
        if (seq := message.json()["after"]["seq"]) not in seen:
            seen.append(seq)
    return seen


def assert_delivers(sink: MqttSink, watcher: Watcher, first: int) -> None:
    """Events ``first`` and ``first + 1`` reach the subscriber; the sink says connected."""
    sink.on_event(change(first))
    sink.on_event(change(first + 1))
    watcher.wait_for(lambda: first + 1 in seqs(watcher), what=f"event {first + 1}")
    wait_progress(sink, "connected")


def assert_not_connected(
    sink: MqttSink,
    broker: Mosquitto,
    caplog: pytest.LogCaptureFixture,
    *,
    events: int,
    cause: str,
) -> None:
    """The sink tried, failed, said why in one warning, keeps ``events`` queued and tries again
    (its network thread lives on) without saying it again."""
    wait_progress(sink, "disconnected", timeout=FAILED_BY_S)
    deadline = time.monotonic() + FAILED_BY_S
    # One line per attempt ("New connection from 127.0.0.1:port" or "Client connection from
    # 127.0.0.1 failed: ..."): the start's probe, then the sink's first two.
    while len(re.findall(r"connection from 127\.0\.0\.1", broker.log_text())) < 3:
        assert time.monotonic() < deadline, f"the sink did not try again:\n{broker.log_text()}"
        time.sleep(0.05)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and cause in warnings[0], warnings
    assert sink.progress_text() == (
        f"disconnected, 0 published, {events} queued, 0 dropped, 0 reconnects"
    )
    assert sink._client._thread is not None and sink._client._thread.is_alive()
    assert "Traceback" not in caplog.text


# -- 1. TLS with ca_certs ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_sink_connects_over_tls_checked_by_ca_certs_and_delivers_events(
    pki: Pki, mosquitto: Callable[..., Mosquitto], sinks: Callable[..., MqttSink]
) -> None:
    broker = mosquitto(tls=broker_tls(pki, pki.server))  # TLS only: no plain listener
    with Watcher(broker.port, ["streamdet/#"], tls=watcher_tls(pki)) as watcher:
        sink = sinks(broker.port, ca_certs=str(pki.ca.cert))
        assert_delivers(sink, watcher, 1)
        watcher.wait_for_text("streamdet/available", "online")
    assert sink.progress_text().startswith("connected, ")


# -- 2. the broker's certificate: chain and name ------------------------------------------------


@pytest.mark.timeout(60)
def test_a_broker_cert_from_another_ca_is_no_connection_events_wait_and_go_out_once_it_is_fixed(
    pki: Pki,
    mosquitto: Callable[..., Mosquitto],
    sinks: Callable[..., MqttSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed handshake is counted like an unreachable broker (a warning naming the cause,
    events queued, retried with backoff); paho's thread survives it, so the broker fixed (the
    right certificate, same port) gets the queued events in order."""
    caplog.set_level(logging.INFO)
    broker = mosquitto(tls=broker_tls(pki, pki.rogue_server), persistence=True)
    # The watcher trusts any certificate, and keeps a session across the restart: the broker
    # holds the events for it even when the sink delivers them before it is back.
    watcher = Watcher(
        broker.port,
        ["streamdet/events"],
        client_id="watcher",
        clean_session=False,
        tls={"cert_reqs": ssl.CERT_NONE},
    )
    with watcher:
        sink = sinks(broker.port, ca_certs=str(pki.ca.cert))
        started = time.monotonic()
        for n in (1, 2, 3):
            sink.on_event(change(n))
        assert time.monotonic() - started < 1.0, "on_event waited for the broker"
        cause = "TLS: certificate verify failed: unable to get local issuer certificate"
        assert_not_connected(sink, broker, caplog, events=3, cause=cause)
        assert not watcher.on("streamdet/events")

        broker.tls = broker_tls(pki, pki.server)
        broker.restart()
        assert_delivers(sink, watcher, 4)
        watcher.wait_for(lambda: len(seqs(watcher)) == 5, what="events 1 to 5")
    assert seqs(watcher) == [1, 2, 3, 4, 5]
    assert re.fullmatch(r"connected, \d+ published, 0 queued, 0 dropped, 0 reconnects",
                        sink.progress_text())  # fmt: skip


@pytest.mark.parametrize(
    ("server", "insecure", "connects", "cause"),
    [
        ("other_name", False, False, "address mismatch, certificate is not valid for"),
        ("other_name", True, True, ""),
        ("rogue_server", True, False, "unable to get local issuer certificate"),
    ],
    ids=["wrong-name", "wrong-name-insecure", "wrong-ca-insecure"],
)
@pytest.mark.timeout(60)
def test_insecure_skips_the_brokers_name_check_but_never_its_chain(
    pki: Pki,
    mosquitto: Callable[..., Mosquitto],
    sinks: Callable[..., MqttSink],
    caplog: pytest.LogCaptureFixture,
    server: str,
    insecure: bool,
    connects: bool,
    cause: str,
) -> None:
    """paho's ``tls_insecure_set`` turns off the hostname check only: a certificate for another
    name is accepted with ``insecure``, one signed by a CA not in ``ca_certs`` never is."""
    caplog.set_level(logging.INFO)
    broker = mosquitto(tls=broker_tls(pki, getattr(pki, server)))
    sink = sinks(broker.port, ca_certs=str(pki.ca.cert), insecure=insecure)
    if connects:
        trusting = {"cert_reqs": ssl.CERT_NONE}  # the watcher sees the wrong name too
        with Watcher(broker.port, ["streamdet/events"], tls=trusting) as watcher:
            assert_delivers(sink, watcher, 1)
    else:
        sink.on_event(change(1))
        assert_not_connected(sink, broker, caplog, events=1, cause=cause)


def test_insecure_is_paho_tls_insecure_set_and_keeps_the_chain_check(pki: Pki) -> None:
    """The client's context: hostname check off, certificate still required."""
    sink = MqttSink(
        MqttConfig(host="127.0.0.1", tls=MqttTlsConfig(ca_certs=str(pki.ca.cert), insecure=True)),
        sources=["cam"],
        labels=LABELS,
        run_id="r1",
        model={"name": "m", "sha256": "0"},
    )
    context = sink._client._ssl_context
    assert context is not None
    assert context.check_hostname is False and context.verify_mode is ssl.CERT_REQUIRED
    sink.close()


# -- 3. mutual TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "connects", "cause"),
    [
        ("client", True, ""),
        (None, False, "alert certificate required"),
        ("rogue_client", False, "alert unknown ca"),
    ],
    ids=["our-client-cert", "no-client-cert", "client-cert-of-another-ca"],
)
@pytest.mark.timeout(60)
def test_a_broker_requiring_client_certificates_takes_ours_and_refuses_none_or_a_foreign_one(
    pki: Pki,
    mosquitto: Callable[..., Mosquitto],
    sinks: Callable[..., MqttSink],
    caplog: pytest.LogCaptureFixture,
    client: str | None,
    connects: bool,
    cause: str,
) -> None:
    """With TLS 1.3 the broker rejects a client certificate after the handshake, so the sink
    sees its alert as a connection dropped before the CONNACK: a warning all the same."""
    caplog.set_level(logging.INFO)
    broker = mosquitto(tls=broker_tls(pki, pki.server, require_certificate=True))
    pair: KeyPair | None = getattr(pki, client) if client else None
    files = {"certfile": str(pair.cert), "keyfile": str(pair.key)} if pair else {}
    sink = sinks(broker.port, ca_certs=str(pki.ca.cert), **files)
    if connects:
        with Watcher(broker.port, ["streamdet/events"], tls=watcher_tls(pki)) as watcher:
            assert_delivers(sink, watcher, 1)
    else:
        sink.on_event(change(1))
        assert_not_connected(sink, broker, caplog, events=1, cause=cause)


# -- 4. TLS files that cannot be loaded ---------------------------------------------------------


def write_not_pem(path: Path) -> Path:
    path.write_text("this is not a certificate\n")
    return path


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        (lambda p, t: {"ca_certs": str(t / "missing-ca.crt")}, r"ca_certs.*missing-ca\.crt"),
        (lambda p, t: {"ca_certs": str(write_not_pem(t / "junk.crt"))}, r"ca_certs.*junk\.crt"),
        (
            lambda p, t: {"certfile": str(t / "missing.crt"), "keyfile": str(p.client.key)},
            r"certfile.*missing\.crt",
        ),
        (
            lambda p, t: {"certfile": str(p.client.cert), "keyfile": str(t / "missing.key")},
            r"keyfile.*missing\.key",
        ),
        (
            lambda p, t: {"certfile": str(p.client.cert), "keyfile": str(p.rogue_client.key)},
            r"certfile.*keyfile",
        ),
        (
            lambda p, t: {"certfile": str(p.client.cert), "keyfile": str(p.encrypted_client_key)},
            r"keyfile.*client-encrypted\.key is encrypted",
        ),
    ],
    ids=[
        "missing-ca",
        "ca-not-pem",
        "missing-cert",
        "missing-key",
        "key-of-another-cert",
        "encrypted-key",
    ],
)
def test_tls_files_that_cannot_be_loaded_are_one_error_line_and_exit_2_before_the_model(
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tls: Callable[[Pki, Path], dict[str, str]],
    message: str,
) -> None:
    models: list[object] = []
    load_model = runner.load_model

    def counting_load_model(cfg: Any) -> Any:
        models.append(cfg)
        return load_model(cfg)

    monkeypatch.setattr(runner, "load_model", counting_load_model)
    mqtt = {"host": "127.0.0.1", "port": 8883, "tls": tls(pki, tmp_path)}
    config = demo_config(tmp_path, mqtt)

    assert main(["run", str(config)]) == 2

    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sinks.mqtt.tls" in errors[0], err
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in err
    assert not models, "the model was built before the TLS files were checked"


# -- detection through `streamdet run` ----------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_run_whose_broker_fails_the_tls_check_detects_as_usual_and_counts_what_it_dropped(
    pki: Pki, tmp_path: Path, mosquitto: Callable[..., Mosquitto]
) -> None:
    broker = mosquitto(tls=broker_tls(pki, pki.rogue_server))
    mqtt = {"host": "127.0.0.1", "port": broker.port, "tls": {"ca_certs": str(pki.ca.cert)}}
    out, err = finish(start_run(demo_config(tmp_path, mqtt), tmp_path))

    lines = event_lines(tmp_path / "events.jsonl")
    assert {"new", "end"} <= {line["type"] for line in lines}
    expected = len(lines) + sum(line["type"] == "new" for line in lines)  # + HA event messages
    assert f": disconnected, 0 published, 0 queued, {expected} dropped, 0 reconnects" in (
        mqtt_summary(out)
    )
    assert "output drops" not in out
    assert "certificate verify failed" in err
    assert "Traceback" not in err
