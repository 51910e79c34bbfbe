"""Which replica serves the next read: PgCat's `random` and `loc`, plus `round_robin`."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

MODES = ("random", "loc", "round_robin")
_random = random.random  # one C call per pick; random.choice costs three Python frames


class Candidate(Protocol):
    """A server pool as the balancer sees it (pypool.pool.pool.ServerPool)."""

    @property
    def active(self) -> int: ...  # connections handed out


C = TypeVar("C", bound=Candidate)


class Balancer:
    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown load_balancing_mode {mode!r}; expected one of {', '.join(MODES)}")
        self.mode = mode
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[C]) -> C:
        if len(candidates) == 1:
            return candidates[0]
        if self.mode == "loc":
            # Least outstanding connections; ties broken at random so equal
            # replicas share the load instead of the first one taking it all.
            best = min(c.active for c in candidates)
            return random.choice([c for c in candidates if c.active == best])
        if self.mode == "round_robin":
            return candidates[next(self._counter) % len(candidates)]
        return candidates[int(_random() * len(candidates))]
