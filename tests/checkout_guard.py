"""A pytest plugin: the suite must leave the checkout as it found it.

Tests write only under their tmp dirs. Every test runs with its own tmp dir as the working
directory (outputs named relative to it land there) and a session tmp dir as streamdet's cache
(``$STREAMDET_CACHE_DIR``, else ~/.cache/streamdet), and the last test of the session,
``test_the_suite_left_the_checkout_unchanged``, compares the checkout's ``git status`` with the
one taken at the start, so a test that writes into the checkout fails the run.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

try:  # hypothesis keeps its examples and caches in ./.hypothesis unless told otherwise
    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="streamdet-hypothesis-"))
    settings.register_profile("streamdet-tests", database=None)
    settings.load_profile("streamdet-tests")
except ImportError:
    pass

ROOT = Path(__file__).resolve().parents[1]
LAST_TEST = "test_the_suite_left_the_checkout_unchanged"
# Written by the interpreter and the tools, not by the code under test.
_NOISE = (
    "__pycache__/",
    ".pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "tests/.assets/",
)
_START = pytest.StashKey[frozenset[str] | None]()


def checkout_state() -> frozenset[str] | None:
    """``git status`` lines of the checkout (untracked and ignored files too); None outside git."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return frozenset(line for line in out.splitlines() if not any(n in line for n in _NOISE))


def started_state(config: pytest.Config) -> frozenset[str] | None:
    return config.stash.get(_START, None)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_START] = checkout_state()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The checkout check runs after every other test."""
    items.sort(key=lambda item: item.name == LAST_TEST)


@pytest.fixture(scope="session")
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled kernels and int8 calibrations, shared by the session's tests (not ~/.cache)."""
    return tmp_path_factory.mktemp("streamdet-cache")


@pytest.fixture(autouse=True)
def _work_in_tmp_dir(
    tmp_path: Path, _session_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STREAMDET_CACHE_DIR", str(_session_cache_dir))  # subprocesses inherit it
