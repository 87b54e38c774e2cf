"""The HTTP server of the web output: routes, the token, limits and a stop that never hangs.

Why the standard library's ``ThreadingHTTPServer``, not aiohttp or an ASGI server (uvicorn):

- streamdet is a threaded program (capture, inference and output threads sharing one stop
  event). A thread per connection fits it: a live stream is a loop that waits on a
  ``threading.Condition`` for the next frame the output's thread encoded, with no event loop
  to hand frames into (``call_soon_threadsafe``) and none to keep from blocking.
- Clean shutdown from another thread: ``shutdown()`` ends the accept loop, and closing the
  sockets of the connections still open (``socket.shutdown``) ends every stream at once, a
  viewer that never reads included. uvicorn waits for open streaming responses at shutdown
  unless given a graceful-shutdown timeout (Kludex/uvicorn#451, and PR #2829 of 2026 that
  finally sends them ``http.disconnect``); aiohttp's ``run_app`` installs signal handlers,
  which fail off the main thread (aio-libs/aiohttp#2265, #6783).
- Many long-lived streams: each costs a thread that sleeps on a condition, and their number is
  bounded (``max_clients`` streams, :data:`MAX_CONNECTIONS` connections in all); the page uses
  one connection for every camera (``/api/live``), so a browser's six connections per host
  are never the limit. Measured in benchmarks/RESULTS.md ('Web page viewers').
- Nothing to install: aiohttp and uvicorn are not dependencies of streamdet.

Security: the token (``web.token``) is compared in constant time (``hmac.compare_digest``);
it comes as ``Authorization: Bearer <token>``, as ``?token=`` (for a video player's URL), or as
the cookie the page gets when opened once with ``/?token=...`` (then redirected to ``/`` so the
token leaves the address bar). ``web.public`` exempts ``healthz``, ``readyz`` and ``metrics``.
Ids and names in URLs are checked against what the run knows and never reach the file system;
there is no CORS header (no other site's page may read the API); without a token on a
loopback address, a request naming another host is refused (DNS rebinding); every answer says
``nosniff`` and ``no-store``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.cookies
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from streamdet.errors import StreamdetError
from streamdet.web.api import ClipState, EventStore, QueryError, parse_event_query, valid_id
from streamdet.web.live import LiveFrame, LiveFrames
from streamdet.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from streamdet.web.metrics import Metrics

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512  # connections open at once; past it a new one gets 503 and is closed
IDLE_TIMEOUT_S = 10.0  # a connection that sends nothing (or reads nothing) this long is closed
STREAM_WRITE_TIMEOUT_S = 5.0  # a stream viewer that takes no bytes this long is dropped
KEEPALIVE_S = 10.0  # an MJPEG stream of a silent source repeats its last frame this often
STOP_TIMEOUT_S = 1.0  # for the connections to close once their sockets are shut
LIVE_EVENTS_BATCH = 50  # event changes per message of /api/live
FILE_CHUNK = 64 * 1024
COOKIE = "streamdet_session"
_BOUNDARY = "streamdetframe"


@dataclass(frozen=True)
class WebView:
    """What the server shows, from the web output (each callable is safe from any thread).

    Attributes:
        sources: every source's name.
        store: the recent events.
        live: the newest frame of each source.
        metrics: the Prometheus registry.
        sources_json: ``/api/sources``.
        stats_json: ``/api/stats``.
        liveness: (alive, details) for ``/healthz``.
        readiness: (ready, details) for ``/readyz``.
        media_file: the file of a media path from an event line, or None when it is not a
            readable file.
        page: the page's HTML.
    """

    sources: frozenset[str]
    store: EventStore
    live: LiveFrames
    metrics: Metrics
    sources_json: Callable[[], list[dict[str, Any]]]
    stats_json: Callable[[], dict[str, Any]]
    liveness: Callable[[], tuple[bool, dict[str, Any]]]
    readiness: Callable[[], tuple[bool, dict[str, Any]]]
    media_file: Callable[[str], Path | None]
    page: bytes
    stale_after_s: float = 2.0


def is_loopback(host: str) -> bool:
    """``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, auth: str | None) -> None:
    """Refuse to serve an open page on the network.

    Raises:
        StreamdetError: ``host`` is not loopback and there is no token, unless ``auth`` is
            ``"none"``; or ``auth`` is ``"token"`` with no token.
    """
    if auth == "token" and not token:
        raise StreamdetError("web.auth is 'token' but web.token is not set: set web.token")
    if not token and auth != "none" and not is_loopback(host):
        raise StreamdetError(
            f"web.host {host} is not a loopback address and web.token is not set: set "
            "web.token (or web.auth: none to serve the page without one on your network)"
        )


