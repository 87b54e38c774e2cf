"""A real HTTP server on 127.0.0.1 that receives webhooks, checks their signatures with its own
code (written from the Standard Webhooks spec, not streamdet's), and answers as a test scripts.
"""

from __future__ import annotations

import base64
import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_S = 5 * 60  # the spec's advice: reject a timestamp further than this from now


@dataclass(frozen=True)
class Reply:
    """How to answer one request: a status and headers, or hang until the test ends."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float  # monotonic
    signature_ok: bool | None  # None: no key to check with


def verify_signature(key: bytes, headers: dict[str, str], body: bytes, now: float) -> bool:
    """Standard Webhooks verification: HMAC-SHA256 of ``id.timestamp.body``, base64, compared in
    constant time with each ``v1,`` entry of the space-separated header; timestamp fresh."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures) or not timestamp.isdigit():
        return False
    if abs(now - int(timestamp)) > TOLERANCE_S:
        return False
    digest = hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + body, "sha256")
    expected = base64.b64encode(digest.digest())
    for entry in signatures.split(" "):
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return True
    return False


def key_of(secret: str) -> bytes:
    """The spec's secret serialization: ``whsec_`` then the key in base64."""
    assert secret.startswith("whsec_")
    return base64.b64decode(secret[len("whsec_") :])


class Receiver:
    """Records every POST; each path answers with its scripted replies in turn (the last one
    repeats; 200 for a path with none).

    Args:
        key: the HMAC key signatures are checked with (None: not checked).
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.scripts: dict[str, list[Reply]] = {}
        self.release = threading.Event()  # ends every hanging reply
        self._cond = threading.Condition()  # protects received and _served
        self.received: list[Received] = []
        self._served: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
                receiver._handle(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str, userinfo: str = "") -> str:
        host, port = self.server.server_address[:2]
        return f"http://{userinfo}{host}:{port}{path}"

    def script(self, path: str, *replies: Reply) -> None:
        self.scripts[path] = list(replies)

    def on(self, path: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.path.split("?")[0] == path]

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` (checked at every request and every 0.1 s) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        path = handler.path.split("?")[0]
        ok = None if self.key is None else verify_signature(self.key, headers, body, time.time())
        with self._cond:
            n = self._served.get(path, 0)
            self._served[path] = n + 1
            self.received.append(Received(handler.path, headers, body, time.monotonic(), ok))
            self._cond.notify_all()
        replies = self.scripts.get(path) or [Reply()]
        reply = replies[min(n, len(replies) - 1)]
        if reply.hang:
            self.release.wait(120)
            return
        handler.send_response(reply.status)
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.send_header("content-length", "0")
        handler.end_headers()

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
