"""What pypool knows of each replica's replay position, and how fresh that knowledge is.

Fed by the health monitor every tick (``pg_last_wal_replay_lsn()`` of each
replica, the primary's current position) and by on-demand checks while a read
waits. A replica's replay position only grows, so an old observation is still
a lower bound: a replica known past the needed position serves at once, however
old that knowledge. Freshness only decides when to ask again.

Keys are whatever identifies a server to the caller (a ServerPool, an
address); nothing here touches a socket or a clock: ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

from pypool.causal.lsn import Position

K = TypeVar("K", bound=Hashable)

# A waiting read asks a replica again at most this often (seconds); one check
# in flight per replica serves every read waiting on it.
RECHECK_INTERVAL = 0.002
# A check that never answered (server gone) no longer blocks the next one.
CHECK_GIVE_UP = 1.0


@dataclass(slots=True)
class ReplicaState:
    position: Position | None = None
    observed_at: float | None = None  # when ``position`` was learnt
    checking_since: float | None = None  # an on-demand check is in flight


class ReplicaPositions(Generic[K]):
    def __init__(self, recheck_interval: float = RECHECK_INTERVAL) -> None:
        self.recheck_interval = recheck_interval
        self._replicas: dict[K, ReplicaState] = {}
        # The primary's timeline, and the first position seen on each timeline: after a
        # promotion, everything that survived it lies before that point.
        self.primary_timeline: int | None = None
        self._timeline_start: dict[int, int] = {}

    # ------------------------------------------------------------ observations

    def observe(self, server: K, position: Position | None, now: float) -> None:
        """A replica reported its replay position (None: it could not say, e.g. not in recovery)."""
        state = self._replicas.get(server)
        if state is None:
            state = self._replicas[server] = ReplicaState()
        state.position = position
        state.observed_at = now
        state.checking_since = None

    def observe_primary(self, position: Position) -> None:
        timeline = position.timeline
        if self.primary_timeline is None or timeline > self.primary_timeline:
            self.primary_timeline = timeline
        self._timeline_start.setdefault(timeline, position.lsn)

    def forget(self, server: K) -> None:
        self._replicas.pop(server, None)

    # ------------------------------------------------------------------ checks

    def check_started(self, server: K, now: float) -> None:
        state = self._replicas.get(server)
        if state is None:
            state = self._replicas[server] = ReplicaState()
        state.checking_since = now

    def check_failed(self, server: K, now: float) -> None:
        state = self._replicas.get(server)
        if state is not None:
            state.checking_since = None
            state.observed_at = now  # do not hammer a failing server: next try after the interval

    def needs_check(self, server: K, now: float) -> bool:
        state = self._replicas.get(server)
        if state is None:
            return True
        if state.checking_since is not None and now - state.checking_since < CHECK_GIVE_UP:
            return False
        return state.observed_at is None or now - state.observed_at >= self.recheck_interval

    def next_check_at(self, server: K) -> float | None:
        """When ``needs_check`` turns true again (None: a check is in flight, its answer wakes us)."""
        state = self._replicas.get(server)
        if state is None or state.observed_at is None:
            return None
        if state.checking_since is not None:
            return state.checking_since + CHECK_GIVE_UP
        return state.observed_at + self.recheck_interval

    # ----------------------------------------------------------------- queries

    def position(self, server: K) -> Position | None:
        state = self._replicas.get(server)
        return state.position if state is not None else None

    def normalize(self, required: Position) -> Position:
        """A requirement from before a promotion, moved onto the primary's current timeline.

        The new timeline starts where the promoted server's history ended: a
        replica that replayed the new timeline past the first position pypool saw
        on it holds every write that survived the promotion (and nothing can
        hold those that did not).
        """
        current = self.primary_timeline
        if current is None or required.timeline >= current:
            return required
        return Position(current, max(required.lsn, self._timeline_start[current]))

    def caught_up(self, server: K, required: Position) -> bool:
        state = self._replicas.get(server)
        if state is None or state.position is None:
            return False
        known = state.position
        return known.timeline == required.timeline and known.lsn >= required.lsn

    def on_other_timeline(self, server: K, required: Position) -> bool:
        state = self._replicas.get(server)
        return state is not None and state.position is not None and state.position.timeline != required.timeline
