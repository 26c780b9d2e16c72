"""A token bucket: what one untrusted source may make netwatch do, at once and in the long run."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``burst`` actions at once, then ``rate`` a second; take() says whether one more fits."""

    def __init__(self, burst: float, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.clock = burst, rate, clock
        self.tokens = burst
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        """Spend one token if there is one."""
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
