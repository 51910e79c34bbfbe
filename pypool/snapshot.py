"""Statistics snapshots: plain data taken from the running pooler, mergeable across processes.

Nothing here runs on the relay path. Connections, pools and clients keep plain
integer counters (``ServerConnection.query_count``, ``PoolStats``,
``ClientSession.xact_count`` ...); ``take(app)`` reads them once, on the
event loop, into a ``Snapshot`` made only of strings, numbers, lists and
dicts. The admin console (``SHOW ...``) and the Prometheus exporter render
from a snapshot and never touch live objects, so a process that runs several
workers can collect one snapshot per worker (``Snapshot.to_dict`` /
``from_dict`` travel as JSON or pickle) and ``merge`` them first.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Iterable, Protocol

from pypool.causal.stats import WAIT_BUCKETS as CAUSAL_WAIT_BUCKETS
from pypool.pool.pool import WAIT_BUCKETS, XACT_BUCKETS
from pypool.pool.server import IDLE, SERVER_STATES
from pypool.session.states import CLIENT_STATES, ClientState

if TYPE_CHECKING:
    from pypool.config import Config
    from pypool.pool.group import PoolGroup
    from pypool.pool.pool import ServerPool
    from pypool.routing.router import Router

class ClientSession(Protocol):
    """What a snapshot reads of a client (pypool.session.session.ClientSession)."""

    state: ClientState
    admin: Any  # the admin console (``busy``) when logged in to the admin database
    group: "PoolGroup | None"
    process_id: int
    database: str
    user: str
    session_parameters: dict[str, str]
    xact_count: int
    query_count: int
    error_count: int
    connected_at: float
    wait_started: float
    max_wait: float
    pin_reason: str | None  # why it keeps its server connection across transactions (when PINNED)
    causal: Any  # pypool.causal.requirement.ClientCausal or None: str() is the position its reads must see


STATS_PERIOD = 15.0  # seconds between SHOW STATS average computations (PgCat's period)

# Connection states are PgBouncer's, set by the connections where they change
# (pypool/pool/server.py, pypool/session/states.py); only "used" (idle for longer
# than healthcheck_delay) is told from the clock here.
__all__ = ["CLIENT_STATES", "SERVER_STATES"]

# Causal reads of one (pool, user) by outcome (pypool.causal.stats.CausalStats); merged by summing.
CAUSAL_OUTCOMES = ("at_once", "after_wait", "to_primary", "timed_out")

# Cumulative counters of one address; merged by summing.
COUNTERS = ("xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time", "query_time",
            "queries_timed", "client_parse_count", "server_parse_count", "bind_count", "checkouts",
            "wait_time", "wait_hist_sum", "checkout_timeouts", "connects", "connect_errors", "closed_dirty",
            "bans", "healthchecks", "healthcheck_failures")


@dataclass
class AddressStats:
    """One configured server of one (pool, user): PgCat's "address"."""

    pool: str
    user: str
    host: str
    port: int
    database: str
    role: str  # "primary" | "replica", as pypool routes now (follows failover)
    index: int  # position in the shard's server list (PgCat's address index)
    name: str  # <pool>_shard_<s>_primary / <pool>_shard_<s>_replica_<n>
    pool_mode: str
    pool_size: int
    min_pool_size: int
    shard: int = 0
    paused: bool = False
    banned: bool = False
    healthy: bool = True
    lag_seconds: float | None = None
    ban_reason: str = ""
    banned_at: float = 0.0  # wall clock (epoch seconds)
    ban_duration: float = 0.0
    ban_remaining: float = 0.0
    current_connections: int = 0
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVER_STATES, 0))
    # xact_count, query_count, queries_timed, bytes_*: ints; xact_time, query_time, wait_time,
    # wait_hist_sum: seconds.
    counters: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    xact_hist: list[int] = field(default_factory=lambda: [0] * (len(XACT_BUCKETS) + 1))
    wait_hist: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))

    @property
    def key(self) -> tuple[str, str, int, str, int, int]:
        # A server may be listed as primary and as replica of one shard (its index tells the
        # two apart, and stays when a failover changes the roles), and may serve several shards.
        return (self.pool, self.user, self.shard, self.host, self.port, self.index)

    @property
    def errors(self) -> int:
        return int(self.counters["checkout_timeouts"] + self.counters["connect_errors"])


