"""Running a pipeline on a thread of its own, for tests that act on it while it runs."""

from __future__ import annotations

import threading
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
