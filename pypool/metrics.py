"""The Prometheus exporter: ``GET /metrics`` rendered from a statistics snapshot.

Nothing here runs on the relay path, and nothing here reads live pool
objects: the HTTP thread asks the event loop for a snapshot (``Application.stats_snapshot()``,
plain data, see ``pypool.snapshot``) and renders metric families from it, so
every number in a scrape comes from one instant and merged snapshots of several
processes render the same way.

Two metric families are exported:

* ``pgcat_*``: PgCat's own names and labels (``stats_*``, ``pools_*``,
  ``servers_*``, ``databases_*``), so PgCat's Grafana dashboard works
  unchanged (per-server series also carry the ``user`` label it filters on). PgCat types its ``stats_total_*`` and ``servers_*`` counts as
  counters without the ``_total`` suffix; prometheus-client would rename such
  counters, so they are exported untyped under PgCat's exact names.
* ``pypool_*``: pypool's own family, named the Prometheus way (base units,
  ``_total`` counters, histograms for transaction time and checkout wait,
  the classification-cache hit ratio, routing decisions by role, causal reads by
  outcome and their waits).

The exporter is served by ``pypool.httpd`` (a WSGI server in a daemon thread,
beside the health probes), so HTTP parsing and text formatting stay off the
event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Awaitable, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from pypool import __version__
from pypool.admin.tables import pools_table, stats_values  # SHOW POOLS / SHOW STATS: one source of these numbers
from pypool.httpd import HttpEndpoint
from pypool.pool.pool import WAIT_BUCKETS, XACT_BUCKETS
from pypool.causal.stats import WAIT_BUCKETS as CAUSAL_WAIT_BUCKETS
from pypool.probes import Verdict
from pypool.snapshot import NO_AVERAGES, SERVER_STATES, AddressStats, Snapshot

log = logging.getLogger("pypool.metrics")

SCRAPE_TIMEOUT = 5.0  # seconds the HTTP thread waits for the event loop's snapshot

# A coroutine function run on the event loop: the snapshot and the SHOW STATS averages.
Scrape = Callable[[], Awaitable[tuple[Snapshot, dict[tuple, dict[str, float]]]]]

# PgCat's labels of per-address series, plus ``user``: PgCat's own Grafana dashboard
# filters these series by ``user=~"$user"`` although its exporter only sets ``username``.
_PGCAT_LABELS = ("host", "shard", "role", "pool", "index", "database", "username", "user")


def _pgcat_labels(a: AddressStats) -> dict[str, str]:
    return dict(zip(_PGCAT_LABELS, (a.host, str(a.shard), a.role, a.pool, str(a.index), a.database, a.user, a.user)))


def _untyped(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "unknown")


_STATS_HELP = {
    "total_query_count": "Number of queries sent by all clients",
    "total_query_time": "Total time servers spent answering requests, first message to last reply (microseconds)",
    "total_received": "Number of bytes received from the server",
    "total_sent": "Number of bytes sent to the server",
    "total_xact_count": "Total number of transactions started by the client",
    "total_xact_time": "Total amount of time for all transactions to execute (microseconds)",
    "total_wait_time": "Total time client waited for a server connection (microseconds)",
    "avg_query_count": "Average of total_query_count every 15 seconds",
    "avg_query_time": "Average time of a request over the last 15 seconds (microseconds)",
    "avg_recv": "Average of total_received bytes every 15 seconds",
    "avg_sent": "Average of total_sent bytes every 15 seconds",
    "avg_errors": "Average number of errors every 15 seconds",
    "avg_xact_count": "Average of total_xact_count every 15 seconds",
    "avg_xact_time": "Average time of a transaction over the last 15 seconds (microseconds)",
    "avg_wait_time": "Average of total_wait_time every 15 seconds",
}
_POOLS_HELP = {
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
_SERVER_COUNTERS = {
    "bytes_received": "Volume in bytes of network traffic received by server",
    "bytes_sent": "Volume in bytes of network traffic sent by server",
    "transaction_count": "Number of transactions executed by server",
    "query_count": "Number of queries executed by server",
    "error_count": "Number of errors",
}
_SERVER_GAUGES = {
    "idle_count": "Number of server connection in idle state",
    "active_count": "Number of server connection in active state",
    "tested_count": "Number of server connection in tested state",
    "login_count": "Number of server connection in login state",
    "is_banned": "0 if server is not banned, 1 if server is banned",
    "is_paused": "0 if server is not paused, 1 if server is paused",
}


def pgcat_families(snap: Snapshot, averages: dict[tuple, dict[str, float]]) -> list[Metric]:
    """PgCat's exporter: the SHOW STATS, SHOW POOLS, servers and SHOW DATABASES numbers."""
    out: list[Metric] = []
    stats = {k: (_untyped if k.startswith("total") else GaugeMetricFamily)("pgcat_stats_" + k, doc)
             for k, doc in _STATS_HELP.items()}
    servers = {k: _untyped("pgcat_servers_" + k, doc) for k, doc in _SERVER_COUNTERS.items()}
    servers.update({k: GaugeMetricFamily("pgcat_servers_" + k, doc) for k, doc in _SERVER_GAUGES.items()})
    databases = {
        "pool_size": GaugeMetricFamily("pgcat_databases_pool_size", "Maximum number of server connections"),
        "current_connections": GaugeMetricFamily("pgcat_databases_current_connections",
                                                 "Current number of connections for this database"),
    }
    for a in snap.addresses:
        labels = _pgcat_labels(a)
        values = stats_values(a, averages.get(a.key) or NO_AVERAGES)
        for key, family in stats.items():
            family.add_sample(family.name, labels, values[key])
        server_values = {
            "bytes_received": int(a.counters["bytes_received"]), "bytes_sent": int(a.counters["bytes_sent"]),
            "transaction_count": int(a.counters["xact_count"]), "query_count": int(a.counters["query_count"]),
            "error_count": a.errors, "idle_count": a.states["idle"] + a.states["used"],
            "active_count": a.states["active"], "tested_count": a.states["tested"],
            "login_count": a.states["login"], "is_banned": int(a.banned), "is_paused": int(a.paused),
        }
        for key, family in servers.items():
            family.add_sample(family.name, labels, server_values[key])
        databases["pool_size"].add_sample("pgcat_databases_pool_size", labels, a.pool_size)
        databases["current_connections"].add_sample("pgcat_databases_current_connections", labels,
                                                    a.current_connections)
    out.extend(stats.values())

    pools = {k: GaugeMetricFamily("pgcat_pools_" + k, doc, labels=["pool", "user"]) for k, doc in _POOLS_HELP.items()}
    columns, rows = pools_table(snap)
    names = [c for c, _ in columns]
    for row in rows:
        values = dict(zip(names, row))
        for key, family in pools.items():
            family.add_metric([values["database"], values["user"]], values[key])
    out.extend(pools.values())
    out.extend(servers.values())
    out.extend(databases.values())
    return out