@dataclass
class PoolStatsRow:
    """One (pool, user): SHOW POOLS."""

    pool: str
    user: str
    pool_mode: str
    clients: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLIENT_STATES, 0))
    cancels_in_flight: int = 0
    cancel_requests: int = 0
    pinned: int = 0  # clients keeping their server connection across transactions (session state)
    maxwait: float = 0.0  # seconds: the longest current wait of a waiting client
    paused: bool = False
    causal_mode: str = "off"
    causal: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSAL_OUTCOMES, 0))
    # Reads that waited for a replica: counts per CAUSAL_WAIT_BUCKETS bound (the last is +Inf), total seconds.
    causal_wait_hist: list[int] = field(default_factory=lambda: [0] * len(CAUSAL_WAIT_BUCKETS))
    causal_wait_sum: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool, self.user)


@dataclass
class ClientRow:
    client_id: int
    database: str
    user: str
    application_name: str
    state: str  # CLIENT_STATES, or "login" (authenticating); admin consoles are "active"/"idle"
    admin: bool
    transaction_count: int
    query_count: int
    error_count: int
    age_seconds: float
    maxwait: float  # seconds
    connected_at: float  # wall clock, for ordering across processes
    pinned: str = ""  # why the client keeps its server connection across transactions; "" = it shares them
    causal_required: str = ""  # the WAL position its next read must see ("pending" while being learnt)


@dataclass
class ServerRow:
    server_id: int  # the backend's process id
    pool: str
    user: str
    address_name: str
    host: str
    port: int
    application_name: str
    state: str  # SERVER_STATES
    transaction_count: int
    query_count: int
    bytes_sent: int
    bytes_received: int
    age_seconds: float
    # The connection's prepared-statement cache (pypool.session.prepared), PgCat's prepare_cache_* columns.
    prepare_cache_hit: int = 0
    prepare_cache_miss: int = 0
    prepare_cache_eviction: int = 0
    prepare_cache_size: int = 0


@dataclass
class RouterStats:
    pool: str
    cache_hits: int = 0
    cache_misses: int = 0
    cache_entries: int = 0
    decisions: dict[str, int] = field(default_factory=dict)


@dataclass
class Snapshot:
    taken_at: float = 0.0  # wall clock
    addresses: list[AddressStats] = field(default_factory=list)
    pools: list[PoolStatsRow] = field(default_factory=list)
    clients: list[ClientRow] = field(default_factory=list)
    servers: list[ServerRow] = field(default_factory=list)
    routers: list[RouterStats] = field(default_factory=list)
    reloads_ok: int = 0
    reloads_failed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Snapshot":
        return cls(
            taken_at=data["taken_at"],
            addresses=[AddressStats(**a) for a in data["addresses"]],
            pools=[PoolStatsRow(**p) for p in data["pools"]],
            clients=[ClientRow(**c) for c in data["clients"]],
            servers=[ServerRow(**s) for s in data["servers"]],
            routers=[RouterStats(**r) for r in data["routers"]],
            reloads_ok=data["reloads_ok"],
            reloads_failed=data["reloads_failed"],
        )


# ------------------------------------------------------------------ merging

