"""The web output's HTTP API on a real server, fed event, media, frame and stats messages by
hand: filters, 404s, media (202 while a clip is recorded), health, metrics, the token and the
limits on live streams."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from threads import wait_until
from web_helpers import FakeHealth, change, frame, get, make_sink

from streamdet.errors import StreamdetError
from streamdet.sinks.base import (
    EventMessage,
    FrameMessage,
    MediaMessage,
    OutputStats,
    RunStats,
    SourceStats,
)
from streamdet.web import WebSink

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sink() -> Iterator[WebSink]:
    s = make_sink(media={"dir": "unused", "clips": {"post_capture_s": 1.0}})
    yield s
    s.close()


def feed_events(sink: WebSink) -> None:
    """Five events: walks on cam (one ended, one weak), a run on door, and a walk on door that
    started before two others but is seen last (its source lags)."""
    t0 = 1_800_000_000.0
    for c in (
        change("new", 1, start=t0, score=0.9),
        change("end", 1, start=t0, score=0.9, end_reason="score_drop"),
        change("new", 2, source="door", label="run", start=t0 + 10, score=0.7),
        change("new", 3, start=t0 + 20, score=0.55),
        change("new", 4, start=t0 + 30, score=0.95),
        change("new", 5, source="door", start=t0 + 5, score=0.6),
    ):
        sink.on_event(EventMessage(c, None, 12.5))


def ids(r) -> list[str]:
    return [e["id"].rsplit("-", 2)[-1] + ":" + e["label"] for e in r.json()["events"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["4:walk", "3:walk", "2:run", "5:walk", "1:walk"]),  # newest start first
        ("?source=door", ["2:run", "5:walk"]),
        ("?label=walk", ["4:walk", "3:walk", "5:walk", "1:walk"]),
        ("?in_progress=false", ["1:walk"]),
        ("?in_progress=true&source=cam", ["4:walk", "3:walk"]),
        ("?min_score=0.8", ["4:walk", "1:walk"]),
        ("?after=1800000010&before=1800000030", ["3:walk", "2:run"]),
        ("?after=2027-01-15T08:00:10Z", ["4:walk", "3:walk", "2:run"]),
        ("?limit=2", ["4:walk", "3:walk"]),
    ],
)
def test_events_are_filtered_and_newest_first(sink: WebSink, query: str, expected: list[str]):
    feed_events(sink)
    r = get(sink.server.port, "/api/events" + query)
    assert r.status == 200
    assert ids(r) == expected


@pytest.mark.parametrize(
    "query",
    ["?limit=0", "?limit=abc", "?min_score=2", "?after=yesterday", "?in_progress=maybe", "?foo=1"],
)
def test_a_bad_filter_is_a_400_naming_it(sink: WebSink, query: str) -> None:
    r = get(sink.server.port, "/api/events" + query)
    assert r.status == 400
    assert query[1:].split("=")[0] in r.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/events/run1-cam-walk-99",
        "/api/events/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/events/../../etc/passwd",
        "/api/events/%2e%2e/snapshot.jpg",
        "/api/events/run1-cam-walk-1/..%2F..%2Fpasswd",
        "/api/sources/nope/latest.jpg",
        "/api/sources/..%2Fcam/latest.jpg",
        "/api/sources/nope/stream.mjpeg",
        "/etc/passwd",
        "/static/../../etc/passwd",
        "/api/events/run1-cam-walk-1/snapshot.jpg",  # the event has no snapshot
    ],
)
def test_unknown_ids_names_and_traversal_attempts_are_404(sink: WebSink, path: str) -> None:
    feed_events(sink)
    r = get(sink.server.port, path)
    assert r.status == 404, (path, r.body)
    assert b"root:" not in r.body


def test_an_event_by_id_and_its_snapshot_from_a_media_line(sink: WebSink, tmp_path: Path) -> None:
    feed_events(sink)
    jpeg = tmp_path / "snap.jpg"
    cv2.imwrite(str(jpeg), frame(3))
    sink.on_media(MediaMessage({"type": "snapshot", "id": "run1-cam-walk-1", "path": str(jpeg)}))
    r = get(sink.server.port, "/api/events/run1-cam-walk-1")
    assert r.status == 200
    event = r.json()
    assert event["snapshot_url"] == "/api/events/run1-cam-walk-1/snapshot.jpg"
    assert (event["in_progress"], event["end_reason"]) == (False, "score_drop")
    snap = get(sink.server.port, event["snapshot_url"])
    assert snap.status == 200 and snap.headers["Content-Type"] == "image/jpeg"
    assert snap.body == jpeg.read_bytes()


def test_an_end_line_naming_a_snapshot_serves_it(sink: WebSink, tmp_path: Path) -> None:
    jpeg = tmp_path / "end.jpg"
    cv2.imwrite(str(jpeg), frame(5))
    sink.on_event(EventMessage(change("new", 7), None, 10.0))
    line = {"type": "end", "id": "run1-cam-walk-7", "snapshot": {"path": str(jpeg)}}
    sink.on_event(EventMessage(change("end", 7, end_reason="score_drop"), line, None))
    r = get(sink.server.port, "/api/events/run1-cam-walk-7/snapshot.jpg")
    assert r.status == 200 and r.body == jpeg.read_bytes()


def test_a_clip_is_202_while_recording_then_the_file(sink: WebSink, tmp_path: Path) -> None:
    sink.on_event(EventMessage(change("new", 1), None, 10.0))
    port = sink.server.port
    r = get(port, "/api/events/run1-cam-walk-1/clip.mp4")
    assert (r.status, r.json()["status"], r.headers["Retry-After"]) == (202, "recording", "2")
    sink.on_event(EventMessage(change("end", 1, end_reason="score_drop"), None, None))
    assert get(port, "/api/events/run1-cam-walk-1/clip.mp4").status == 202  # post-capture
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 400)
    sink.on_media(MediaMessage({"type": "clip", "id": "run1-cam-walk-1", "path": str(clip)}))
    r = get(port, "/api/events/run1-cam-walk-1/clip.mp4")
    assert (r.status, r.headers["Content-Type"]) == (200, "video/mp4")
    assert r.body == clip.read_bytes()
    assert get(port, "/api/events/run1-cam-walk-1").json()["clip"] == "ready"


def test_without_clips_a_clip_is_404_not_202() -> None:
    sink = make_sink()  # no media section
    try:
        sink.on_event(EventMessage(change("new", 1), None, 10.0))
        assert get(sink.server.port, "/api/events/run1-cam-walk-1/clip.mp4").status == 404
    finally:
        sink.close()


def test_latest_jpeg_is_encoded_annotated_and_says_when_stale(sink: WebSink) -> None:
    port = sink.server.port
    assert get(port, "/api/sources/cam/latest.jpg").status == 503  # no frame yet
    sink.on_frame(FrameMessage("cam", 1, frame(1), 10.0))
    r = get(port, "/api/sources/cam/latest.jpg")
    assert r.status == 200 and r.headers["X-Frame-Stale"] == "0"
    picture = cv2.imdecode(np.frombuffer(r.body, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (240, 320, 3)
    assert not np.array_equal(picture[:20, :100], frame(1)[:20, :100])  # the header is drawn
    with sink.live._cond:  # the frame was captured long ago (a frozen camera)
        f = sink.live._frames["cam"]
        sink.live._frames["cam"] = type(f)(f.source, f.jpeg, f.seq, f.wall_time - 60, f.monotonic)
    r = get(port, "/api/sources/cam/latest.jpg")
    assert r.headers["X-Frame-Stale"] == "1" and float(r.headers["X-Frame-Age"]) >= 59


def test_sources_show_redacted_urls_and_stats_the_run_figures(sink: WebSink) -> None:
    sink.on_stats(
        RunStats(
            {"cam": SourceStats(9.5, 3, 40, 1, 2, "online", 20.0, 35.0)},
            inference_ms_p50=5.0,
            inference_ms_p99=9.0,
            outputs={"web": OutputStats(100, 4, False)},
        )
    )
    sources = get(sink.server.port, "/api/sources").json()["sources"]
    cam = next(s for s in sources if s["name"] == "cam")
    assert cam["url"] == "rtsp://admin:***@10.0.0.0/stream"
    assert (cam["fps"], cam["reconnects"], cam["latency_ms_p99"]) == (9.5, 2, 35.0)
    stats = get(sink.server.port, "/api/stats").json()
    assert stats["sources"]["cam"]["frames_skipped"] == 3
    assert stats["outputs"]["web"] == {"delivered": 100, "dropped": 4, "failed": False}
    assert stats["latency_ms_p50"] is None  # nan: not measured yet


def test_readyz_is_503_with_reasons_until_every_source_is_fresh_and_inference_alive() -> None:
    health = FakeHealth(("cam", "door"))
    sink = make_sink(health=health)
    port = sink.server.port
    try:
        assert get(port, "/readyz").status == 200
        with health.lock:
            health.status["door"] = "offline"
            health.age["cam"] = 30.0  # stall_timeout_s is 5
        r = get(port, "/readyz")
        assert r.status == 503
        why = {name: s.get("why", "") for name, s in r.json()["sources"].items()}
        assert "offline" in why["door"] and "no frame for 30" in why["cam"]
        with health.lock:
            health.status["door"] = "online"
            health.age["cam"] = 0.2
            health.inference_alive = False
        r = get(port, "/readyz")
        assert r.status == 503 and r.json()["inference_alive"] is False
        assert get(port, "/healthz").status == 503
        with health.lock:
            health.inference_alive = True
        assert get(port, "/readyz").status == 200 and get(port, "/healthz").status == 200
    finally:
        sink.close()


def metrics_of(port: int, headers: dict[str, str] | None = None) -> dict[str, dict]:
    r = get(port, "/metrics", headers)
    assert r.status == 200
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_every_series_exists_at_zero_from_the_start_and_counts_events(sink: WebSink) -> None:
    m = metrics_of(sink.server.port)
    for source in ("cam", "door"):
        key = (("source", source),)
        for name in (
            "streamdet_source_up",
            "streamdet_frames_total",
            "streamdet_frames_skipped_total",
            "streamdet_reconnects_total",
            "streamdet_events_open",
            "streamdet_windows_total",
            "streamdet_windows_gated_total",
        ):
            assert name in m and key in m[name], (name, source)
        assert (
            m["streamdet_events_total"][(("label", "run"), ("source", source), ("type", "new"))]
            == 0
        )
    assert m["streamdet_inference_seconds_count"][()] == 0
    assert m["streamdet_event_latency_seconds_count"][()] == 0
    (build,) = m["streamdet_build_info"]
    assert dict(build)["model"] == "tiny" and dict(build)["sha256"] == "ab" * 32
    assert m["streamdet_source_up"][(("source", "cam"),)] == 1  # FakeHealth: online
    feed_events(sink)
    gated = SourceStats(10.0, 0, 40, 0, 0, "online", windows_gated=31)
    sink.on_stats(RunStats({"cam": gated}, outputs={"web": OutputStats(10, 3, False)}))
    m = metrics_of(sink.server.port)
    assert m["streamdet_windows_total"][(("source", "cam"),)] == 40
    assert m["streamdet_windows_gated_total"][(("source", "cam"),)] == 31
    assert m["streamdet_events_total"][(("label", "walk"), ("source", "cam"), ("type", "new"))] == 3
    assert m["streamdet_events_open"][(("source", "cam"),)] == 2
    assert m["streamdet_event_latency_seconds_count"][()] == 5
    assert m["streamdet_output_dropped_total"][(("output", "web"),)] == 3


TOKEN = "s3cret-token"


@pytest.fixture
def locked() -> Iterator[WebSink]:
    s = make_sink(web={"token": TOKEN, "public": ["healthz", "metrics"]})
    yield s
    s.close()


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/api/events", {}, 401),
        ("/api/events", {"Authorization": "Bearer wrong"}, 401),
        ("/api/events", {"Authorization": f"Bearer {TOKEN}x"}, 401),
        ("/api/events?token=wrong", {}, 401),
        ("/api/events", {"Cookie": "streamdet_session=forged"}, 401),
        ("/readyz", {}, 401),  # not made public
        ("/", {}, 401),
        ("/api/events", {"Authorization": f"Bearer {TOKEN}"}, 200),
        ("/api/events?token=" + TOKEN, {}, 200),
        ("/healthz", {}, 200),  # public
        ("/metrics", {}, 200),  # public
    ],
)
def test_the_token_is_needed_except_on_public_endpoints(
    locked: WebSink, path: str, headers: dict[str, str], status: int
) -> None:
    r = get(locked.server.port, path, headers)
    assert r.status == status
    assert TOKEN.encode() not in r.body


def test_the_page_opened_with_the_token_sets_a_cookie_and_drops_the_token_from_the_url(
    locked: WebSink,
) -> None:
    port = locked.server.port
    r = get(port, f"/?token={TOKEN}")
    assert r.status == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = cookie.split(";")[0]
    page = get(port, "/", {"Cookie": session})
    assert page.status == 200 and b"<title>streamdet</title>" in page.body
    assert "Access-Control-Allow-Origin" not in page.headers
    assert get(port, "/api/sources", {"Cookie": session}).status == 200


def test_a_token_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token check goes through hmac.compare_digest (an == leaks the token's prefix)."""
    import hmac

    from streamdet.web import server

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(
        server.hmac, "compare_digest", lambda a, b: (calls.append((a, b)), real(a, b))[1]
    )
    s = make_sink(web={"token": TOKEN})
    try:
        assert get(s.server.port, "/api/events", {"Authorization": "Bearer nope"}).status == 401
        assert get(s.server.port, "/api/events", {"Authorization": f"Bearer {TOKEN}"}).status == 200
    finally:
        s.close()
    assert (b"nope", TOKEN.encode()) in calls and (TOKEN.encode(), TOKEN.encode()) in calls