def pypool_families(snap: Snapshot) -> list[Metric]:
    """pypool's own family, named the Prometheus way."""
    info = GaugeMetricFamily("pypool_info", "pypool version", labels=["version"])
    info.add_metric([__version__], 1)
    reloads = CounterMetricFamily("pypool_config_reloads", "Config reloads (SIGHUP or RELOAD) by result",
                                  labels=["result"])
    reloads.add_metric(["success"], snap.reloads_ok)
    reloads.add_metric(["failure"], snap.reloads_failed)
    return [info, *_client_families(snap), *_server_families(snap), *_routing_families(snap),
            *_causal_families(snap), reloads]


def _client_families(snap: Snapshot) -> list[Metric]:
    pool_labels = ["pool", "user"]
    clients = GaugeMetricFamily("pypool_client_connections", "Logged-in client connections by pool, user and state",
                                labels=pool_labels + ["state"])
    waiting_max = GaugeMetricFamily("pypool_client_max_wait_seconds",
                                    "Longest current wait of a client for a server connection", labels=pool_labels)
    paused = GaugeMetricFamily("pypool_pool_paused", "1 while the pool is paused by the admin PAUSE command",
                               labels=pool_labels)
    cancels = CounterMetricFamily("pypool_cancel_requests", "CancelRequests forwarded to a server",
                                  labels=pool_labels)
    pinned = GaugeMetricFamily("pypool_client_pinned", "Clients keeping their server connection across "
                               "transactions for session state (temporary tables, WITH HOLD cursors, "
                               "session advisory locks, SQL PREPARE)", labels=pool_labels)
    for p in snap.pools:
        for state, n in sorted(p.clients.items()):
            clients.add_metric([p.pool, p.user, state], n)
        waiting_max.add_metric([p.pool, p.user], p.maxwait)
        paused.add_metric([p.pool, p.user], int(p.paused))
        cancels.add_metric([p.pool, p.user], p.cancel_requests)
        pinned.add_metric([p.pool, p.user], p.pinned)
    logins = GaugeMetricFamily("pypool_client_logins_in_progress",
                               "Client connections still in startup or authentication")
    logins.add_metric([], sum(1 for c in snap.clients if c.state == "login"))
    admins = GaugeMetricFamily("pypool_admin_connections", "Client connections to the admin console")
    admins.add_metric([], sum(1 for c in snap.clients if c.admin))
    return [clients, waiting_max, paused, cancels, pinned, logins, admins]


