"""Passwords in RTSP URLs never leave the process in clear.

A sentinel password (with an ``@``, so the URL carries it percent-encoded) is grepped, raw and
encoded, in everything a run produces: stdout and stderr at the file-descriptor level (FFmpeg
writes there directly), every log record at DEBUG, the JSONL log, the text drawn on the overlay,
the annotated video, and the error and traceback of a failed run.
"""

from __future__ import annotations

import logging
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
    """The password as typed, percent-encoded, and its distinctive core."""
    return [password, urllib.parse.quote(password, safe=""), password.split("@")[1]]


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


def write_config(path: Path, url_expr: str, weights: Path, events: Path, *, reconnect: bool = True) -> Path:
    path.write_text(yaml.safe_dump({
        "sources": [{"name": "cam", "url": url_expr, "options": {**FAST_OPTIONS, "reconnect": reconnect}}],
        "model": {"weights": str(weights), "device": "cpu", "precision": "fp32"},
        "events": {"threshold": 0.0, "exit_threshold": 0.0, "smoothing": 1, "open_windows": 1},
        "sinks": {"events": {"path": str(events)}},
        "progress_interval_s": 1.0,
    }))
    return path


def test_redaction_masks_the_password_raw_and_percent_encoded() -> None:
    url = f"rtsp://{USER}:{urllib.parse.quote(SENTINEL, safe='')}@10.0.0.5:554/live"
    with pytest.raises(SourceError) as caught:
        OpenCVSource(url.replace("10.0.0.5:554", "127.0.0.1:1"), open_timeout_s=0.5)
    assert redact_url(url) == f"rtsp://{USER}:***@10.0.0.5:554/live"
    assert_clean(str(caught.value), "the open error", SENTINEL)
    assert_clean(redact_text(f"failed: {SENTINEL} / {url} / rtsp://{USER}:{SENTINEL}@h/x"), "redacted text",
                 SENTINEL)


@pytest.mark.timeout(90)
def test_a_password_appears_in_no_output_of_a_run_with_an_outage(
    tmp_path: Path, rtsp_server, weights: Path, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
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
        while time.monotonic() < deadline and not (events.exists() and '"type":"new"' in events.read_text()):
            time.sleep(0.05)
        server.kill()
        time.sleep(1.0)
        server.start()

    actor = threading.Thread(target=outage, daemon=True)
    actor.start()
    code = main(["--debug", "run", str(config), "--output-video", str(video), "--max-seconds", "12"])
    actor.join(10)
    out, err = capfd.readouterr()

    assert code == 0, err[-2000:]
    log_text = events.read_text()
    assert '"status":"offline"' in log_text and log_text.count('"status":"online"') >= 2, "no outage happened"
    assert drawn and video.stat().st_size > 0
    assert f"{USER}:***@" in caplog.text, "the failed reopens were logged with the URL redacted"
    for text, where in [(out, "stdout"), (err, "stderr"), (caplog.text, "log records"),
                        (log_text, "the event log"), ("\n".join(drawn), "the overlay text"),
                        (video.read_bytes(), "the annotated video")]:
        assert_clean(text, where, SENTINEL)


@pytest.mark.timeout(60)
def test_a_wrong_password_is_one_error_line_that_does_not_quote_it(
    tmp_path: Path, rtsp_server, weights: Path, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture
) -> None:
    server = rtsp_server(pattern=True, user=USER, password=SENTINEL)
    events = tmp_path / "events.jsonl"
    config = write_config(tmp_path / "run.yaml", auth_url(server, WRONG), weights, events, reconnect=False)
    caplog.set_level(logging.DEBUG)

    code = main(["run", str(config)])
    out, err = capfd.readouterr()
    with pytest.raises(SourceError) as caught:  # --debug: the exception itself, with its traceback
        main(["--debug", "run", str(config)])
    debug_out, debug_err = capfd.readouterr()
    trace = "".join(traceback.format_exception(caught.value))

    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot open stream" in errors[0] and f"{USER}:***@" in errors[0]
    for text, where in [(out + debug_out, "stdout"), (err + debug_err, "stderr"), (caplog.text, "log records"),
                        (events.read_text() if events.exists() else "", "the event log"), (trace, "the traceback")]:
        assert_clean(text, where, WRONG, SENTINEL)
