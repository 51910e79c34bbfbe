"""Statistics views and the Prometheus exporter.

Nothing here runs on the relay path. Connections, pools and clients keep
plain integer counters (``ServerConnection.query_count``, ``PoolStats``,
``ClientConnection.xact_count`` ...); this module reads them when asked --
by an admin ``SHOW`` command or a Prometheus scrape -- and turns them into
rows and metric families.

Two metric families are exported:

* ``pgcat_*``: PgCat's own names and labels (``pools_*``, ``servers_*``,
  ``stats_*``, ``databases_*``), so PgCat's Grafana dashboard works
  unchanged. The per-server series also carry ``user`` besides PgCat's
  ``username``, because the dashboard filters them by ``user``. PgCat types
  its ``stats_total_*`` and ``servers_*`` counts as counters without the
  ``_total`` suffix; the client library would rename such counters, so they
  are exported untyped under PgCat's exact names.
* ``pypool_*``: pypool's own family, named the Prometheus way (base units,
  ``_total`` counters, histograms for transaction time and checkout wait).

The exporter is prometheus-client's WSGI server in a daemon thread, so HTTP
parsing and text formatting stay off the event loop. The collector itself
does not read live objects from that thread: it asks the event loop (with
``call_soon_threadsafe``) to take the snapshot, so every number in a scrape
comes from one consistent instant and no dict or set is ever iterated while
the loop mutates it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from pypool import __version__
from pypool.pool.pool import WAIT_BUCKETS, XACT_BUCKETS

if TYPE_CHECKING:
    from pypool.app import Application
    from pypool.client import ClientConnection
    from pypool.pool.group import PoolGroup
    from pypool.pool.pool import PoolStats, ServerPool

log = logging.getLogger("pypool.metrics")

STATS_PERIOD = 15.0  # seconds between average computations (PgCat's period)
SCRAPE_TIMEOUT = 5.0  # seconds the HTTP thread waits for the event loop's snapshot


# --------------------------------------------------------------------------- views

@dataclass
class AddressView:
    """One configured server of one (pool, user): PgCat's "address".

    ``pools`` holds the live ServerPool first, then any pool a config reload
    replaced that still drains connections to the same server.
    """

    pool_name: str
    user: str
    host: str
    port: int
    database: str
    role: str  # "primary" | "replica", as pypool routes now (follows failover)
    index: int  # position in the shard's server list (PgCat's address index)
    name: str  # PgCat's address name: <pool>_shard_0_primary / <pool>_shard_0_replica_<n>
    group: "PoolGroup"
    pools: list["ServerPool"] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.pool_name, self.user, self.host, self.port)

    @property
    def current(self) -> "ServerPool":
        return self.pools[0]


def _live(sp: "ServerPool") -> list:
    return [c for c in list(sp.connections) if not c.closed and c.pool is sp]


def address_views(app: "Application") -> list[AddressView]:
    """Every (pool, user, server) in the running config, in config order, plus draining pools."""
    views: dict[tuple[str, str, str, int], AddressView] = {}
    for draining in (False, True):
        groups = app.draining if draining else list(app.groups.values())
        for group in groups:
            servers = group.config.shards[0].servers if group.config.shards else ()
            replicas = list(group.replicas)
            for sp in group.all_pools:
                key = (group.name, group.user.username, sp.address.host, sp.address.port)
                view = views.get(key)
                if view is not None:
                    view.pools.append(sp)
                    continue
                if draining:
                    continue  # a server no longer configured: its draining connections are not shown
                role = "primary" if sp is group.primary else "replica"
                index = next((i for i, s in enumerate(servers)
                              if s.host == sp.address.host and s.port == sp.address.port), 0)
                name = (f"{group.name}_shard_0_primary" if role == "primary"
                        else f"{group.name}_shard_0_replica_{replicas.index(sp) if sp in replicas else 0}")
                views[key] = AddressView(group.name, group.user.username, sp.address.host, sp.address.port,
                                         group.config.shards[0].database, role, index, name, group, [sp])
    return sorted(views.values(), key=lambda v: (v.pool_name, v.user, v.index))


@dataclass
class Totals:
    """Cumulative counts for one address (all connections ever made, draining ones included)."""

    query_count: int = 0
    xact_count: int = 0
    bytes_received: int = 0  # from the server
    bytes_sent: int = 0  # to the server
    xact_time: float = 0.0  # seconds, timed transactions only
    xact_timed: int = 0
    xact_hist: list[int] = field(default_factory=lambda: [0] * (len(XACT_BUCKETS) + 1))
    wait_hist: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))
    wait_hist_sum: float = 0.0
    checkouts: int = 0
    wait_time: float = 0.0  # seconds
    checkout_timeouts: int = 0
    connects: int = 0
    connect_errors: int = 0
    closed_dirty: int = 0
    bans: int = 0

    @property
    def errors(self) -> int:
        return self.checkout_timeouts + self.connect_errors


def totals(view: AddressView) -> Totals:
    t = Totals()
    seen: set[int] = set()
    for sp in view.pools:
        t.bans += sp.bans
        stats: PoolStats = sp.stats
        if id(stats) not in seen:  # a reload hands the same PoolStats to the new pool
            seen.add(id(stats))
            t.query_count += stats.query_count
            t.xact_count += stats.xact_count
            t.bytes_received += stats.bytes_received
            t.bytes_sent += stats.bytes_sent
            t.xact_time += stats.xact_time
            for i, n in enumerate(stats.xact_hist):
                t.xact_hist[i] += n
            for i, n in enumerate(stats.wait_hist):
                t.wait_hist[i] += n
            t.wait_hist_sum += stats.wait_hist_sum
            t.checkouts += stats.checkouts
            t.wait_time += stats.checkout_wait_time
            t.checkout_timeouts += stats.checkout_timeouts
            t.connects += stats.connects
            t.connect_errors += stats.connect_errors
            t.closed_dirty += stats.closed_dirty
        for conn in list(sp.connections):
            if not conn._folded:
                t.query_count += conn.query_count
                t.xact_count += conn.xact_count
                t.bytes_received += conn.bytes_received
                t.bytes_sent += conn.bytes_sent
    t.xact_timed = sum(t.xact_hist)
    # Checkouts served at once never went through the slow path: zero-second waits.
    t.wait_hist[0] += max(0, t.checkouts - sum(t.wait_hist))
    return t


SERVER_STATES = ("active", "idle", "used", "tested", "login")


def server_state(conn, sp: "ServerPool", now: float, check_delay: float) -> str:
    """PgBouncer's vocabulary: active (linked to a client), idle, used (idle longer than
    healthcheck_delay), tested (checked out by pypool itself: syncing parameters,
    replaying a held BEGIN, DISCARD ALL after a session)."""
    if conn.client is not None:
        return "active"
    if conn in sp.idle:
        return "used" if check_delay and now - conn.last_used > check_delay else "idle"
    return "tested"


def server_states(view: AddressView, check_delay: float, now: float | None = None) -> dict[str, int]:
    now = time.monotonic() if now is None else now
    counts = dict.fromkeys(SERVER_STATES, 0)
    for sp in view.pools:
        live = _live(sp)
        idle = set(map(id, sp.idle))
        for conn in live:
            if conn.client is not None:
                counts["active"] += 1
            elif id(conn) in idle:
                counts["used" if check_delay and now - conn.last_used > check_delay else "idle"] += 1
            else:
                counts["tested"] += 1
        counts["login"] += max(0, sp.size - len(live))
    return counts


def client_state(client: "ClientConnection") -> str:
    if client.server is not None:
        return "active"
    if client._checkout_task is not None or client._queued is not None:
        return "waiting"
    return "idle"


def client_wait(client: "ClientConnection", now: float) -> float:
    """The client's longest wait for a server, the current one included (seconds)."""
    current = now - client.wait_started if client.wait_started else 0.0
    return max(client.max_wait, current)


