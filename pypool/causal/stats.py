"""Causal-read counters for /metrics: plain integers on the hot path, read by snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field

# Upper bounds (seconds) of the wait histogram's buckets; the last one is +Inf.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))


@dataclass(slots=True)
class CausalStats:
    at_once: int = 0  # reads a replica known to be caught up served without waiting
    after_wait: int = 0  # reads a replica served after checks showed it caught up
    to_primary: int = 0  # reads sent to the primary (primary reads allowed, or a timeline change)
    timed_out: int = 0  # reads refused after causal_reads_timeout
    wait_counts: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))
    wait_sum: float = 0.0

    def observe_wait(self, seconds: float) -> None:
        self.wait_sum += seconds
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.wait_counts[i] += 1
                return
