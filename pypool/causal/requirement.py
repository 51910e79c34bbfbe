"""The WAL position a client's next read must see: its own writes (``session``) or everyone's (``global``).

A write transaction's commit position is learnt after the client already has
its reply: the session asks the primary (``COMMIT_POSITION_QUERY``) on the same
server connection before checking it in. Until that answer arrives the
position is *pending*, and a read that must see it waits for it (one primary
round trip at most). Hence the tickets: ``begin_lookup`` when the write
transaction ends, ``end_lookup`` with the answer.

``CommitLog`` is one pool's log in this process, for ``global`` mode: the
highest commit position learnt and the lookups still in flight. With several
worker processes each worker publishes its log in its own slot of a shared
table (``shared.py``) and a read looks at every worker's slot.
"""

from __future__ import annotations

from typing import Protocol

from pypool.causal.lsn import Position, parse_lsn, record_end, timeline_from_walfile

OFF, SESSION, GLOBAL = "off", "session", "global"
MODES = (OFF, SESSION, GLOBAL)

# Asked on the primary connection right after a write transaction ended, with that
# session's settings. A commit that waited for its WAL flush (synchronous_commit other
# than off) lies before the flush position, which the replicas are sure to receive.
# An asynchronous commit may lie past it: then the insert position, which covers it
# (the WAL writer flushes it within wal_writer_delay). Each position is turned into the
# record end a replica reports (``lsn.record_end``), from its offset in its WAL file.
COMMIT_POSITION_QUERY = (
    "SELECT i, fi.file_offset, f, ff.file_name, ff.file_offset, current_setting('wal_block_size'), "
    "current_setting('synchronous_commit') FROM pg_current_wal_insert_lsn() i, pg_current_wal_flush_lsn() f, "
    "pg_walfile_name_offset(i) fi, pg_walfile_name_offset(f) ff"
)


def parse_commit_row(row: list[str | None], asynchronous: bool = False) -> Position:
    """The row of COMMIT_POSITION_QUERY -> the position a replica must have replayed.

    ``asynchronous``: the transaction ran ``SET LOCAL synchronous_commit = off``
    (the session's setting, read by the query, no longer shows it).
    """
    if len(row) != 7 or any(value is None for value in row):
        raise ValueError(f"commit position query returned {row!r}")
    insert, insert_offset, flush, file_name, flush_offset, block_size, synchronous_commit = row
    try:
        block = int(block_size)  # type: ignore[arg-type]
        if asynchronous or synchronous_commit == "off":
            lsn = record_end(parse_lsn(insert), int(insert_offset), block)  # type: ignore[arg-type]
        else:
            lsn = record_end(parse_lsn(flush), int(flush_offset), block)  # type: ignore[arg-type]
        return Position(timeline_from_walfile(file_name), lsn)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"commit position query returned {row!r}: {exc}") from None


class ClientCausal:
    """One client's own requirement (``session`` mode); a few attributes, no I/O."""

    __slots__ = ("required", "pending", "unknown")

    def __init__(self) -> None:
        self.required: Position | None = None  # highest commit position of this client's writes
        self.pending = 0  # its commit-position lookups still in flight
        self.unknown = False  # a write whose position nobody could learn: reads go to the primary

    def begin_lookup(self) -> None:
        self.pending += 1

    def end_lookup(self, position: Position | None) -> None:
        """The lookup's answer; None if no answer could be had (then reads go to the primary
        until a later write's position is known: that one is past every earlier commit)."""
        self.pending -= 1
        if position is None:
            self.unknown = True
            return
        self.unknown = False
        if self.required is None or position > self.required:
            self.required = position

    def __str__(self) -> str:  # SHOW CLIENTS
        if self.pending:
            return "pending"
        if self.unknown:
            return "unknown (primary)"
        return "" if self.required is None else str(self.required)


class Slots(Protocol):
    """Per-worker slots of one pool: (position, lookups started, all lookups below this ticket done)."""

    index: int  # this worker's slot

    def initial(self) -> tuple[Position | None, int]: ...
    def publish(self, position: Position | None, started: int, done_below: int) -> None: ...
    def read_all(self) -> list[tuple[Position | None, int, int]]: ...


class LocalSlots:
    """One process, one slot: ``global`` mode without worker processes."""

    index = 0

    def __init__(self) -> None:
        self._slot: tuple[Position | None, int, int] = (None, 0, 0)

    def initial(self) -> tuple[Position | None, int]:
        return None, 0

    def publish(self, position: Position | None, started: int, done_below: int) -> None:
        self._slot = (position, started, done_below)

    def read_all(self) -> list[tuple[Position | None, int, int]]:
        return [self._slot]


# What a global read must wait for: (slot, ticket) pairs whose lookups were in flight when it began.
Barrier = tuple[tuple[int, int], ...]


class CommitLog:
    """One pool's commit positions in this process, published to its slot for ``global`` reads."""

    def __init__(self, slots: Slots | None = None) -> None:
        self.slots: Slots = slots if slots is not None else LocalSlots()
        # A restarted worker goes on from its predecessor's slot; the lookups that one left
        # in flight will never end, so they count as done.
        self.position, self._started = self.slots.initial()
        self._outstanding: set[int] = set()
        self._publish()

    def begin_lookup(self) -> int:
        ticket = self._started
        self._started += 1
        self._outstanding.add(ticket)
        self._publish()
        return ticket

    def end_lookup(self, ticket: int, position: Position | None) -> None:
        self._outstanding.discard(ticket)
        if position is not None and (self.position is None or position > self.position):
            self.position = position
        self._publish()

    def _publish(self) -> None:
        done_below = min(self._outstanding) if self._outstanding else self._started
        self.slots.publish(self.position, self._started, done_below)

    def read_barrier(self) -> tuple[Position | None, Barrier]:
        """At the start of a global read: the highest commit known anywhere, and the lookups to await."""
        best: Position | None = None
        waits = []
        for i, (position, started, done_below) in enumerate(self.slots.read_all()):
            if position is not None and (best is None or position > best):
                best = position
            if done_below < started:
                waits.append((i, started))
        return best, tuple(waits)

    def barrier_passed(self, barrier: Barrier) -> bool:
        """Every lookup in flight when the read began has ended (then read the position again)."""
        if not barrier:
            return True
        slots = self.slots.read_all()
        return all(slots[i][2] >= ticket for i, ticket in barrier)