@pytest.mark.parametrize(
    ("web", "message"),
    [
        ({"host": "0.0.0.0"}, "not a loopback address"),
        ({"host": "::"}, "not a loopback address"),
        ({"host": "192.168.1.5", "auth": "token"}, "web.token is not set"),
    ],
)
def test_a_network_bind_without_a_token_is_refused(web: dict, message: str) -> None:
    with pytest.raises(StreamdetError, match=message):
        make_sink(web=web)


def test_a_network_bind_is_allowed_with_a_token_or_auth_none() -> None:
    for web in ({"host": "0.0.0.0", "token": TOKEN}, {"host": "0.0.0.0", "auth": "none"}):
        make_sink(web=web).close()


def test_a_port_in_use_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StreamdetError, match=f"cannot listen on 127.0.0.1:{port}"):
            make_sink(web={"port": port})


def open_stream(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A raw connection that sent GET ``path``; returns it and the first bytes it got."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock, sock.recv(4096)


def test_streams_beyond_max_clients_get_503_and_a_freed_slot_is_reused() -> None:
    sink = make_sink(web={"max_clients": 2})
    port = sink.server.port
    try:
        sink.on_frame(FrameMessage("cam", 1, frame(1), 10.0))
        a, head_a = open_stream(port, "/api/sources/cam/stream.mjpeg")
        b, head_b = open_stream(port, "/api/live")
        assert head_a.startswith(b"HTTP/1.1 200") and head_b.startswith(b"HTTP/1.1 200")
        third = get(port, "/api/sources/cam/stream.mjpeg")
        assert third.status == 503 and "max_clients" in third.json()["error"]
        assert get(port, "/api/events").status == 200  # other requests still answered
        a.close()
        deadline = time.monotonic() + 20  # the stream notices at its next write
        while sink.server.slots.used > 1 and time.monotonic() < deadline:
            sink.on_frame(FrameMessage("cam", 2, frame(2), 10.0))
            time.sleep(0.2)
        c, head_c = open_stream(port, "/api/sources/cam/stream.mjpeg")
        assert head_c.startswith(b"HTTP/1.1 200")
        b.close()
        c.close()
    finally:
        sink.close()


def read_parts(sock: socket.socket, count: int, deadline: float) -> list[bytes]:
    """The first ``count`` JPEGs of an MJPEG stream."""
    buf, parts = b"", []
    while len(parts) < count and time.monotonic() < deadline:
        buf += sock.recv(65536)
        while (start := buf.find(b"\xff\xd8")) >= 0 and (end := buf.find(b"\xff\xd9", start)) >= 0:
            parts.append(buf[start : end + 2])
            buf = buf[end + 2 :]
    return parts


def test_frames_are_encoded_at_most_mjpeg_fps_and_every_viewer_gets_the_same_bytes() -> None:
    sink = make_sink(web={"mjpeg_fps": 5})
    port = sink.server.port
    published: list[bytes] = []
    put = sink.live.put
    sink.live.put = lambda source, jpeg, *a, **k: (
        published.append(jpeg),
        put(source, jpeg, *a, **k),
    )[1]  # type: ignore[method-assign]
    try:
        sock, _ = open_stream(port, "/api/sources/cam/stream.mjpeg")
        sock2, _ = open_stream(port, "/api/sources/cam/stream.mjpeg")
        started = time.monotonic()
        for i in range(30):  # a burst of frames, as fast as they can be offered
            sink.on_frame(FrameMessage("cam", i, frame(i), 10.0))
        elapsed = time.monotonic() - started
        assert 1 <= sink.frames_encoded <= 2 + elapsed * 5, (sink.frames_encoded, elapsed)
        for i in range(30, 36):
            time.sleep(0.25)
            sink.on_frame(FrameMessage("cam", i, frame(i), 10.0))
        deadline = time.monotonic() + 10
        first, second = read_parts(sock, 4, deadline), read_parts(sock2, 4, deadline)
        assert len(first) >= 4 and len(second) >= 4
        assert set(first) <= set(published) and set(second) <= set(published)
        assert set(first) & set(second)  # the same encoded bytes, not one encoding per viewer
        sock.close()
        sock2.close()
    finally:
        sink.close()


def test_the_page_asks_for_a_frame_only_when_one_is_due() -> None:
    """The capture converts a frame the model skips only if an output wants it: the page wants
    one per 1 / mjpeg_fps s, whether the model uses it or not."""
    sink = make_sink(web={"mjpeg_fps": 2})
    try:
        assert sink.wants_frame("cam", used=False)
        sink.on_frame(FrameMessage("cam", 0, frame(0), 10.0))
        assert not sink.wants_frame("cam", used=False) and not sink.wants_frame("cam", used=True)
        wait_until(lambda: sink.wants_frame("cam", used=False), 10, "frame due again")
    finally:
        sink.close()


def test_stop_ends_within_2_s_with_viewers_connected_one_never_reading() -> None:
    sink = make_sink(web={"max_clients": 10})
    port = sink.server.port
    big = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), np.uint8)  # ~1 MB JPEGs
    viewers = [open_stream(port, "/api/sources/cam/stream.mjpeg")[0] for _ in range(3)]
    viewers.append(open_stream(port, "/api/live")[0])
    stuck = socket.create_connection(("127.0.0.1", port), timeout=10)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(
        b"GET /api/sources/cam/stream.mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )  # never read
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # sends nothing
    stop = threading.Event()

    def camera() -> None:
        i = 0
        while not stop.wait(0.25):
            sink.on_frame(FrameMessage("cam", i, big, 10.0))
            i += 1

    feeder = threading.Thread(target=camera, daemon=True)
    feeder.start()
    try:
        deadline = time.monotonic() + 20
        while sink.frames_encoded < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sink.frames_encoded >= 4
        started = time.monotonic()
        closed_all = sink.server.stop()
        took = time.monotonic() - started
        assert took < 2.0 and closed_all, took
        assert sink.server.connections == 0
    finally:
        stop.set()
        feeder.join(5)
        for s in [*viewers, stuck, idle]:
            with contextlib.suppress(OSError):
                s.close()


def test_a_huge_request_line_and_header_are_refused_and_the_server_still_answers(
    sink: WebSink,
) -> None:
    port = sink.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
        assert b" 414 " in s.recv(100)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n")
        assert b" 431 " in s.recv(100)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/api/events", body=b"x")
    assert conn.getresponse().status == 501
    conn.close()
    assert get(port, "/healthz").status == 200


def test_a_viewer_that_never_reads_is_dropped_and_frees_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stuck viewer must not hold one of max_clients forever (its sends time out)."""
    from streamdet.web import server

    monkeypatch.setattr(server, "STREAM_WRITE_TIMEOUT_S", 0.5)
    sink = make_sink(web={"max_clients": 1})
    port = sink.server.port
    big = np.random.default_rng(1).integers(0, 255, (720, 1280, 3), np.uint8)
    stuck = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /api/sources/cam/stream.mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        deadline = time.monotonic() + 30
        while sink.server.slots.used == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        i = 0
        while sink.server.slots.used and time.monotonic() < deadline:
            sink.on_frame(FrameMessage("cam", i, big, 10.0))  # ~1 MB each, never read
            i += 1
            time.sleep(0.25)
        assert sink.server.slots.used == 0, "the stuck viewer still holds its slot"
        viewer, head = open_stream(port, "/api/sources/cam/stream.mjpeg")
        assert head.startswith(b"HTTP/1.1 200")
        viewer.close()
    finally:
        stuck.close()
        sink.close()


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example:8080", 421),
        ("evil.example", 421),
        ("127.0.0.1:8080", 200),
        ("localhost:8080", 200),
        ("[::1]:8080", 200),
    ],
)
def test_without_a_token_a_loopback_server_answers_only_loopback_host_names(
    sink: WebSink, host: str, status: int
) -> None:
    """A site re-pointed at 127.0.0.1 (DNS rebinding) must not read the open API."""
    assert get(sink.server.port, "/api/events", {"Host": host}).status == status
