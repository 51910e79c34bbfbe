"""The asyncio side of causal reads: run the checks ``decide`` asks for and wait for their answers.

One ``CausalReads`` per pool group: its position table is fed by the health
monitors every tick and by the checks started here; every observation wakes
the reads waiting on the group, which then decide again. The session calls
``choose`` only for a read that has a requirement; a read that follows no
write never comes here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Hashable, TypeVar

from pypool.causal.decide import Fail, Serve, UsePrimary, Wait, decide
from pypool.causal.lsn import Position
from pypool.causal.positions import ReplicaPositions
from pypool.causal.stats import CausalStats

log = logging.getLogger("pypool.causal")

K = TypeVar("K", bound=Hashable)

COMMIT_POLL_INTERVAL = 0.0005  # seconds between looks at lookups still in flight (other workers' too)


class CausalReads(Generic[K]):
    def __init__(self, check: Callable[[K], Awaitable[Position | None]], timeout_ms: int,
                 positions: ReplicaPositions[K] | None = None, stats: CausalStats | None = None,
                 clock: Callable[[], float] = time.monotonic, label: Callable[[K], str] = str) -> None:
        self.positions: ReplicaPositions[K] = positions if positions is not None else ReplicaPositions()
        self.stats = stats if stats is not None else CausalStats()
        self.timeout = timeout_ms / 1000
        self.timeout_ms = timeout_ms
        self._check = check
        self._clock = clock
        self._label = label
        self._changed: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def deadline(self) -> float:
        """When a read that starts now stops waiting: take it as the read arrives, before any wait."""
        return self._clock() + self.timeout

    def notify(self) -> None:
        """Something was learnt (a check answered, a monitor tick): waiting reads decide again."""
        changed = self._changed
        if changed is not None:
            self._changed = None
            if not changed.done():
                changed.set_result(None)

    async def wait_for_commits(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``ready()`` (the read's own or every worker's commit lookups ended); False at the deadline."""
        while not ready():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(COMMIT_POLL_INTERVAL, remaining))
        return True

    async def choose(self, required: Position, replicas: Callable[[], Sequence[K]], *, deadline: float,
                     pick: Callable[[Sequence[K]], K], primary: K | None = None) -> Serve | UsePrimary | Fail:
        """Where the read runs (``decide``'s answer once it is not Wait), counted in ``stats``."""
        started = self._clock()
        waited = False
        while True:
            now = self._clock()
            decision = decide(required, replicas(), self.positions, now=now, deadline=deadline,
                              timeout_ms=self.timeout_ms, pick=pick, primary=primary, label=self._label)
            if not isinstance(decision, Wait):
                self._count(decision, primary, waited, now - started)
                return decision
            waited = True
            for server in decision.check:
                self.positions.check_started(server, now)
                task = asyncio.get_running_loop().create_task(self._run_check(server))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), max(0.0, decision.until - now))
            except asyncio.TimeoutError:
                pass

    async def _run_check(self, server: K) -> None:
        try:
            position = await self._check(server)
        except Exception as exc:  # noqa: BLE001 - a failed check only delays the read; bans are the monitor's job
            log.debug("causal read: checking %s failed: %s", self._label(server), exc)
            self.positions.check_failed(server, self._clock())
        else:
            self.positions.observe(server, position, self._clock())
        self.notify()

    def _count(self, decision: Serve | UsePrimary | Fail, primary: K | None, waited: bool, seconds: float) -> None:
        stats = self.stats
        if isinstance(decision, Fail):
            stats.timed_out += 1
        elif isinstance(decision, UsePrimary) or decision.server == primary:
            stats.to_primary += 1
        elif waited:
            stats.after_wait += 1
        else:
            stats.at_once += 1
        if waited:
            stats.observe_wait(seconds)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
