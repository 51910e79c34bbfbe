"""Where a read that must see earlier writes runs: the causal-reads decision, without I/O.

Asked before a read is routed to a replica, with the WAL position the read must
see (``requirement.py``), the replicas the group would choose from (banned and
lagging ones already left out), what is known of their replay positions
(``positions.py``), the time and the read's deadline. The answer is one of:

* ``Serve(server)``: that server has replayed the position; run the read there.
  Chosen among every caught-up replica with the pool's load balancing; with
  primary reads allowed (role ``any``) the primary is always caught up and
  takes part in that choice, so such a read never waits.
* ``Wait(check, until)``: no replica is known to be caught up yet. Ask the
  replicas in ``check`` (those not asked within the recheck interval) for
  ``pg_last_wal_replay_lsn()``, report each answer to the position table, and
  decide again when an answer arrives or at ``until``. (``wait.py`` polls every
  candidate while reads wait on it, and wakes a read only when it can be served.)
* ``UsePrimary(reason)``: the replicas are on another timeline than the write
  (a promotion happened): the primary serves until a replica is known to follow.
* ``Fail(sqlstate, message)``: the deadline passed and the read may not run
  on the primary; the message names the lag.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

from pypool import sqlstates
from pypool.causal.lsn import Position, describe_bytes, format_lsn, lag_bytes
from pypool.causal.positions import ReplicaPositions

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Serve(Generic[K]):
    server: K


@dataclass(frozen=True, slots=True)
class Wait(Generic[K]):
    check: tuple[K, ...]  # ask these now (the caller marks them with check_started)
    until: float  # decide again at this time at the latest


@dataclass(frozen=True, slots=True)
class UsePrimary:
    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    sqlstate: str
    message: str


Decision = Serve | Wait | UsePrimary | Fail


def decide(required: Position, replicas: Sequence[K], positions: ReplicaPositions[K], *, now: float,
           deadline: float, timeout_ms: int, pick: Callable[[Sequence[K]], K],
           primary: K | None = None, label: Callable[[K], str] = str) -> Decision:
    """The next step for a read that must see ``required``; see the module docstring."""
    required = positions.normalize(required)
    ready = [r for r in replicas if positions.caught_up(r, required)]
    if primary is not None:
        ready.append(primary)  # primary reads allowed: the primary has every write
    if ready:
        return Serve(pick(ready))
    if replicas and all(positions.on_other_timeline(r, required) for r in replicas):
        return UsePrimary(f"every replica is on another timeline than {required} (after a promotion)")
    if now >= deadline:
        return Fail(sqlstates.QUERY_CANCELED, _timeout_message(required, replicas, positions, timeout_ms, label))
    check = tuple(r for r in replicas if positions.needs_check(r, now))
    until = deadline
    for r in replicas:
        if r not in check:
            at = positions.next_check_at(r)
            if at is not None and at < until:
                until = at
    return Wait(check, until)


def _timeout_message(required: Position, replicas: Sequence[K], positions: ReplicaPositions[K],
                     timeout_ms: int, label: Callable[[K], str]) -> str:
    parts = []
    for r in replicas:
        known = positions.position(r)
        behind = lag_bytes(known, required)
        if known is None:
            parts.append(f"{label(r)} position unknown")
        elif behind is None:
            parts.append(f"{label(r)} on timeline {known.timeline}")
        else:
            parts.append(f"{label(r)} {describe_bytes(behind)} behind at {format_lsn(known.lsn)}")
    where = "; ".join(parts) if parts else "no replica is usable"
    return (f"causal read timed out: no replica replayed this client's last write "
            f"({format_lsn(required.lsn)}) within causal_reads_timeout = {timeout_ms} ms ({where})")
