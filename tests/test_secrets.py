"""Passwords in RTSP URLs never leave the process in clear.

A sentinel password (with an ``@``, so the URL carries it percent-encoded) is grepped, raw and
encoded, in everything a run produces: stdout and stderr at the file-descriptor level (FFmpeg
writes there directly), every log record at DEBUG, the JSONL log, the text drawn on the overlay,
the annotated video, and the error and traceback of a failed run. The password sits where
cameras put it: in the userinfo (``user:pw@``, also with a raw ``/``), in the query
(``?user=..&password=..``) and in a vendor path (``/user=.._password=.._channel=1..``). Each test
has its own sentinel, so one test's registered secrets cannot hide another's leak.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

import cv2
import pytest
import yaml
from test_rtsp_reliability import FAST_OPTIONS

from streamdet.cli import main
from streamdet.errors import SourceError
from streamdet.models.c3d import C3D_BN
from streamdet.models.weights import save_checkpoint
from streamdet.sources import OpenCVSource, redact_text, redact_url

SENTINEL = "Zq7@sentinel-pw"
WRONG = "Wx9@wrong-sentinel"
USER = "alice"


def forms(password: str) -> list[str]:
    """The password as typed, percent-encoded, and its distinctive pieces (between the characters
    that end a part of a URL), so that a partly masked password is caught too."""
    pieces = [piece for piece in re.split(r"[/@:?]", password) if len(piece) >= 6]
    return [password, urllib.parse.quote(password, safe=""), *pieces]


def assert_clean(text: str | bytes, where: str, *passwords: str) -> None:
    data = text.encode(errors="replace") if isinstance(text, str) else text
    for password in passwords:
        for form in forms(password):
            assert form.encode() not in data, f"{form!r} appears in {where}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(path, C3D_BN(num_classes=3, width=0.0625), class_names=("none", "walk", "run"))
    return path


def auth_url(server, password: str) -> str:
    return server.url_with(USER, urllib.parse.quote(password, safe=""))


def write_config(
    path: Path, url_expr: str, weights: Path, events: Path, *, reconnect: bool = True
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "cam",
                        "url": url_expr,
                        "options": {**FAST_OPTIONS, "reconnect": reconnect},
                    }
                ],
                "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
                "events": {
                    "threshold": 0.0,
                    "exit_threshold": 0.0,
                    "smoothing": 1,
                    "open_windows": 1,
                },
                "sinks": {"events": {"path": str(events)}},
                "progress_interval_s": 1.0,
            }
        )
    )
    return path


def test_redaction_masks_the_password_raw_and_percent_encoded() -> None:
    url = f"rtsp://{USER}:{urllib.parse.quote(SENTINEL, safe='')}@10.0.0.5:554/live"
    with pytest.raises(SourceError) as caught:
        OpenCVSource(url.replace("10.0.0.5:554", "127.0.0.1:1"), open_timeout_s=0.5)
    assert redact_url(url) == f"rtsp://{USER}:***@10.0.0.5:554/live"
    assert_clean(str(caught.value), "the open error", SENTINEL)
    assert_clean(
        redact_text(f"failed: {SENTINEL} / {url} / rtsp://{USER}:{SENTINEL}@h/x"),
        "redacted text",
        SENTINEL,
    )


@pytest.mark.timeout(90)
def test_a_password_appears_in_no_output_of_a_run_with_an_outage(
    tmp_path: Path,
    rtsp_server,
    weights: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = rtsp_server(pattern=True, user=USER, password=SENTINEL)
    monkeypatch.setenv("CAM_URL", auth_url(server, SENTINEL))
    events, video = tmp_path / "events.jsonl", tmp_path / "annotated.avi"
    config = write_config(tmp_path / "run.yaml", "${CAM_URL}", weights, events)
    drawn: list[str] = []
    real_put_text = cv2.putText

    def recording_put_text(img, text, *args, **kwargs):
        drawn.append(text)
        return real_put_text(img, text, *args, **kwargs)

    monkeypatch.setattr(cv2, "putText", recording_put_text)
    caplog.set_level(logging.DEBUG)

    def outage() -> None:  # once events flow: kill the server, bring it back
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            events.exists() and '"type":"new"' in events.read_text()
        ):
            time.sleep(0.05)
        server.kill()
        time.sleep(1.0)
        server.start()

    actor = threading.Thread(target=outage, daemon=True)
    actor.start()
    code = main(
        ["--debug", "run", str(config), "--output-video", str(video), "--max-seconds", "12"]
    )
    actor.join(10)
    out, err = capfd.readouterr()

    assert code == 0, err[-2000:]
    log_text = events.read_text()
    assert '"status":"offline"' in log_text and log_text.count('"status":"online"') >= 2, (
        "no outage happened"
    )
    assert drawn and video.stat().st_size > 0
    assert f"{USER}:***@" in caplog.text, "the failed reopens were logged with the URL redacted"
    for text, where in [
        (out, "stdout"),
        (err, "stderr"),
        (caplog.text, "log records"),
        (log_text, "the event log"),
        ("\n".join(drawn), "the overlay text"),
        (video.read_bytes(), "the annotated video"),
    ]:
        assert_clean(text, where, SENTINEL)


@pytest.mark.timeout(60)
def test_a_wrong_password_is_one_error_line_that_does_not_quote_it(
    tmp_path: Path,
    rtsp_server,
    weights: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = rtsp_server(pattern=True, user=USER, password=SENTINEL)
    events = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path / "run.yaml", auth_url(server, WRONG), weights, events, reconnect=False
    )
    caplog.set_level(logging.DEBUG)

    code = main(["run", str(config)])
    out, err = capfd.readouterr()
    with pytest.raises(SourceError) as caught:  # --debug: the exception itself, with its traceback
        main(["--debug", "run", str(config)])
    debug_out, debug_err = capfd.readouterr()
    trace = "".join(traceback.format_exception(caught.value))

    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot open stream" in errors[0] and f"{USER}:***@" in errors[0]
    for text, where in [
        (out + debug_out, "stdout"),
        (err + debug_err, "stderr"),
        (caplog.text, "log records"),
        (events.read_text() if events.exists() else "", "the event log"),
        (trace, "the traceback"),
    ]:
        assert_clean(text, where, WRONG, SENTINEL)


def encoded(password: str) -> str:
    return urllib.parse.quote(password, safe="")


def recorded_put_text(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text the overlay draws from now on."""
    drawn: list[str] = []
    real_put_text = cv2.putText

    def recording_put_text(img, text, *args, **kwargs):
        drawn.append(text)
        return real_put_text(img, text, *args, **kwargs)

    monkeypatch.setattr(cv2, "putText", recording_put_text)
    return drawn


