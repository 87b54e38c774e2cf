"""Running a pipeline on a thread of its own, for tests that act on it while it runs, and
waiting on what other threads do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from streamdet.pipeline import Pipeline


def run_in_thread(pipeline: Pipeline) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``pipeline.run()`` on a daemon thread; the dict gets its ``summary`` or ``error``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = pipeline.run()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until it is true; fail the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)