def _server_families(snap: Snapshot) -> list[Metric]:
    server_labels = ["pool", "user", "host", "port", "role"]
    servers = GaugeMetricFamily("pypool_server_connections", "Server connections by state (PgBouncer's "
                                "vocabulary: active, idle, used, tested, login)", labels=server_labels + ["state"])
    max_conns = GaugeMetricFamily("pypool_server_pool_size", "pool_size: the most connections pypool opens "
                                  "to this server for this pool and user", labels=server_labels)
    counters = {
        "xact_count": CounterMetricFamily("pypool_transactions", "Transactions relayed", labels=server_labels),
        "query_count": CounterMetricFamily("pypool_queries", "Requests relayed (each ends in a ReadyForQuery)",
                                           labels=server_labels),
        "bytes_received": CounterMetricFamily("pypool_server_received_bytes", "Bytes received from the server",
                                              labels=server_labels),
        "bytes_sent": CounterMetricFamily("pypool_server_sent_bytes", "Bytes sent to the server",
                                          labels=server_labels),
        "checkouts": CounterMetricFamily("pypool_checkouts", "Server connections lent to a client",
                                         labels=server_labels),
        "checkout_timeouts": CounterMetricFamily("pypool_checkout_timeouts",
                                                 "Checkouts that gave up after checkout_timeout",
                                                 labels=server_labels),
        "connects": CounterMetricFamily("pypool_server_connects", "Server connections opened (attempts)",
                                        labels=server_labels),
        "connect_errors": CounterMetricFamily("pypool_server_connect_errors",
                                              "Server connection attempts that failed", labels=server_labels),
        "closed_dirty": CounterMetricFamily("pypool_server_dirty_closes", "Server connections closed because a "
                                            "client left them mid-transaction or broken", labels=server_labels),
        "bans": CounterMetricFamily("pypool_server_bans", "Times the replica was banned", labels=server_labels),
        "healthchecks": CounterMetricFamily("pypool_server_healthchecks",
                                            "Idle connections checked with ';' before checkout (healthcheck_delay)",
                                            labels=server_labels),
        "healthcheck_failures": CounterMetricFamily("pypool_server_healthcheck_failures",
                                                    "Pre-checkout health checks that failed or timed out",
                                                    labels=server_labels),
    }
    xact_hist = HistogramMetricFamily("pypool_transaction_duration_seconds",
                                      "Transaction time from checkout to the ReadyForQuery that ends it",
                                      labels=server_labels)
    wait_hist = HistogramMetricFamily("pypool_checkout_wait_seconds",
                                      "Time a client waited for a server connection (0 when one was idle)",
                                      labels=server_labels)
    banned = GaugeMetricFamily("pypool_server_banned", "1 while the replica is banned from reads",
                               labels=server_labels)
    healthy = GaugeMetricFamily("pypool_server_healthy", "1 if the last health check succeeded",
                                labels=server_labels)
    is_primary = GaugeMetricFamily("pypool_server_is_primary", "1 for the server pypool sends writes to",
                                   labels=server_labels)
    lag = GaugeMetricFamily("pypool_replica_lag_seconds", "Replay lag of the replica, from the health check",
                            labels=server_labels)
    for a in snap.addresses:
        labels = [a.pool, a.user, a.host, str(a.port), a.role]
        for state in SERVER_STATES:
            servers.add_metric(labels + [state], a.states[state])
        max_conns.add_metric(labels, a.pool_size)
        for key, family in counters.items():
            family.add_metric(labels, a.counters[key])
        xact_hist.add_metric(labels, _buckets(XACT_BUCKETS, a.xact_hist), a.counters["xact_time"])
        wait_hist.add_metric(labels, _buckets(WAIT_BUCKETS, a.wait_hist), a.counters["wait_hist_sum"])
        banned.add_metric(labels, int(a.banned))
        healthy.add_metric(labels, int(a.healthy))
        is_primary.add_metric(labels, int(a.role == "primary"))
        if a.role == "replica" and a.lag_seconds is not None:
            lag.add_metric(labels, a.lag_seconds)
    return [servers, max_conns, *counters.values(), xact_hist, wait_hist, banned, healthy, is_primary, lag]


