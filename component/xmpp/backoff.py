"""How long the XMPP link waits before it tries again (DESIGN 8: reconnect with backoff)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with upward jitter; pure (the random source is injected).

    Jitter only lengthens a delay, so attempts are never closer than ``minimum`` apart: a refused
    handshake must not turn into a reconnect storm (Kamailio's xmpp module does ~400/s).
    """

    minimum: float
    maximum: float
    jitter: float = 0.25
    rng: Callable[[], float] = random.random
    failures: int = field(default=0, init=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        base = min(self.maximum, self.minimum * 2.0**self.failures)
        self.failures += 1
        return min(self.maximum, base * (1.0 + self.jitter * self.rng()))

    def reset(self) -> None:
        """A handshake succeeded: start again from ``minimum``."""
        self.failures = 0