@dataclass
class PoolView:
    """One (pool, user): the current PoolGroup and any draining predecessors."""

    pool_name: str
    user: str
    group: "PoolGroup"
    groups: list["PoolGroup"]
    clients: list["ClientConnection"] = field(default_factory=list)

    @property
    def paused(self) -> bool:
        return any(sp.paused for sp in self.group.all_pools)


def pool_views(app: "Application") -> list[PoolView]:
    views: dict[tuple[str, str], PoolView] = {}
    for (name, user), group in app.groups.items():
        views[(name, user)] = PoolView(name, user, group, [group])
    for group in app.draining:
        view = views.get((group.name, group.user.username))
        if view is not None:
            view.groups.append(group)
    for client in list(app.clients):
        group = client.group
        if group is None or client.admin is not None:
            continue
        view = views.get((group.name, group.user.username))
        if view is not None:
            view.clients.append(client)
    return sorted(views.values(), key=lambda v: (v.pool_name, v.user))


def pool_counts(app: "Application", view: PoolView, now: float | None = None) -> dict[str, int]:
    """SHOW POOLS numbers for one (pool, user)."""
    now = time.monotonic() if now is None else now
    check_delay = app.config.general.healthcheck_delay / 1000
    counts = {"cl_idle": 0, "cl_active": 0, "cl_waiting": 0,
              "cl_cancel_req": sum(g.cancels_in_flight for g in view.groups)}
    maxwait = 0.0
    for client in view.clients:
        state = client_state(client)
        counts["cl_" + state] += 1
        if state == "waiting" and client.wait_started:
            maxwait = max(maxwait, now - client.wait_started)
    servers = dict.fromkeys(SERVER_STATES, 0)
    for address in address_views(app):
        if (address.pool_name, address.user) == (view.pool_name, view.user):
            for state, n in server_states(address, check_delay, now).items():
                servers[state] += n
    for state in SERVER_STATES:
        counts["sv_" + state] = servers[state]
    counts["maxwait_us_total"] = int(maxwait * 1_000_000)
    return counts


