"""The one retry backoff policy, a pure delay function (public as ``orchestrator.timing.Backoff``).

It lives in ``storage`` because the drivers retry too (the Postgres listener's reconnect,
SQLite's busy retry) and ``storage`` never imports the orchestrator. One jitter convention:
a fraction ``jitter`` of each step is random, so ``jitter=0`` is the bare exponential,
``0.5`` is "equal jitter" (never less than half the step) and ``1`` is "full jitter".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from asyncstore.storage.errors import InvalidArgument

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff: step ``n`` is ``min(max_s, base_s * factor ** (n - 1))``.

    ``delay(n)`` returns ``step * (1 - jitter) + uniform(0, step * jitter)``; attempts are
    1-based (the delay after the first failure is ``delay(1)``).
    """

    base_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base_s) and self.base_s >= 0):
            raise InvalidArgument(f"base_s must be a finite number >= 0, not {self.base_s!r}")
        if not (math.isfinite(self.max_s) and self.max_s >= self.base_s):
            raise InvalidArgument(f"max_s must be finite and >= base_s, not {self.max_s!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise InvalidArgument(f"factor must be finite and >= 1, not {self.factor!r}")
        if not 0 <= self.jitter <= 1:
            raise InvalidArgument(f"jitter must be between 0 and 1, not {self.jitter!r}")

    def step(self, attempt: int) -> float:
        """The un-jittered ceiling of attempt ``attempt`` (1-based)."""
        if attempt < 1:
            raise InvalidArgument(f"attempt is 1-based, not {attempt!r}")
        # Cap the exponent before the power so a huge attempt count cannot overflow.
        exponent = min(attempt - 1, 1024)
        try:
            raw = self.base_s * self.factor**exponent
        except OverflowError:
            return self.max_s
        return min(self.max_s, raw)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered delay before retry number ``attempt`` (1-based)."""
        ceiling = self.step(attempt)
        spread = ceiling * self.jitter
        draw = (rng or random).uniform(0.0, spread) if spread else 0.0
        return ceiling - spread + draw