class _Slots:
    """A count of live streams, bounded by ``max_clients``; never waits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # protects used
        self.used = 0

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.used -= 1


class WebServer(ThreadingHTTPServer):
    """Binds at once (a port in use is a StreamdetError before the run starts); serves on its
    own thread from :meth:`start`; :meth:`stop` ends every connection within about a second.

    Args:
        host: address to bind.
        port: port (0: any free one; see :attr:`port`).
        view: what the server shows.
        token: the token every request needs (None: none), except ``public`` endpoints.
        public: endpoints answered without the token (``healthz``, ``readyz``, ``metrics``).
        max_clients: live streams at once.
    """

    daemon_threads = True
    block_on_close = False  # stop() closes the connections itself, with a deadline
    request_queue_size = 128  # a burst of connections waits in the backlog, not refused
    allow_reuse_address = True

    def __init__(
        self,
        host: str,
        port: int,
        view: WebView,
        *,
        token: str | None = None,
        public: frozenset[str] = frozenset(),
        max_clients: int = 20,
    ) -> None:
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        self.view = view
        self.token = token
        self.session = _session_of(token) if token else None
        self.public = public
        self.loopback = is_loopback(host)
        self.slots = _Slots(max_clients)
        self.stopping = threading.Event()
        # The condition's lock protects the set of connections open.
        self._conns_cond = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        try:
            super().__init__((host.strip("[]"), port), _Handler)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise StreamdetError(f"web: cannot listen on {host}:{port} ({why})") from None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="web", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop accepting, end every stream and close every connection; True when all closed
        within ``timeout`` seconds (a handler still busy is left to end with the process)."""
        self.stopping.set()
        self.view.live.close()
        if self._thread is not None:
            self.shutdown()  # returns once serve_forever has (it polls every 0.1 s)
            self._thread.join(timeout)
        self.server_close()
        with self._conns_cond:
            for conn in self._connections:
                try:  # wakes a handler blocked in a send or a recv on it
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            deadline = time.monotonic() + timeout
            while self._connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "web: %d connection(s) still open after stop", len(self._connections)
                    )
                    return False
                self._conns_cond.wait(remaining)
        return True

    @property
    def connections(self) -> int:
        with self._conns_cond:
            return len(self._connections)

    # -- socketserver hooks (serving thread, then each connection's thread) ------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_cond:
            refuse = self.stopping.is_set() or len(self._connections) >= MAX_CONNECTIONS
            if not refuse:
                self._connections.add(request)
        if refuse:
            _refuse(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_cond:
            self._connections.discard(request)
            self._conns_cond.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web: a request failed", exc_info=True)


def _refuse(request: socket.socket) -> None:
    """Answer 503 without waiting for the client, and close (too many connections)."""
    try:
        request.setblocking(False)
        request.send(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
            b"Retry-After: 5\r\nConnection: close\r\n\r\n"
        )
    except OSError:
        pass
    finally:
        request.close()


def _session_of(token: str) -> str:
    """The page's cookie value: a hash of the token, so the cookie never holds the token."""
    return hashlib.sha256(b"streamdet-web-session\0" + token.encode()).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests (its own thread)."""

    server: WebServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page's requests share connections
    timeout = IDLE_TIMEOUT_S

    def version_string(self) -> str:
        return "streamdet"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("web: %s %s", self.address_string(), format % args)

    # -- routing ---------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        split = urllib.parse.urlsplit(self.path)
        try:
            query = urllib.parse.parse_qs(split.query, keep_blank_values=True, max_num_fields=32)
        except ValueError:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "too many query parameters"})
            return
        parts = [urllib.parse.unquote(p) for p in split.path.split("/") if p]
        route = self._route(parts)
        if route is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        endpoint, handler = route
        if not self._host_allowed():
            self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "unexpected Host header"})
            return
        if not self._authorized(endpoint, query):
            self._unauthorized(endpoint)
            return
        if endpoint == "page" and self.server.token and "token" in query:
            self._enter_page()
            return
        handler(query)

    def _route(self, p: list[str]) -> tuple[str, Callable[[dict[str, list[str]]], None]] | None:
        """(endpoint, handler) of a path split at ``/`` (ids and names checked later)."""
        fixed: dict[tuple[str, ...], tuple[str, Callable[[dict[str, list[str]]], None]]] = {
            (): ("page", self._page),
            ("healthz",): ("healthz", self._healthz),
            ("readyz",): ("readyz", self._readyz),
            ("metrics",): ("metrics", self._metrics),
            ("api", "events"): ("api", self._events),
            ("api", "sources"): ("api", self._sources),
            ("api", "stats"): ("api", self._stats),
            ("api", "live"): ("api", self._live),
        }
        if tuple(p) in fixed:
            return fixed[tuple(p)]
        if len(p) == 3 and p[:2] == ["api", "events"]:
            return "api", lambda q: self._event(p[2])
        if len(p) == 4 and p[:2] == ["api", "events"] and p[3] in ("snapshot.jpg", "clip.mp4"):
            return "api", lambda q: self._media(p[2], p[3])
        if len(p) == 4 and p[:2] == ["api", "sources"] and p[3] == "latest.jpg":
            return "api", lambda q: self._latest(p[2])
        if len(p) == 4 and p[:2] == ["api", "sources"] and p[3] == "stream.mjpeg":
            return "api", lambda q: self._mjpeg(p[2])
        return None

    # -- auth ------------------------------------------------------------------------------

    def _host_allowed(self) -> bool:
        """A page served without a token on a loopback address answers only requests for a
        loopback name: a web site whose name was re-pointed at 127.0.0.1 (DNS rebinding) gets
        nothing from it."""
        if self.server.token is not None or not self.server.loopback:
            return True
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name.strip("[]")) if name else True

    def _authorized(self, endpoint: str, query: Mapping[str, list[str]]) -> bool:
        token = self.server.token
        if token is None or endpoint in self.server.public:
            return True
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer " and _same(auth[7:].strip(), token):
            return True
        given = query.get("token")
        if given and _same(given[0], token):
            return True
        cookie = self._cookie()
        return (
            cookie is not None
            and self.server.session is not None
            and _same(cookie, self.server.session)
        )

    def _cookie(self) -> str | None:
        try:
            jar = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return None
        morsel = jar.get(COOKIE)
        return morsel.value if morsel is not None else None

    def _unauthorized(self, endpoint: str) -> None:
        if endpoint == "page":
            body = (
                b"<!doctype html><title>streamdet</title><p>This page needs the token: open "
                b"<code>/?token=YOUR_TOKEN</code> once (web.token in the config).</p>"
            )
            self._send(HTTPStatus.UNAUTHORIZED, body, "text/html; charset=utf-8")
            return
        self._json(
            HTTPStatus.UNAUTHORIZED,
            {"error": "a valid token is needed: Authorization: Bearer <token>"},
            {"WWW-Authenticate": 'Bearer realm="streamdet"'},
        )

    def _enter_page(self) -> None:
        """The page opened with ``?token=``: a session cookie, and the token out of the URL."""
        cookie = f"{COOKIE}={self.server.session}; Path=/; HttpOnly; SameSite=Strict"
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})

    # -- answers -----------------------------------------------------------------------------

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self._common_headers(headers)
        self.end_headers()
        self.wfile.write(body)

    def _common_headers(self, headers: Mapping[str, str] | None = None) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (headers or {}).items():
            self.send_header(name, value)

    def _json(self, status: HTTPStatus, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json", headers)

    def _page(self, query: Mapping[str, list[str]]) -> None:
        csp = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
        )
        self._send(
            HTTPStatus.OK,
            self.server.view.page,
            "text/html; charset=utf-8",
            {"Content-Security-Policy": csp, "X-Frame-Options": "DENY"},
        )

    def _healthz(self, query: Mapping[str, list[str]]) -> None:
        alive, details = self.server.view.liveness()
        self._json(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, details)

    def _readyz(self, query: Mapping[str, list[str]]) -> None:
        ready, details = self.server.view.readiness()
        self._json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, details)

    def _metrics(self, query: Mapping[str, list[str]]) -> None:
        self._send(HTTPStatus.OK, self.server.view.metrics.exposition(), METRICS_CONTENT_TYPE)

    def _events(self, query: Mapping[str, list[str]]) -> None:
        try:
            q = parse_event_query(query)
        except QueryError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        store, now = self.server.view.store, time.time()
        self._json(HTTPStatus.OK, {"events": [store.to_json(e, now) for e in store.query(q)]})

    def _event(self, event_id: str) -> None:
        store = self.server.view.store
        record = store.get(event_id) if valid_id(event_id) else None
        if record is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "no such event"})
            return
        self._json(HTTPStatus.OK, store.to_json(record, time.time()))

    def _media(self, event_id: str, what: str) -> None:
        store = self.server.view.store
        record = store.get(event_id) if valid_id(event_id) else None
        if record is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "no such event"})
            return
        if what == "clip.mp4":
            state = store.clip_state(record, time.time())
            if state is ClipState.RECORDING:
                self._json(HTTPStatus.ACCEPTED, {"status": "recording"}, {"Retry-After": "2"})
                return
            path, content_type = record.clip, "video/mp4"
        else:
            path, content_type = record.snapshot, "image/jpeg"
        file = self.server.view.media_file(path) if path else None
        if file is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"event has no {what.split('.')[0]}"})
            return
        self._file(file, content_type)

    def _file(self, file: Path, content_type: str) -> None:
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(size))
                self._common_headers()
                self.end_headers()
                left = size
                while left > 0 and (chunk := f.read(min(FILE_CHUNK, left))):
                    self.wfile.write(chunk)
                    left -= len(chunk)
        except FileNotFoundError:  # removed (retention) between the check and the open
            self._json(HTTPStatus.NOT_FOUND, {"error": "media file is gone"})

    def _sources(self, query: Mapping[str, list[str]]) -> None:
        self._json(HTTPStatus.OK, {"sources": self.server.view.sources_json()})

    def _stats(self, query: Mapping[str, list[str]]) -> None:
        self._json(HTTPStatus.OK, self.server.view.stats_json())

    def _latest(self, name: str) -> None:
        view = self.server.view
        if name not in view.sources:
            self._json(HTTPStatus.NOT_FOUND, {"error": "no such source"})
            return
        frame = view.live.latest(name)
        if frame is None:
            self._json(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no frame yet"}, {"Retry-After": "1"}
            )
            return
        age = max(0.0, time.time() - frame.wall_time)
        headers = {
            "X-Frame-Time": f"{frame.wall_time:.3f}",
            "X-Frame-Age": f"{age:.3f}",
            "X-Frame-Stale": "1" if age > view.stale_after_s else "0",
        }
        self._send(HTTPStatus.OK, frame.jpeg, "image/jpeg", headers)

    # -- streams -----------------------------------------------------------------------------

    def _stream_start(self, content_type: str) -> bool:
        """Take a stream slot and send the headers; False (503 sent) when none is free."""
        if not self.server.slots.take():
            self._json(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": f"too many live viewers (web.max_clients: {self.server.slots.limit})"},
                {"Retry-After": "5"},
            )
            return False
        self.close_connection = True
        self.connection.settimeout(STREAM_WRITE_TIMEOUT_S)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "close")
        self._common_headers()
        self.end_headers()
        return True

    def _streaming(self) -> bool:
        return not self.server.stopping.is_set()

    def _mjpeg(self, name: str) -> None:
        """``multipart/x-mixed-replace`` of one source's live frames, at most mjpeg_fps."""
        view = self.server.view
        if name not in view.sources:
            self._json(HTTPStatus.NOT_FOUND, {"error": "no such source"})
            return
        if not self._stream_start(f"multipart/x-mixed-replace; boundary={_BOUNDARY}"):
            return
        try:
            seq, version, sent = 0, 0, time.monotonic()
            while self._streaming():
                frames = view.live.newer(seq, (name,))
                if not frames and time.monotonic() - sent >= KEEPALIVE_S:
                    # The source is silent: send its last frame again, which also finds out
                    # a viewer that left, freeing its slot.
                    frames = [f] if (f := view.live.latest(name)) is not None else []
                for frame in frames:
                    head = (
                        f"--{_BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(frame.jpeg)}\r\n\r\n"
                    )
                    self.wfile.write(head.encode() + frame.jpeg + b"\r\n")
                    seq, sent = frame.seq, time.monotonic()
                version = view.live.wait(version, 1.0)
        except OSError:  # the viewer left, is too slow, or the server is stopping
            pass
        finally:
            self.server.slots.give()

    def _live(self, query: Mapping[str, list[str]]) -> None:
        """Server-sent events: every source's frames, event changes and figures, on one
        connection (the page's grid; a browser allows six connections per host)."""
        if not self._stream_start("text/event-stream"):
            return
        view = self.server.view
        try:
            seq, version, rev = 0, 0, 0
            self._sse("sources", view.sources_json())
            last_sources = time.monotonic()
            while self._streaming():
                for frame in view.live.newer(seq):
                    self._sse("frame", _frame_json(frame))
                    seq = max(seq, frame.seq)
                changed, rev = view.store.changed_since(rev, LIVE_EVENTS_BATCH)
                if changed:
                    now = time.time()
                    self._sse("events", [view.store.to_json(e, now) for e in changed])
                if time.monotonic() - last_sources >= 1.0:
                    self._sse("sources", view.sources_json())
                    last_sources = time.monotonic()
                version = view.live.wait(version, 1.0)
        except OSError:
            pass
        finally:
            self.server.slots.give()

    def _sse(self, event: str, data: Any) -> None:
        payload = json.dumps(data, allow_nan=False, separators=(",", ":"))
        self.wfile.write(f"event: {event}\ndata: {payload}\n\n".encode())


def _frame_json(frame: LiveFrame) -> dict[str, Any]:
    return {
        "source": frame.source,
        "seq": frame.seq,
        "time": round(frame.wall_time, 3),
        "jpeg": base64.b64encode(frame.jpeg).decode("ascii"),
    }
