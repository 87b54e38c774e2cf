"""The suite writes only under its tmp dirs: the checkout is unchanged after it (see
``checkout_guard.py``, which also runs every test in its own tmp dir)."""

from __future__ import annotations

import pytest
from checkout_guard import checkout_state, started_state


def test_the_suite_left_the_checkout_unchanged(request: pytest.FixtureRequest) -> None:
    before, after = started_state(request.config), checkout_state()
    if before is None or after is None:
        pytest.skip("not a git checkout: nothing to compare")
    assert sorted(after - before) == [], "the suite wrote into the checkout"
