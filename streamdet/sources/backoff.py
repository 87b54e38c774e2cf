"""Reconnect delays: exponential backoff with jitter, reset after a healthy period."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with jitter (each delay uniform in [cap/2, cap]), reset after a healthy period.

    Example:
        >>> b = Backoff(0.5, 30.0, rng=random.Random(0))
        >>> [round(b.next_delay(), 2) for _ in range(3)]
        [0.46, 0.88, 1.42]
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        healthy_after: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.healthy_after = healthy_after
        self._attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * (2**self._attempt))
        self._attempt += 1
        return self._rng.uniform(cap / 2, cap)

    def healthy_for(self, seconds: float) -> None:
        if seconds >= self.healthy_after:
            self._attempt = 0