def event_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def text_of(path: Path) -> str:
    return path.read_text() if path.exists() else ""


class OutageThenEvents(threading.Thread):
    """Starts the (killed) server once the run has logged the stream offline (its first open
    failed), then stops the run (SIGTERM, as a user would) once it has written an event and the
    overlay has drawn a frame: the run takes as long as this machine needs, no longer."""

    def __init__(self, server, events: Path, drawn: list[str], deadline_s: float) -> None:
        super().__init__(daemon=True)
        self.server, self.events, self.drawn, self.deadline_s = server, events, drawn, deadline_s
        self.run_ended = threading.Event()  # set by the test when main() returns

    def _wait_for(self, condition, deadline: float) -> bool:
        while not condition():
            if time.monotonic() > deadline or self.run_ended.wait(0.05):
                return False
        return True

    def run(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        if self._wait_for(lambda: '"status":"offline"' in text_of(self.events), deadline):
            self.server.start()
        if self._wait_for(lambda: '"type":"new"' in text_of(self.events) and self.drawn, deadline):
            os.kill(os.getpid(), signal.SIGTERM)


# (server mount path, URL after the port, the source name a --source run derives): each placement
# of a password a hostile user reproduced; {pw} is the percent-encoded password.
PLACEMENTS = {
    "query": ("/cam", "/cam?user=alice&password={pw}&channel=1", "127.0.0.1_cam"),
    "vendor-path": (
        "/user=alice_password={pw}_channel=1_stream=0.sdp",
        "/user=alice_password={pw}_channel=1_stream=0.sdp",
        "127.0.0.1_channel_1_stream_0.sdp",
    ),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_password_in_the_query_or_path_appears_in_no_output_of_a_run(
    placement: str,
    tmp_path: Path,
    rtsp_server,
    weights: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the password in the query or a vendor path, it was in stderr, the progress lines, the
    event log (reason and source), and, through the source name derived from --source URL, in
    every event line and on the annotated video."""
    password = f"Zq7@{placement}-sentinel"
    mount, tail, name = (part.format(pw=encoded(password)) for part in PLACEMENTS[placement])
    server = rtsp_server(pattern=True, path=mount)
    server.kill()  # down at first: the failed open's message (with the URL) becomes a reason
    url = f"rtsp://127.0.0.1:{server.port}{tail}"
    events, video = tmp_path / "events.jsonl", tmp_path / "annotated.avi"
    config = write_config(tmp_path / "run.yaml", "0", weights, events)
    drawn = recorded_put_text(monkeypatch)
    caplog.set_level(logging.DEBUG)

    actor = OutageThenEvents(server, events, drawn, deadline_s=60)
    actor.start()
    try:  # --max-seconds: only a bound, the actor ends the run
        code = main(
            [
                "--debug",
                "run",
                str(config),
                "--source",
                url,
                "--output-video",
                str(video),
                "--max-seconds",
                "90",
            ]
        )
    finally:
        actor.run_ended.set()
    actor.join(10)
    out, err = capfd.readouterr()

    assert code == 0, err[-2000:]
    lines = event_lines(events)
    statuses = [line for line in lines if line["type"] == "status"]
    assert [s["status"] for s in statuses][:2] == ["offline", "online"], statuses
    assert "cannot open stream" in statuses[0]["reason"] and "***" in statuses[0]["reason"]
    assert any(line["type"] == "new" for line in lines), "no event was written"
    assert {line["source"] for line in lines} == {name}
    assert f"[progress] {name}: " in out + err
    assert any(text.startswith(f"{name} ") for text in drawn), "the overlay draws the safe name"
    for text, where in [
        (out, "stdout"),
        (err, "stderr"),
        (caplog.text, "log records"),
        (events.read_text(), "the event log"),
        ("\n".join(drawn), "the overlay text"),
        (video.read_bytes(), "the annotated video"),
    ]:
        assert_clean(text, where, password)


@pytest.mark.timeout(60)
def test_a_raw_slash_in_a_userinfo_password_appears_in_no_output_of_a_run(
    tmp_path: Path,
    weights: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``user:pw@`` with a raw "/" in pw: FFmpeg cannot open it, and the error, the event log and
    the source name quoted the password from the "/" on (the name was ``alice_second-half_...``)."""
    password = "Zq7-first/second-half@third-part"
    url = f"rtsp://{USER}:{password}@127.0.0.1:1/cam"
    events = tmp_path / "events.jsonl"
    config = write_config(tmp_path / "run.yaml", "0", weights, events)
    caplog.set_level(logging.DEBUG)

    code = main(["--debug", "run", str(config), "--source", url, "--max-seconds", "3"])
    out, err = capfd.readouterr()

    assert code == 0, err[-2000:]
    lines = event_lines(events)
    assert lines and {line["source"] for line in lines} == {"127.0.0.1_cam"}
    offline = [line for line in lines if line.get("status") == "offline"]
    assert offline and f"{USER}:***@127.0.0.1:1/cam" in offline[0]["reason"]
    assert "[progress] 127.0.0.1_cam: " in out + err
    for text, where in [
        (out, "stdout"),
        (err, "stderr"),
        (caplog.text, "log records"),
        (events.read_text(), "the event log"),
    ]:
        assert_clean(text, where, password)


def test_validate_masks_passwords_from_the_environment_in_every_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``validate`` printed a password from ${ENV} that was not in ``user:pw@`` form (or held a
    raw "/" there)."""
    password = "Zq7-validate/sentinel@pw:x?y"
    monkeypatch.setenv("CAM_PW", password)
    monkeypatch.setenv("CAM_PW_ENC", encoded(password))
    monkeypatch.setenv(
        "CAM_URL", f"http://10.0.0.9/snap.cgi?loginuse=admin&loginpas={encoded(password)}"
    )
    config = tmp_path / "cams.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {"name": "raw", "url": "rtsp://admin:${CAM_PW}@10.0.0.5:554/live"},
                    {
                        "name": "query",
                        "url": "rtsp://10.0.0.6:554/cam?user=admin&password=${CAM_PW_ENC}&channel=1",
                    },
                    {
                        "name": "path",
                        "url": "rtsp://10.0.0.7/user=admin_password=${CAM_PW_ENC}_channel=2_stream=0.sdp",
                    },
                    {"name": "whole", "url": "${CAM_URL}"},
                ]
            }
        )
    )

    code = main(["validate", str(config)])
    out, err = capsys.readouterr()

    assert code == 0, err
    assert out == (
        f"{config}: valid (4 source(s): raw=rtsp://admin:***@10.0.0.5:554/live, "
        "query=rtsp://10.0.0.6:554/cam?user=***&password=***&channel=1, "
        "path=rtsp://10.0.0.7/user=***_password=***_channel=2_stream=0.sdp, "
        "whole=http://10.0.0.9/snap.cgi?loginuse=***&loginpas=***)\n"
    )
    assert_clean(out + err, "validate's output", password)
