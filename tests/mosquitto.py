"""A real Mosquitto broker for the tests: Debian's ``/usr/sbin/mosquitto`` on a free 127.0.0.1
port, its config, password file and log in a tmp dir, stopped or killed by its pid, restartable
on the same port; optionally a TLS listener (:class:`BrokerTls`). ``.ci/install-system.sh``
installs the ``mosquitto`` package.

And :class:`Watcher`, a paho subscriber that records what it receives, with waits on conditions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class BrokerTls:
    """The broker's TLS listener: its CA (checks client certificates), its certificate and key
    (PEM files); ``require_certificate``: clients must present a certificate signed by the CA."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False

    def config_lines(self) -> list[str]:
        return [
            f"cafile {self.cafile}",
            f"certfile {self.certfile}",
            f"keyfile {self.keyfile}",
            f"require_certificate {'true' if self.require_certificate else 'false'}",
        ]


class Mosquitto:
    """One broker process, restartable on the same port.

    Args:
        folder: where its config, password file, persistence and log go.
        users: ``{user: password}``; when given, anonymous clients are refused.
        port: the port to listen on (default: a free one).
        persistence: keep sessions and retained messages in ``folder`` across restarts
            (written at a clean stop, or on :meth:`save`).
        tls: listen with TLS only (plain TCP when None).
    """

    def __init__(
        self,
        folder: Path,
        *,
        users: dict[str, str] | None = None,
        persistence: bool = False,
        port: int | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.users = users
        self.persistence = persistence
        self.tls = tls
        self.log_path = folder / "mosquitto.log"
        self.db_path = folder / "mosquitto.db"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.folder / "mosquitto.conf"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "user root" if os.geteuid() == 0 else "",  # as root: do not drop to 'mosquitto'
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.folder}/",
            "log_dest stderr",
            "log_type all",
            *(self.tls.config_lines() if self.tls is not None else []),
        ]
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            passwords = self.folder / "passwords"
            passwords.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            passwords.chmod(0o600)
            subprocess.run(  # hashes the file in place: no password on a command line
                [MOSQUITTO_PASSWD, "-U", str(passwords)], check=True, capture_output=True
            )
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        self.config_path.write_text("\n".join(line for line in lines if line) + "\n")

    def start(self) -> None:
        """Start it and wait until it accepts connections."""
        self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config_path)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not start; log:\n{self.log_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes, as in a crash (nothing saved, no will sent)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM (killing it if it lingers)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            self.proc = None
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop()
        self.start()

    def set_users(self, users: dict[str, str]) -> None:
        """Replace the password file and have the running broker reload it (SIGHUP)."""
        assert self.proc is not None and self.users is not None
        self.users = users
        self._write_config()
        mark = len(self.log_text())
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Reloading config" not in self.log_text()[mark:]:
            assert time.monotonic() < deadline, "mosquitto did not reload its config"
            time.sleep(0.02)

    def save(self) -> None:
        """Write the persistence database now (SIGUSR1) and wait until it is on disk."""
        assert self.proc is not None and self.persistence
        before = self.db_path.stat().st_mtime_ns if self.db_path.exists() else None
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.db_path.exists() and self.db_path.stat().st_mtime_ns != before):
            assert time.monotonic() < deadline, "mosquitto did not save its database"
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    dup: bool

    @property
    def text(self) -> str:
        return self.payload.decode()

    def json(self) -> Any:
        return json.loads(self.payload)


class Watcher:
    """A paho subscriber recording every message it gets (thread-safe), with condition waits.

    Args:
        port: the broker's port on 127.0.0.1.
        topics: filters subscribed to (QoS 1) on every connect.
        client_id / clean_session: a fixed id with ``clean_session=False`` keeps a session on
            the broker, which queues QoS 1 messages while the watcher is away.
        tls: keyword arguments of paho's ``tls_set`` (``ca_certs``, ``certfile``, ...), for a
            broker listening with TLS.
    """

    def __init__(
        self,
        port: int,
        topics: list[str],
        *,
        client_id: str = "",
        clean_session: bool = True,
        user: str | None = None,
        password: str | None = None,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.port = port
        self.topics = topics
        self._cond = threading.Condition()  # protects messages and subscribed
        self.messages: list[Received] = []
        self.subscribed = 0  # SUBACKs received (one per connect)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls is not None:
            self.client.tls_set(**tls)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def __enter__(self) -> Watcher:
        self.client.connect_async("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        self.wait_for(lambda: self.subscribed >= 1, what="the watcher's subscription")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self.subscribed += 1
            self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(
                Received(message.topic, bytes(message.payload), message.retain, message.dup)
            )
            self._cond.notify_all()

    def on(self, topic: str) -> list[Received]:
        """Messages received on ``topic``, in order."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> str | None:
        got = self.on(topic)
        return got[-1].text if got else None

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def wait_for(
        self, condition: Callable[[], bool], *, timeout: float = 30.0, what: str = "a message"
    ) -> None:
        """Wait until ``condition()`` (called under the lock) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [(m.topic, m.payload[:80]) for m in self.messages[-20:]]
                    raise AssertionError(f"timed out waiting for {what}; last received: {got}")
                self._cond.wait(remaining)

    def wait_for_text(self, topic: str, text: str, timeout: float = 30.0) -> None:
        self.wait_for(
            lambda: any(m.topic == topic and m.text == text for m in self.messages),
            timeout=timeout,
            what=f"{text!r} on {topic}",
        )