class Averager:
    """Per-second rates and per-transaction times over the last stats period (SHOW STATS avg_*)."""

    FIELDS = ("xact_count", "query_count", "bytes_received", "bytes_sent", "errors",
              "xact_time", "xact_timed", "wait_time", "checkouts")

    def __init__(self, period: float = STATS_PERIOD) -> None:
        self.period = period
        self._previous: dict[tuple, tuple[float, dict[str, float]]] = {}
        self.averages: dict[tuple, dict[str, float]] = {}

    @staticmethod
    def _sample(t: Totals) -> dict[str, float]:
        return {"xact_count": t.xact_count, "query_count": t.query_count, "bytes_received": t.bytes_received,
                "bytes_sent": t.bytes_sent, "errors": t.errors, "xact_time": t.xact_time,
                "xact_timed": t.xact_timed, "wait_time": t.wait_time, "checkouts": t.checkouts}

    def roll(self, app: "Application") -> None:
        now = time.monotonic()
        seen = set()
        for view in address_views(app):
            key = view.key
            seen.add(key)
            sample = self._sample(totals(view))
            previous = self._previous.get(key)
            self._previous[key] = (now, sample)
            if previous is None:
                continue
            then, old = previous
            elapsed = max(now - then, 1e-9)
            d = {k: max(0.0, sample[k] - old[k]) for k in self.FIELDS}
            self.averages[key] = {
                "xact_count": d["xact_count"] / elapsed,
                "query_count": d["query_count"] / elapsed,
                "recv": d["bytes_received"] / elapsed,
                "sent": d["bytes_sent"] / elapsed,
                "errors": d["errors"] / elapsed,
                # Times are averages per event, in microseconds, like PgBouncer's.
                "xact_time": d["xact_time"] / d["xact_timed"] * 1e6 if d["xact_timed"] else 0.0,
                "query_time": 0.0,
                "wait_time": d["wait_time"] / d["checkouts"] * 1e6 if d["checkouts"] else 0.0,
                "server_assignment_count": d["checkouts"] / elapsed,
            }
        for key in list(self._previous):
            if key not in seen:
                del self._previous[key]
                self.averages.pop(key, None)

    def get(self, key: tuple) -> dict[str, float]:
        return self.averages.get(key) or dict.fromkeys(
            ("xact_count", "query_count", "recv", "sent", "errors", "xact_time", "query_time", "wait_time",
             "server_assignment_count"), 0.0)


