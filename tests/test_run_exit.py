"""How `streamdet run` leaves the process once everything is flushed: a thread still inside
native code (torch's thread pool in a forward pass, FFmpeg in a stuck read) must not be running
when the interpreter shuts down, or the process aborts with exit 134."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from streamdet import runner


class _Exited(Exception):
    pass


def _pipeline(inference: threading.Thread, stuck: int = 0) -> SimpleNamespace:
    return SimpleNamespace(inference=inference, abandoned=SimpleNamespace(alive=lambda: stuck))


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(runner.os, "_exit", fake_exit)
    monkeypatch.setattr(runner, "INFERENCE_GRACE_S", 0.2)
    return codes


def test_inference_still_in_a_forward_pass_exits_the_process_at_once(exits: list[int]) -> None:
    release = threading.Event()
    busy = threading.Thread(target=release.wait, daemon=True)
    busy.start()
    try:
        with pytest.raises(_Exited):
            runner._exit_now_if_threads_stuck(_pipeline(busy), None, 0)
    finally:
        release.set()
    assert exits == [0]


def test_a_forward_pass_that_ends_within_the_grace_is_waited_for(exits: list[int]) -> None:
    done = threading.Thread(target=lambda: None)
    done.start()
    runner._exit_now_if_threads_stuck(_pipeline(done), None, 0)  # returns: a normal exit
    assert exits == []


def test_a_capture_stuck_in_a_read_exits_with_the_runs_code(
    exits: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    done = threading.Thread(target=lambda: None)
    done.start()
    with pytest.raises(_Exited):
        runner._exit_now_if_threads_stuck(_pipeline(done, stuck=1), "error: disk full", 2)
    assert exits == [2] and "error: disk full" in capsys.readouterr().err
