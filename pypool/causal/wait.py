"""The asyncio side of causal reads: poll replicas while reads wait on them, wake the reads they satisfy.

One ``CausalReads`` per pool group: its position table is fed by the health
monitors every tick and by the pollers here. A read that ``decide`` tells to
wait registers the position it needs and sleeps; one poller per replica asks
that replica for its replay position while any read waits on it (backing off
from ``POLL_FIRST`` to ``POLL_MAX``: a replica that is far behind is not asked
hundreds of times), and each answer wakes only the reads it satisfies. A read
wakes otherwise at a monitor tick (``notify``: it decides again, as bans or a
promotion may have changed where it can run) or at its deadline, so many
waiting reads cost one check per replica per poll, not one per read.

The session calls ``choose`` only for a read that has a requirement; a read
that follows no write never comes here.
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

COMMIT_POLL_INTERVAL = 0.0005  # seconds between looks at commit lookups in flight (other workers' too)
POLL_FIRST = 0.001  # a replica a read waits on is asked again after this, doubling each time ...
POLL_MAX = 0.016  # ... up to this


class _Waiter:
    __slots__ = ("required", "future")

    def __init__(self, required: Position, future: asyncio.Future[None]) -> None:
        self.required = required
        self.future = future


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
        self._waiting: dict[K, list[_Waiter]] = {}  # replica -> reads waiting for it
        self._pollers: dict[K, asyncio.Task[None]] = {}

    def deadline(self) -> float:
        """When a read that starts now stops waiting: take it as the read arrives, before any wait."""
        return self._clock() + self.timeout

    def notify(self) -> None:
        """A monitor tick: positions, bans, lag or the primary may have changed. Every waiting read
        decides again (once a second per server): one may be served now, or its candidates changed
        (a replica that cannot answer was banned, the primary was promoted: go there at once)."""
        waiting, self._waiting = self._waiting, {}  # each woken read registers again if it still waits
        for waiters in waiting.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_result(None)

    @property
    def polling(self) -> int:
        """Replicas being polled now (for tests and SHOW)."""
        return len(self._pollers)

    def _has_waiters(self, server: K) -> bool:
        waiters = self._waiting.get(server)
        if waiters is None:
            return False
        waiters[:] = [w for w in waiters if not w.future.done()]  # timed out or woken by another replica
        if not waiters:
            del self._waiting[server]
            return False
        return True

    def _wake(self, server: K) -> None:
        waiters = self._waiting.get(server)
        if not waiters:
            return
        caught_up = self.positions.caught_up
        normalize = self.positions.normalize
        keep = []
        for waiter in waiters:
            if waiter.future.done():
                continue
            if caught_up(server, normalize(waiter.required)):
                waiter.future.set_result(None)
            else:
                keep.append(waiter)
        if keep:
            waiters[:] = keep
        else:
            del self._waiting[server]

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
        loop = asyncio.get_running_loop()
        while True:
            now = self._clock()
            candidates = replicas()
            decision = decide(required, candidates, self.positions, now=now, deadline=deadline,
                              timeout_ms=self.timeout_ms, pick=pick, primary=primary, label=self._label)
            if not isinstance(decision, Wait):
                self._count(decision, primary, waited, now - started)
                return decision
            waited = True
            future: asyncio.Future[None] = loop.create_future()
            waiter = _Waiter(required, future)
            for server in candidates:
                self._waiting.setdefault(server, []).append(waiter)
                if server not in self._pollers:
                    self._pollers[server] = loop.create_task(self._poll(server))
            try:
                async with asyncio.timeout(max(0.0, deadline - now)):  # wait_for could drop a cancel (3.11)
                    await future
            except asyncio.TimeoutError:
                pass

    async def _poll(self, server: K) -> None:
        """Ask ``server`` for its replay position while reads wait on it."""
        interval = POLL_FIRST
        try:
            while self._has_waiters(server):
                self.positions.check_started(server, self._clock())
                try:
                    position = await self._check(server)
                except Exception as exc:  # noqa: BLE001 - a failed check only delays reads; bans are the monitor's
                    log.debug("causal read: checking %s failed: %s", self._label(server), exc)
                    self.positions.check_failed(server, self._clock())
                else:
                    self.positions.observe(server, position, self._clock())
                    self._wake(server)
                if not self._has_waiters(server):
                    break
                await asyncio.sleep(interval)
                interval = min(interval * 2, POLL_MAX)
        finally:
            del self._pollers[server]

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
        pollers = list(self._pollers.values())
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