def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One snapshot from several processes' snapshots: counters, connection counts and pool
    size shares add up; roles and ban state come from the first process that reports the address."""
    out = Snapshot()
    addresses: dict[tuple, AddressStats] = {}
    pools: dict[tuple, PoolStatsRow] = {}
    routers: dict[str, RouterStats] = {}
    for snap in snapshots:
        out.taken_at = max(out.taken_at, snap.taken_at)
        out.clients.extend(snap.clients)
        out.servers.extend(snap.servers)
        out.reloads_ok = max(out.reloads_ok, snap.reloads_ok)
        out.reloads_failed = max(out.reloads_failed, snap.reloads_failed)
        for a in snap.addresses:
            into = addresses.get(a.key)
            if into is None:
                addresses[a.key] = dataclasses.replace(a, states=dict(a.states), counters=dict(a.counters),
                                                       xact_hist=list(a.xact_hist), wait_hist=list(a.wait_hist))
                continue
            into.current_connections += a.current_connections
            # Each worker process runs its share of the pool: the instance runs the sum.
            into.pool_size += a.pool_size
            into.min_pool_size += a.min_pool_size
            into.paused = into.paused or a.paused
            _add(into.states, a.states)
            _add(into.counters, a.counters)
            into.xact_hist = [x + y for x, y in zip(into.xact_hist, a.xact_hist)]
            into.wait_hist = [x + y for x, y in zip(into.wait_hist, a.wait_hist)]
        for p in snap.pools:
            into = pools.get(p.key)
            if into is None:
                pools[p.key] = dataclasses.replace(p, clients=dict(p.clients), causal=dict(p.causal),
                                                   causal_wait_hist=list(p.causal_wait_hist))
                continue
            _add(into.clients, p.clients)
            _add(into.causal, p.causal)
            into.causal_wait_hist = [x + y for x, y in zip(into.causal_wait_hist, p.causal_wait_hist)]
            into.causal_wait_sum += p.causal_wait_sum
            into.cancels_in_flight += p.cancels_in_flight
            into.cancel_requests += p.cancel_requests
            into.pinned += p.pinned
            into.maxwait = max(into.maxwait, p.maxwait)
            into.paused = into.paused or p.paused
        for r in snap.routers:
            into = routers.get(r.pool)
            if into is None:
                routers[r.pool] = dataclasses.replace(r, decisions=dict(r.decisions))
                continue
            into.cache_hits += r.cache_hits
            into.cache_misses += r.cache_misses
            into.cache_entries = max(into.cache_entries, r.cache_entries)
            _add(into.decisions, r.decisions)
    out.addresses = sorted(addresses.values(), key=lambda a: (a.pool, a.user, a.index))
    out.pools = sorted(pools.values(), key=lambda p: p.key)
    out.routers = sorted(routers.values(), key=lambda r: r.pool)
    out.clients.sort(key=lambda c: c.connected_at)
    return out


def _add(into: dict, other: dict) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


# --------------------------------------------------------- taking a snapshot

def _live(sp: "ServerPool") -> list:
    return [c for c in list(sp.connections) if not c.closed and c.pool is sp]


def _server_state(conn, now: float, check_delay: float) -> str:
    state = conn.state
    if state == IDLE and check_delay and now - conn.last_used > check_delay:
        return "used"
    return state


class StatsSource(Protocol):
    """What ``take`` reads of the running pooler (``pypool.app.Application`` is one)."""

    config: Config
    groups: dict[tuple[str, str, int], PoolGroup]
    draining: list[PoolGroup]  # replaced by a reload, still closing
    clients: Collection[ClientSession]
    routers: dict[str, Router]
    reloads_ok: int
    reloads_failed: int


def take(app: StatsSource) -> Snapshot:
    """Read every counter of the running pooler. Call on the event loop thread."""
    now = time.monotonic()
    wall = time.time()
    check_delay = app.config.general.healthcheck_delay / 1000
    snap = Snapshot(taken_at=wall, reloads_ok=app.reloads_ok, reloads_failed=app.reloads_failed)
    addresses: dict[tuple, AddressStats] = {}
    seen_stats: set[int] = set()  # a reload hands a pool's PoolStats to its successor: count once
    live_groups = list(app.groups.values())
    for group in live_groups + list(app.draining):
        draining = group not in live_groups
        for sp in group.all_pools:
            key = (group.name, group.user.username, group.shard, sp.address)
            a = addresses.get(key)
            if a is None:
                if draining:
                    continue  # a server no longer configured: its draining connections are not shown
                a = addresses[key] = _address(group, sp, now)
            _count_pool(a, sp, seen_stats, now, check_delay, snap.servers)
    for a in addresses.values():
        # Checkouts served at once never went through the slow path: zero-second waits.
        a.wait_hist[0] += max(0, int(a.counters["checkouts"]) - sum(a.wait_hist))
    snap.addresses = sorted(addresses.values(), key=lambda a: (a.pool, a.user, a.shard, a.index))

    pools: dict[tuple, PoolStatsRow] = {}
    for (name, user, _), group in app.groups.items():
        row = pools.get((name, user))
        if row is None:
            row = pools[(name, user)] = PoolStatsRow(name, user, group.pool_mode, causal_mode=group.causal.mode)
        row.paused = row.paused or any(sp.paused for sp in group.all_pools)
        causal = group.causal.stats  # a rebuilt group inherits its predecessor's: count live groups only
        for outcome in CAUSAL_OUTCOMES:
            row.causal[outcome] += getattr(causal, outcome)
        row.causal_wait_hist = [x + y for x, y in zip(row.causal_wait_hist, causal.wait_counts)]
        row.causal_wait_sum += causal.wait_sum
    for group in live_groups + list(app.draining):
        row = pools.get((group.name, group.user.username))
        if row is not None:
            row.cancels_in_flight += group.cancels_in_flight
            row.cancel_requests += group.cancel_requests
    for client in sorted(app.clients, key=lambda c: c.connected_at):
        snap.clients.append(_client_row(client, now, wall))
        group = client.group
        if group is None or not client.state.relaying:
            continue
        row = pools.get((group.name, group.user.username))
        if row is None:
            continue
        state = client.state.shown
        row.clients[state] += 1
        if client.state is ClientState.PINNED:
            row.pinned += 1
        if state == "waiting" and client.wait_started:
            row.maxwait = max(row.maxwait, now - client.wait_started)
    snap.pools = sorted(pools.values(), key=lambda p: p.key)

    for name in sorted(app.config.pools):
        router = app.routers.get(name)
        if router is not None:
            cache = router.cache
            snap.routers.append(RouterStats(name, cache.hits, cache.misses, len(cache), dict(router.decisions)))
    return snap


def _address(group: "PoolGroup", sp: "ServerPool", now: float) -> AddressStats:
    shard = group.config.shards[group.shard]
    index = next((i for i, s in enumerate(shard.servers) if s == sp.address), 0)
    if sp is group.primary:
        role, name = "primary", f"{group.name}_shard_{group.shard}_primary"
    else:
        replica = group.replicas.index(sp) if sp in group.replicas else 0
        role, name = "replica", f"{group.name}_shard_{group.shard}_replica_{replica}"
    remaining = sp.banned_until - now
    banned = remaining > 0
    return AddressStats(
        pool=group.name, user=group.user.username, host=sp.address.host, port=sp.address.port,
        database=shard.database, role=role, index=index, name=name, shard=group.shard,
        pool_mode=group.pool_mode, pool_size=sp.settings.pool_size, min_pool_size=sp.settings.min_pool_size,
        paused=sp.paused, banned=banned, healthy=sp.healthy,
        lag_seconds=None if sp.lag_ms is None else sp.lag_ms / 1000,
        ban_reason=sp.ban_reason if banned else "", banned_at=sp.banned_at if banned else 0.0,
        ban_duration=sp.ban_duration if banned else 0.0, ban_remaining=max(0.0, remaining))


# snapshot counter -> PoolStats attribute
_POOL_STATS_FIELDS = {
    "xact_count": "xact_count", "query_count": "query_count", "bytes_received": "bytes_received",
    "bytes_sent": "bytes_sent", "xact_time": "xact_time", "query_time": "query_time",
    "queries_timed": "queries_timed", "client_parse_count": "client_parse_count",
    "server_parse_count": "server_parse_count", "bind_count": "bind_count", "checkouts": "checkouts",
    "wait_time": "checkout_wait_time", "wait_hist_sum": "wait_hist_sum", "checkout_timeouts": "checkout_timeouts",
    "connects": "connects", "connect_errors": "connect_errors", "closed_dirty": "closed_dirty",
    "healthchecks": "healthchecks", "healthcheck_failures": "healthcheck_failures",
}
_CONNECTION_FIELDS = ("xact_count", "query_count", "bytes_received", "bytes_sent")


def _count_pool(a: AddressStats, sp: "ServerPool", seen_stats: set[int], now: float, check_delay: float,
                servers: list[ServerRow]) -> None:
    c = a.counters
    c["bans"] += sp.bans
    stats = sp.stats
    if id(stats) not in seen_stats:
        seen_stats.add(id(stats))
        for counter, attribute in _POOL_STATS_FIELDS.items():
            c[counter] += getattr(stats, attribute)
        a.xact_hist = [x + y for x, y in zip(a.xact_hist, stats.xact_hist)]
        a.wait_hist = [x + y for x, y in zip(a.wait_hist, stats.wait_hist)]
    for conn in list(sp.connections):
        if not conn._folded:  # live connections: their counts are not in PoolStats yet
            for counter in _CONNECTION_FIELDS:
                c[counter] += getattr(conn, counter)
            ps = conn.statements
            if ps is not None:
                c["client_parse_count"] += ps.parses
                c["server_parse_count"] += ps.misses
                c["bind_count"] += ps.binds
    live = _live(sp)
    for conn in live:
        state = _server_state(conn, now, check_delay)
        a.states[state] += 1
        ps = conn.statements
        cache = (ps.hits, ps.misses, ps.evictions, len(ps.names)) if ps is not None else (0, 0, 0, 0)
        servers.append(ServerRow(conn.backend_pid, a.pool, a.user, a.name, a.host, a.port,
                                 conn.applied_parameters.get("application_name", ""), state, conn.xact_count,
                                 conn.query_count, conn.bytes_sent, conn.bytes_received, now - conn.created_at,
                                 *cache))
    a.states["login"] += max(0, sp.size - len(live))
    a.current_connections += sp.size


def _client_row(client: "ClientSession", now: float, wall: float) -> ClientRow:
    if client.admin is not None:
        state = "active" if client.admin.busy else "idle"
    else:
        state = client.state.shown
    current_wait = now - client.wait_started if client.wait_started else 0.0
    return ClientRow(client.process_id, client.database or "", client.user or "",
                     client.session_parameters.get("application_name", ""), state, client.admin is not None,
                     client.xact_count, client.query_count, client.error_count, now - client.connected_at,
                     max(client.max_wait, current_wait), wall - (now - client.connected_at),
                     (client.pin_reason or "") if client.state is ClientState.PINNED else "",
                     str(client.causal) if client.causal is not None else "")


# ------------------------------------------------------------------ averages

# What Averager.get gives for an address before its second sample.
NO_AVERAGES = dict.fromkeys(("xact_count", "query_count", "recv", "sent", "errors", "xact_time", "query_time",
                             "wait_time", "server_assignment_count", "queries_timed", "client_parse_count",
                             "server_parse_count", "bind_count"), 0.0)


class Averager:
    """Per-second rates and per-event times over the last stats period (SHOW STATS avg_*).

    Fed with snapshots (merged ones when several processes serve), so it
    computes the same numbers whatever produced them.
    """

    def __init__(self, period: float = STATS_PERIOD) -> None:
        self.period = period
        self._previous: dict[tuple, tuple[float, dict[str, float]]] = {}
        self.averages: dict[tuple, dict[str, float]] = {}

    @staticmethod
    def _sample(a: AddressStats) -> dict[str, float]:
        return {**a.counters, "errors": a.errors, "xact_timed": sum(a.xact_hist)}

    def roll(self, snap: Snapshot, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        seen = set()
        for a in snap.addresses:
            seen.add(a.key)
            sample = self._sample(a)
            previous = self._previous.get(a.key)
            self._previous[a.key] = (now, sample)
            if previous is None:
                continue
            then, old = previous
            elapsed = max(now - then, 1e-9)
            d = {k: max(0.0, v - old.get(k, 0)) for k, v in sample.items()}
            self.averages[a.key] = {
                "xact_count": d["xact_count"] / elapsed,
                "query_count": d["query_count"] / elapsed,
                "recv": d["bytes_received"] / elapsed,
                "sent": d["bytes_sent"] / elapsed,
                "errors": d["errors"] / elapsed,
                # Times are averages per event, in microseconds, like PgBouncer's.
                "xact_time": d["xact_time"] / d["xact_timed"] * 1e6 if d["xact_timed"] else 0.0,
                "query_time": d["query_time"] / d["queries_timed"] * 1e6 if d["queries_timed"] else 0.0,
                "wait_time": d["wait_time"] / d["checkouts"] * 1e6 if d["checkouts"] else 0.0,
                "server_assignment_count": d["checkouts"] / elapsed,
                "queries_timed": d["queries_timed"] / elapsed,  # weighs query_time when merged per database
                "client_parse_count": d["client_parse_count"] / elapsed,
                "server_parse_count": d["server_parse_count"] / elapsed,
                "bind_count": d["bind_count"] / elapsed,
            }
        for key in list(self._previous):
            if key not in seen:
                del self._previous[key]
                self.averages.pop(key, None)

    def get(self, key: tuple) -> dict[str, float]:
        return self.averages.get(key) or dict(NO_AVERAGES)
