"""``streamdet run`` with webhooks: the bundled demo posting to a real local HTTP server, and
bad webhook config as one ``error:`` line with exit code 2."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from webhook_receiver import Receiver, Reply, key_of

from streamdet import demo
from streamdet.cli import main

DEMO = demo.config_path().parent
SECRET = "whsec_" + base64.b64encode(b"demo-key-demo-key-demo-key-1234").decode()
PASSWORD = "s3cretpass"


def demo_config(tmp_path: Path, webhooks: list[dict[str, Any]]) -> Path:
    """The demo's config with absolute inputs, its log in tmp_path, no video, and ``webhooks``."""
    cfg = yaml.safe_load((DEMO / "demo.yaml").read_text())
    cfg["sources"][0]["url"] = str(DEMO / "demo.mp4")
    cfg["model"]["weights"] = str(DEMO / "c3d_bn_demo.safetensors")
    cfg["model"]["device"] = "cpu"
    cfg.pop("truth")
    cfg["sinks"] = {"events": {"path": str(tmp_path / "events.jsonl")}, "webhooks": webhooks}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(240)
def test_the_demo_posts_its_new_and_end_lines_as_the_log_wrote_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with Receiver(key_of(SECRET)) as receiver:
        receiver.script("/hang", Reply(hang=True))
        cfg = demo_config(
            tmp_path,
            [
                {"url": receiver.url("/hook", userinfo=f"ops:{PASSWORD}@"), "secret": SECRET},
                # never answers: detection, the log and the other endpoint do not wait for it
                {"url": receiver.url("/hang"), "timeout_s": 120},
            ],
        )
        assert main(["run", str(cfg)]) == 0
        received = receiver.on("/hook")

    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    expected = [line for line in lines if b'"type":"new"' in line or b'"type":"end"' in line]
    assert len(expected) >= 20  # the demo's 10+ events, each a new and an end
    assert [r.body for r in received] == expected  # byte for byte, in order
    assert all(r.signature_ok for r in received)
    out, err = capsys.readouterr()
    port = receiver.server.server_address[1]
    n = len(expected)
    assert (
        f"[summary] webhook http://ops:***@127.0.0.1:{port}/hook: "
        f"{n} delivered, 0 retried, 0 failed, 0 dropped\n"
    ) in out
    assert f"[summary] webhook http://127.0.0.1:{port}/hang: 0 delivered" in out
    assert f"{n} dropped" in out.split(f"{port}/hang:")[1].splitlines()[0]
    for text in (out, err, caplog.text):
        assert PASSWORD not in text and SECRET.removeprefix("whsec_") not in text


@pytest.mark.parametrize(
    ("hook", "error"),
    [
        (
            {"url": f"ftp://ops:{PASSWORD}@example.com/drop"},
            "sinks.webhooks[0].url: must be an http:// or https:// URL with a host: "
            "ftp://ops:***@example.com/drop",
        ),
        (
            {"url": "http://127.0.0.1:9/hook", "timeout_s": "ten"},
            "sinks.webhooks[0].timeout_s: Input should be a valid number",
        ),
        (
            {"url": "http://127.0.0.1:9/hook", "labels": ["falls"]},
            "sinks.webhooks[0].labels: 'falls' not among the model's classes (none, enter, ",
        ),
    ],
    ids=["not-http", "timeout-not-a-number", "unknown-label"],
)
def test_bad_webhook_config_is_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hook: dict[str, Any], error: str
) -> None:
    cfg = demo_config(tmp_path, [hook])
    assert main(["run", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert error in err
    assert PASSWORD not in out + err
    assert not (tmp_path / "events.jsonl").exists()
