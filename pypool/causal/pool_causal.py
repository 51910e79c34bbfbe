"""Causal reads of one pool group, as the client session sees them: the calls to make and when.

The session holds one ``ClientCausal`` per client (``client()``; None when the
pool's ``causal_reads`` is off) and calls, per transaction:

1. ``ticket = write_ended(client)`` when a transaction that ran on the primary
   and was not read-only ends: on the server's ReadyForQuery 'I', *before* those
   bytes are written to the client (with workers, a read the client sends on
   another connection may reach another process at once: the lookup must
   already be published). Then, after the reply went out and before the
   connection goes back to the pool, send ``COMMIT_POSITION_QUERY`` on that
   server connection and report the row with ``ticket.learnt(row)``, or
   ``ticket.failed()`` if it could not be answered. The ticket remembers its
   pool group and client state: in a sharded pool the client may have moved
   on to another shard by then.
2. ``must_wait(client, replicas)`` before a read is given a replica: False is
   the fast path (route as ever: no requirement, or every replica the group
   would choose from already replayed it). True: ``await choose(...)`` tells
   where the read runs.

Positions of the replicas come from the health monitors (``positions``,
passed to each ServerMonitor) and from checks ``choose`` makes itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Hashable, TypeVar

from pypool.causal.decide import Fail, Serve, UsePrimary
from pypool.causal.lsn import Position
from pypool.causal.positions import ReplicaPositions
from pypool.causal.requirement import GLOBAL, OFF, ClientCausal, CommitLog, Slots, parse_commit_row
from pypool.causal.stats import CausalStats
from pypool.causal.wait import CausalReads

log = logging.getLogger("pypool.causal")

K = TypeVar("K", bound=Hashable)

NO_TICKET = -1  # session mode: no pool-wide log to take a ticket from


class PoolCausal(Generic[K]):
    def __init__(self, mode: str, timeout_ms: int, check: Callable[[K], Awaitable[Position | None]],
                 primary_position: Callable[[], Awaitable[Position | None]], commits: CommitLog | None = None,
                 label: Callable[[K], str] = str) -> None:
        """``commits``: the pool's commit log in ``global`` mode, one per pool name shared by the
        groups of all its users (``CommitLog(worker.commit_slots(pool_name))`` with workers)."""
        self.mode = mode
        self.reads: CausalReads[K] = CausalReads(check, timeout_ms, label=label)
        self.log = (commits if commits is not None else CommitLog()) if mode == GLOBAL else None
        self._primary_position = primary_position
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def positions(self) -> ReplicaPositions[K]:
        return self.reads.positions

    @property
    def stats(self) -> CausalStats:
        return self.reads.stats

    def client(self) -> ClientCausal | None:
        return None if self.mode == OFF else ClientCausal()

    # ------------------------------------------------------ after a write

    def write_ended(self, client: ClientCausal) -> "CommitTicket":
        """A write transaction ended: its position is pending until the ticket says where it lies."""
        client.begin_lookup()
        return CommitTicket(self, client, self.log.begin_lookup() if self.log is not None else NO_TICKET)

    def commit_learnt(self, client: ClientCausal, ticket: int, row: list[str | None],
                      asynchronous: bool = False) -> None:
        """COMMIT_POSITION_QUERY's row; ``asynchronous``: the transaction set synchronous_commit = off locally."""
        try:
            position = parse_commit_row(row, asynchronous)
        except ValueError as exc:
            log.warning("causal reads: %s; asking the primary's monitor", exc)
            self.commit_lookup_failed(client, ticket)
            return
        self._end(client, ticket, position)

    def commit_lookup_failed(self, client: ClientCausal, ticket: int) -> None:
        """The write's own connection could not say: the primary's current position covers it as well."""
        task = asyncio.get_running_loop().create_task(self._ask_primary(client, ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_primary(self, client: ClientCausal, ticket: int) -> None:
        try:
            position = await self._primary_position()
        except Exception as exc:  # noqa: BLE001 - then the position stays unknown: reads use the primary
            log.warning("causal reads: the primary's position is unknown too (%s); this client's reads go to "
                        "the primary until its next write", exc)
            position = None
        self._end(client, ticket, position)

    def _end(self, client: ClientCausal, ticket: int, position: Position | None) -> None:
        client.end_lookup(position)
        if self.log is not None:
            self.log.end_lookup(ticket, position)

    # ----------------------------------------------------- before a read

    def must_wait(self, client: ClientCausal | None, replicas: Sequence[K]) -> bool:
        """False: any of ``replicas`` may serve this read as ever (the hot path, a few attribute tests).

        True when the read must see a write that some replica is not known to
        have replayed yet, or whose position is still being learnt: then
        ``choose`` decides. ``replicas``: those the group would choose from.
        """
        if client is None:
            return False
        if client.pending or client.unknown:
            return True
        required = client.required
        log_ = self.log
        if log_ is not None:  # global: any write through this pypool, on any worker
            position, barrier = log_.read_barrier()
            if barrier:
                return True
            if position is not None and (required is None or position > required):
                required = position
        if required is None:
            return False
        if not replicas:
            return True  # no usable replica: ``choose`` decides (the primary, or wait for one)
        caught_up = self.reads.positions.caught_up
        for replica in replicas:
            if not caught_up(replica, required):
                return True
        self.reads.stats.at_once += 1  # a read with a requirement that every replica already meets
        return False

    async def choose(self, client: ClientCausal, replicas: Callable[[], Sequence[K]], *,
                     pick: Callable[[Sequence[K]], K], primary: K | None = None) -> Serve | UsePrimary | Fail | None:
        """Where this read runs; None: it has no requirement after all (route as ever).

        ``replicas``: the replicas the group would choose from now (banned and
        lagging ones left out), asked again after every wait; ``primary``: the
        primary's key when primary reads are allowed, else None.
        """
        reads = self.reads
        deadline = reads.deadline()
        if client.pending and not await reads.wait_for_commits(lambda: not client.pending, deadline):
            return self._to_primary("the position of this client's last write is not known yet")
        if client.unknown:
            return self._to_primary("the position of this client's last write could not be learnt")
        required = client.required
        if self.log is not None:
            position, barrier = self.log.read_barrier()
            if barrier:
                commits = self.log
                if not await reads.wait_for_commits(lambda: commits.barrier_passed(barrier), deadline):
                    return self._to_primary("writes committed before this read are still being located")
                position, _ = commits.read_barrier()
            if position is not None and (required is None or position > required):
                required = position
        if required is None:
            return None
        return await reads.choose(required, replicas, deadline=deadline, pick=pick, primary=primary)

    def _to_primary(self, reason: str) -> UsePrimary:
        self.reads.stats.to_primary += 1
        return UsePrimary(reason)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reads.close()


class CommitTicket:
    """One write's pending commit position: the pool (shard) it ran on, whose client, the log's ticket."""

    __slots__ = ("causal", "client", "number")

    def __init__(self, causal: PoolCausal, client: ClientCausal, number: int) -> None:
        self.causal = causal
        self.client = client
        self.number = number

    def learnt(self, row: list[str | None], asynchronous: bool = False) -> None:
        self.causal.commit_learnt(self.client, self.number, row, asynchronous)

    def failed(self) -> None:
        self.causal.commit_lookup_failed(self.client, self.number)


class CommitLogs:
    """The ``global`` mode commit log of each pool shard, shared by its users' groups and kept across reloads.

    ``slots_for(pool_name)``: this worker's slots in the table shared by worker
    processes (``Worker.commit_slots``); None without workers (or when the
    table cannot take the pool: then the log is this process's own).
    """

    def __init__(self, slots_for: Callable[[str], Slots | None] | None = None) -> None:
        self._slots_for = slots_for
        self._logs: dict[str, CommitLog] = {}

    def for_shard(self, pool_name: str, shard: int, mode: str) -> CommitLog | None:
        """The log of one shard of a pool (shards have their own primaries: their positions do not compare)."""
        if mode != GLOBAL:
            return None
        name = pool_name if shard == 0 else f"{pool_name}#shard{shard}"
        commits = self._logs.get(name)
        if commits is None:
            slots = self._slots_for(name) if self._slots_for is not None else None
            commits = self._logs[name] = CommitLog(slots)
        return commits