def _routing_families(snap: Snapshot) -> list[Metric]:
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
    for r in snap.routers:
        hits.add_metric([r.pool], r.cache_hits)
        misses.add_metric([r.pool], r.cache_misses)
        total = r.cache_hits + r.cache_misses
        ratio.add_metric([r.pool], r.cache_hits / total if total else 0.0)
        entries.add_metric([r.pool], r.cache_entries)
        for role, n in sorted(r.decisions.items()):
            decisions.add_metric([r.pool, role], n)
    return [hits, misses, ratio, entries, decisions]


def _causal_families(snap: Snapshot) -> list[Metric]:
    """Causal reads (pools with causal_reads on): where reads with a requirement ran, and their waits."""
    reads = CounterMetricFamily(
        "pypool_causal_reads", "Reads that had to see earlier writes, by where they ran: a replica known to "
        "be caught up (replica_at_once), one after waiting for it (replica_after_wait), the primary, or none "
        "(timed_out: causal_reads_timeout passed and primary reads are off)", labels=["pool", "user", "outcome"])
    waits = HistogramMetricFamily("pypool_causal_read_wait_seconds",
                                  "Time a causal read waited for a replica to replay the writes it must see",
                                  labels=["pool", "user"])
    outcomes = {"at_once": "replica_at_once", "after_wait": "replica_after_wait", "to_primary": "primary",
                "timed_out": "timed_out"}
    for p in snap.pools:
        if p.causal_mode == "off":
            continue
        for key, outcome in outcomes.items():
            reads.add_metric([p.pool, p.user, outcome], p.causal[key])
        waits.add_metric([p.pool, p.user], _buckets(CAUSAL_WAIT_BUCKETS[:-1], p.causal_wait_hist), p.causal_wait_sum)
    return [reads, waits]


def render_families(snap: Snapshot, averages: dict[tuple, dict[str, float]]) -> list[Metric]:
    return pgcat_families(snap, averages) + pypool_families(snap)


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


class Probes(Protocol):
    """What /healthz and /readyz ask, from the HTTP thread (``pypool.probes.AppProbes``)."""

    def liveness(self) -> Verdict: ...

    def readiness(self) -> Verdict: ...


class PypoolCollector:
    """prometheus-client collector: the snapshot is taken on the event loop, rendered on the HTTP thread."""

    def __init__(self, scrape: Scrape, loop: asyncio.AbstractEventLoop) -> None:
        self.scrape = scrape
        self.loop = loop

    def collect(self) -> Iterable[Metric]:
        try:
            future = asyncio.run_coroutine_threadsafe(self.scrape(), self.loop)
        except RuntimeError:
            return []  # the loop is closed: pypool is stopping
        try:
            snap, averages = future.result(SCRAPE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("metrics scrape: the event loop did not answer within %.0f s", SCRAPE_TIMEOUT)
            return []
        return render_families(snap, averages)


class MetricsServer:
    """``GET /metrics``, ``/healthz`` and ``/readyz`` on host:prometheus_exporter_port (``pypool.httpd``)."""

    def __init__(self, scrape: Scrape, host: str, port: int, probes: "Probes") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PypoolCollector(scrape, asyncio.get_running_loop()))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.endpoint = HttpEndpoint(host, port, self.registry, probes.liveness, probes.readiness)
        self.address = self.endpoint.address

    def close(self) -> None:
        self.endpoint.close()