# ------------------------------------------------------------------- collector

def _untyped(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "unknown")


_PGCAT_LABELS = ["host", "shard", "role", "pool", "index", "database", "username", "user"]


def _pgcat_labels(v: AddressView) -> list[str]:
    return [v.host, "0", v.role, v.pool_name, str(v.index), v.database, v.user, v.user]


def _labels_dict(names: list[str], values: list[str]) -> dict[str, str]:
    return dict(zip(names, values))


def collect_families(app: "Application") -> list[Metric]:
    """Every metric family, built from live objects. Runs on the event loop thread."""
    now = time.monotonic()
    general = app.config.general
    check_delay = general.healthcheck_delay / 1000
    addresses = address_views(app)
    pools = pool_views(app)
    out: list[Metric] = []

    # ---------------------------------------------------------------- pgcat_*
    stats_help = {
        "total_query_count": "Number of queries sent by all clients",
        "total_query_time": "Total amount of time for queries to execute (not measured by pypool: 0)",
        "total_received": "Number of bytes received from the server",
        "total_sent": "Number of bytes sent to the server",
        "total_xact_count": "Total number of transactions started by the client",
        "total_xact_time": "Total amount of time for all transactions to execute (microseconds)",
        "total_wait_time": "Total time client waited for a server connection (microseconds)",
        "avg_query_count": "Average of total_query_count every 15 seconds",
        "avg_query_time": "Average time taken for queries to execute every 15 seconds",
        "avg_recv": "Average of total_received bytes every 15 seconds",
        "avg_sent": "Average of total_sent bytes every 15 seconds",
        "avg_errors": "Average number of errors every 15 seconds",
        "avg_xact_count": "Average of total_xact_count every 15 seconds",
        "avg_xact_time": "Average of total_xact_time every 15 seconds",
        "avg_wait_time": "Average of total_wait_time every 15 seconds",
    }
    stats_families = {}
    for key, doc in stats_help.items():
        name = "pgcat_stats_" + key
        stats_families[key] = _untyped(name, doc) if key.startswith("total") else GaugeMetricFamily(name, doc)
    for v in addresses:
        t = totals(v)
        avg = app.averager.get(v.key)
        labels = _labels_dict(_PGCAT_LABELS, _pgcat_labels(v))
        values = {
            "total_query_count": t.query_count, "total_query_time": 0, "total_received": t.bytes_received,
            "total_sent": t.bytes_sent, "total_xact_count": t.xact_count,
            "total_xact_time": int(t.xact_time * 1e6), "total_wait_time": int(t.wait_time * 1e6),
            "avg_query_count": avg["query_count"], "avg_query_time": avg["query_time"], "avg_recv": avg["recv"],
            "avg_sent": avg["sent"], "avg_errors": avg["errors"], "avg_xact_count": avg["xact_count"],
            "avg_xact_time": avg["xact_time"], "avg_wait_time": avg["wait_time"],
        }
        for key, family in stats_families.items():
            family.add_sample(family.name, labels, values[key])
    out.extend(stats_families.values())

    pool_help = {
        "maxwait_us": "The time a client waited for a server connection in microseconds",
        "maxwait": "The time a client waited for a server connection in seconds",
        "cl_waiting": "How many clients are waiting for a connection from the pool",
        "cl_active": "How many clients are actively communicating with a server",
        "cl_idle": "How many clients are idle",
        "sv_idle": "How many server connections are idle",
        "sv_active": "How many server connections are actively communicating with a client",
        "sv_login": "How many server connections are currently being created",
        "sv_tested": "How many server connections are currently waiting on a health check to succeed",
    }
    pool_families = {k: GaugeMetricFamily("pgcat_pools_" + k, doc, labels=["pool", "user"])
                     for k, doc in pool_help.items()}
    pool_counts_by_key = {}
    for pv in pools:
        counts = pool_counts(app, pv, now)
        pool_counts_by_key[(pv.pool_name, pv.user)] = counts
        wait_us = counts["maxwait_us_total"]
        values = {**counts, "maxwait": wait_us // 1_000_000, "maxwait_us": wait_us % 1_000_000}
        for key, family in pool_families.items():
            family.add_metric([pv.pool_name, pv.user], values[key])
    out.extend(pool_families.values())

    server_counters = {
        "bytes_received": "Volume in bytes of network traffic received by server",
        "bytes_sent": "Volume in bytes of network traffic sent by server",
        "transaction_count": "Number of transactions executed by server",
        "query_count": "Number of queries executed by server",
        "error_count": "Number of errors",
    }
    server_gauges = {
        "idle_count": "Number of server connection in idle state",
        "active_count": "Number of server connection in active state",
        "tested_count": "Number of server connection in tested state",
        "login_count": "Number of server connection in login state",
        "is_banned": "0 if server is not banned, 1 if server is banned",
        "is_paused": "0 if server is not paused, 1 if server is paused",
    }
    server_families = {k: _untyped("pgcat_servers_" + k, doc) for k, doc in server_counters.items()}
    server_families.update({k: GaugeMetricFamily("pgcat_servers_" + k, doc) for k, doc in server_gauges.items()})
    db_families = {
        "pool_size": GaugeMetricFamily("pgcat_databases_pool_size", "Maximum number of server connections"),
        "current_connections": GaugeMetricFamily("pgcat_databases_current_connections",
                                                 "Current number of connections for this database"),
    }
    per_address = []
    for v in addresses:
        t = totals(v)
        states = server_states(v, check_delay, now)
        per_address.append((v, t, states))
        labels = _labels_dict(_PGCAT_LABELS, _pgcat_labels(v))
        values = {
            "bytes_received": t.bytes_received, "bytes_sent": t.bytes_sent, "transaction_count": t.xact_count,
            "query_count": t.query_count, "error_count": t.errors,
            "idle_count": states["idle"] + states["used"], "active_count": states["active"],
            "tested_count": states["tested"], "login_count": states["login"],
            "is_banned": int(v.group.is_banned(v.current)), "is_paused": int(v.current.paused),
        }
        for key, family in server_families.items():
            family.add_sample(family.name, labels, values[key])
        db_families["pool_size"].add_sample("pgcat_databases_pool_size", labels, v.current.settings.pool_size)
        db_families["current_connections"].add_sample("pgcat_databases_current_connections", labels,
                                                      sum(sp.size for sp in v.pools))
    out.extend(server_families.values())
    out.extend(db_families.values())

    # ---------------------------------------------------------------- pypool_*
    info = GaugeMetricFamily("pypool_info", "pypool version", labels=["version"])
    info.add_metric([__version__], 1)
    out.append(info)

    clients = GaugeMetricFamily("pypool_client_connections",
                                "Logged-in client connections by pool, user and state", labels=["pool", "user", "state"])
    waiting_max = GaugeMetricFamily("pypool_client_max_wait_seconds",
                                    "Longest current wait of a client for a server connection",
                                    labels=["pool", "user"])
    paused = GaugeMetricFamily("pypool_pool_paused", "1 while the pool is paused by the admin PAUSE command",
                               labels=["pool", "user"])
    cancels = CounterMetricFamily("pypool_cancel_requests", "CancelRequests forwarded to a server",
                                  labels=["pool", "user"])
    for pv in pools:
        counts = pool_counts_by_key[(pv.pool_name, pv.user)]
        for state in ("active", "idle", "waiting"):
            clients.add_metric([pv.pool_name, pv.user, state], counts["cl_" + state])
        waiting_max.add_metric([pv.pool_name, pv.user], counts["maxwait_us_total"] / 1e6)
        paused.add_metric([pv.pool_name, pv.user], int(pv.paused))
        cancels.add_metric([pv.pool_name, pv.user], sum(g.cancel_requests for g in pv.groups))
    logins = GaugeMetricFamily("pypool_client_logins_in_progress", "Client connections still in startup or "
                               "authentication")
    admins = GaugeMetricFamily("pypool_admin_connections", "Client connections to the admin console")
    all_clients = list(app.clients)
    logins.add_metric([], sum(1 for c in all_clients if c.group is None and c.admin is None))
    admins.add_metric([], sum(1 for c in all_clients if c.admin is not None))
    out.extend([clients, waiting_max, paused, cancels, logins, admins])

    server_labels = ["pool", "user", "host", "port", "role"]
    servers = GaugeMetricFamily("pypool_server_connections", "Server connections by state (PgBouncer's "
                                "vocabulary: active, idle, used, tested, login)", labels=server_labels + ["state"])
    max_conns = GaugeMetricFamily("pypool_server_pool_size", "pool_size: the most connections pypool opens "
                                  "to this server for this pool and user", labels=server_labels)
    xacts = CounterMetricFamily("pypool_transactions", "Transactions relayed", labels=server_labels)
    queries = CounterMetricFamily("pypool_queries", "Requests relayed (each ends in a ReadyForQuery)",
                                  labels=server_labels)
    received = CounterMetricFamily("pypool_server_received_bytes", "Bytes received from the server",
                                   labels=server_labels)
    sent = CounterMetricFamily("pypool_server_sent_bytes", "Bytes sent to the server", labels=server_labels)
    xact_hist = HistogramMetricFamily("pypool_transaction_duration_seconds",
                                      "Transaction time from checkout to the ReadyForQuery that ends it",
                                      labels=server_labels)
    wait_hist = HistogramMetricFamily("pypool_checkout_wait_seconds",
                                      "Time a client waited for a server connection (0 when one was idle)",
                                      labels=server_labels)
    timeouts = CounterMetricFamily("pypool_checkout_timeouts", "Checkouts that gave up after checkout_timeout",
                                   labels=server_labels)
    connects = CounterMetricFamily("pypool_server_connects", "Server connections opened (attempts)",
                                   labels=server_labels)
    connect_errors = CounterMetricFamily("pypool_server_connect_errors", "Server connection attempts that failed",
                                         labels=server_labels)
    dirty = CounterMetricFamily("pypool_server_dirty_closes", "Server connections closed because a client left "
                                "them mid-transaction or broken", labels=server_labels)
    banned = GaugeMetricFamily("pypool_server_banned", "1 while the replica is banned from reads",
                               labels=server_labels)
    bans = CounterMetricFamily("pypool_server_bans", "Times the replica was banned", labels=server_labels)
    healthy = GaugeMetricFamily("pypool_server_healthy", "1 if the last health check succeeded",
                                labels=server_labels)
    is_primary = GaugeMetricFamily("pypool_server_is_primary", "1 for the server pypool sends writes to",
                                   labels=server_labels)
    lag = GaugeMetricFamily("pypool_replica_lag_seconds", "Replay lag of the replica, from the health check",
                            labels=server_labels)
    for v, t, states in per_address:
        labels = [v.pool_name, v.user, v.host, str(v.port), v.role]
        for state in SERVER_STATES:
            servers.add_metric(labels + [state], states[state])
        max_conns.add_metric(labels, v.current.settings.pool_size)
        xacts.add_metric(labels, t.xact_count)
        queries.add_metric(labels, t.query_count)
        received.add_metric(labels, t.bytes_received)
        sent.add_metric(labels, t.bytes_sent)
        xact_hist.add_metric(labels, _buckets(XACT_BUCKETS, t.xact_hist), t.xact_time)
        wait_hist.add_metric(labels, _buckets(WAIT_BUCKETS, t.wait_hist), t.wait_hist_sum)
        timeouts.add_metric(labels, t.checkout_timeouts)
        connects.add_metric(labels, t.connects)
        connect_errors.add_metric(labels, t.connect_errors)
        dirty.add_metric(labels, t.closed_dirty)
        banned.add_metric(labels, int(v.group.is_banned(v.current)))
        bans.add_metric(labels, t.bans)
        healthy.add_metric(labels, int(v.current.healthy))
        is_primary.add_metric(labels, int(v.role == "primary"))
        if v.role == "replica" and v.current.lag_ms is not None:
            lag.add_metric(labels, v.current.lag_ms / 1000)
    out.extend([servers, max_conns, xacts, queries, received, sent, xact_hist, wait_hist, timeouts, connects,
                connect_errors, dirty, banned, bans, healthy, is_primary, lag])

    hits = CounterMetricFamily("pypool_query_classification_cache_hits",
                               "Statements classified from the fingerprint cache", labels=["pool"])
    misses = CounterMetricFamily("pypool_query_classification_cache_misses",
                                 "Statements that had to be parsed", labels=["pool"])
    ratio = GaugeMetricFamily("pypool_query_classification_cache_hit_ratio",
                              "hits / (hits + misses) since start", labels=["pool"])
    entries = GaugeMetricFamily("pypool_query_classification_cache_entries", "Fingerprints cached",
                                labels=["pool"])
    decisions = CounterMetricFamily("pypool_routing_decisions", "Routing decisions by the role chosen",
                                    labels=["pool", "role"])
    for name in sorted(app.config.pools):
        router = app.routers.get(name)
        if router is None:
            continue
        cache = router.cache
        hits.add_metric([name], cache.hits)
        misses.add_metric([name], cache.misses)
        total = cache.hits + cache.misses
        ratio.add_metric([name], cache.hits / total if total else 0.0)
        entries.add_metric([name], len(cache))
        for role, n in sorted(router.decisions.items()):
            decisions.add_metric([name, role], n)
    reloads = CounterMetricFamily("pypool_config_reloads", "Config reloads (SIGHUP or RELOAD) by result",
                                  labels=["result"])
    reloads.add_metric(["success"], app.reloads_ok)
    reloads.add_metric(["failure"], app.reloads_failed)
    out.extend([hits, misses, ratio, entries, decisions, reloads])
    return out


def _buckets(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    out = []
    running = 0
    for bound, n in zip(bounds, counts):
        running += n
        out.append((_float_str(bound), running))
    running += counts[-1]
    out.append(("+Inf", running))
    return out


def _float_str(value: float) -> str:
    return repr(float(value))


class PypoolCollector:
    """prometheus-client collector: the snapshot is taken on the event loop."""

    def __init__(self, app: "Application", loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.loop_thread = threading.get_ident()  # built on the loop's thread

    def collect(self) -> Iterable[Metric]:
        if threading.get_ident() == self.loop_thread:
            return collect_families(self.app)  # called on the loop itself
        result: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def snapshot() -> None:
            if result.set_running_or_notify_cancel():
                try:
                    result.set_result(collect_families(self.app))
                except BaseException as exc:  # noqa: BLE001 - reported to the scraping thread
                    result.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(snapshot)
            return result.result(SCRAPE_TIMEOUT)
        except RuntimeError:
            return []  # the loop is closed: pypool is stopping
        except concurrent.futures.TimeoutError:
            result.cancel()
            log.warning("metrics scrape: the event loop did not answer within %.0f s", SCRAPE_TIMEOUT)
            return []


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class MetricsServer:
    """``GET /metrics`` on host:prometheus_exporter_port, served from a daemon thread."""

    def __init__(self, app: "Application", host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PypoolCollector(app, asyncio.get_running_loop()))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        metrics_app = make_wsgi_app(self.registry)

        def wsgi(environ, start_response):  # type: ignore[no-untyped-def]
            if environ.get("PATH_INFO") not in ("/metrics", "/metrics/"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found: metrics are at /metrics\n"]
            return metrics_app(environ, start_response)

        class Server(ThreadingWSGIServer):
            pass

        if ":" in host:
            import socket

            Server.address_family = socket.AF_INET6
        self.httpd = make_server(host, port, wsgi, Server, handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pypool-metrics", daemon=True)
        self.thread.start()
        self.address = self.httpd.server_address

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

