"""The admin console's tables: a statistics snapshot in, (columns, rows) out.

Pure functions, no I/O: ``SHOW`` renders them from one ``pypool.snapshot.Snapshot``
(possibly merged from several worker processes) and the Prometheus exporter reuses
``pools_table`` and ``stats_values`` so that both report the same numbers.
Column names and order are PgCat's (``src/admin.rs``); ``STATS_TOTALS`` and
``STATS_AVERAGES`` follow PgBouncer.
"""

from __future__ import annotations

import dataclasses
import datetime

from pypool import config_keys
from pypool.config import General, Pool, User
from pypool.routing.sharding import Sharding
from pypool.snapshot import Averager, Snapshot

# Type OIDs of the result columns.
TEXT = 25
INT4 = 23
NUMERIC = 1700

Table = tuple[list[tuple[str, int]], list[list[object]]]


def _numeric(*names: str) -> list[tuple[str, int]]:
    return [(n, NUMERIC) for n in names]


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def pools_table(snap: Snapshot) -> Table:
    columns = [("database", TEXT), ("user", TEXT), ("pool_mode", TEXT)] + _numeric(
        "cl_idle", "cl_active", "cl_waiting", "cl_cancel_req", "sv_active", "sv_idle", "sv_used", "sv_tested",
        "sv_login", "maxwait", "maxwait_us", "cl_pinned")
    servers: dict[tuple[str, str], dict[str, int]] = {}
    for a in snap.addresses:
        counts = servers.setdefault((a.pool, a.user), {})
        for state, n in a.states.items():
            counts[state] = counts.get(state, 0) + n
    rows = []
    for p in snap.pools:
        sv = servers.get(p.key, {})
        wait = _us(p.maxwait)
        rows.append([p.pool, p.user, p.pool_mode, p.clients["idle"], p.clients["active"], p.clients["waiting"],
                     p.cancels_in_flight, sv.get("active", 0), sv.get("idle", 0), sv.get("used", 0),
                     sv.get("tested", 0), sv.get("login", 0), wait // 1_000_000, wait % 1_000_000, p.pinned])
    return columns, rows


STATS_COLUMNS = ("total_xact_count", "total_query_count", "total_received", "total_sent", "total_xact_time",
                 "total_query_time", "total_wait_time", "total_errors", "avg_xact_count", "avg_query_count",
                 "avg_recv", "avg_sent", "avg_errors", "avg_xact_time", "avg_query_time", "avg_wait_time")


def stats_values(a, averages: dict[str, float]) -> dict[str, int]:
    """PgCat's SHOW STATS numbers for one address (times in microseconds)."""
    c = a.counters
    return {
        "total_xact_count": int(c["xact_count"]), "total_query_count": int(c["query_count"]),
        "total_received": int(c["bytes_received"]), "total_sent": int(c["bytes_sent"]),
        "total_xact_time": _us(c["xact_time"]), "total_query_time": _us(c["query_time"]), "total_wait_time": _us(c["wait_time"]),
        "total_errors": a.errors,
        "avg_xact_count": _int(averages["xact_count"]), "avg_query_count": _int(averages["query_count"]),
        "avg_recv": _int(averages["recv"]), "avg_sent": _int(averages["sent"]),
        "avg_errors": _int(averages["errors"]), "avg_xact_time": _int(averages["xact_time"]),
        "avg_query_time": _int(averages["query_time"]), "avg_wait_time": _int(averages["wait_time"]),
    }


def stats_table(snap: Snapshot, averager: Averager) -> Table:
    columns = [("instance", TEXT), ("database", TEXT), ("user", TEXT)] + _numeric(*STATS_COLUMNS)
    rows = []
    for a in snap.addresses:
        values = stats_values(a, averager.get(a.key))
        rows.append([a.name, a.pool, a.user] + [values[c] for c in STATS_COLUMNS])
    return columns, rows


PGBOUNCER_STATS = ("server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
                   "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count")


_PREPARED_COUNTS = ("client_parse_count", "server_parse_count", "bind_count")  # transaction mode only


def stats_totals_table(snap: Snapshot) -> Table:
    """PgBouncer's SHOW STATS_TOTALS: per database; bytes seen from the clients' side; microseconds."""
    by_db: dict[str, dict[str, int]] = {}
    for a in snap.addresses:
        c = a.counters
        row = by_db.setdefault(a.pool, dict.fromkeys(PGBOUNCER_STATS, 0))
        row["server_assignment_count"] += int(c["checkouts"])
        row["xact_count"] += int(c["xact_count"])
        row["query_count"] += int(c["query_count"])
        row["bytes_received"] += int(c["bytes_sent"])  # what clients sent pypool went on to the server
        row["bytes_sent"] += int(c["bytes_received"])
        row["xact_time"] += _us(c["xact_time"])
        row["query_time"] += _us(c["query_time"])
        row["wait_time"] += _us(c["wait_time"])
        for name in _PREPARED_COUNTS:
            row[name] += int(c[name])
    return _by_database(by_db)


def stats_averages_table(snap: Snapshot, averager: Averager) -> Table:
    """PgBouncer's SHOW STATS_AVERAGES: rates per second, times per transaction / assignment (us)."""
    by_db: dict[str, dict[str, float]] = {}
    weights: dict[str, dict[str, float]] = {}
    for a in snap.addresses:
        avg = averager.get(a.key)
        row = by_db.setdefault(a.pool, dict.fromkeys(PGBOUNCER_STATS, 0.0))
        w = weights.setdefault(a.pool, {"xact": 0.0, "query": 0.0, "assign": 0.0})
        row["server_assignment_count"] += avg["server_assignment_count"]
        row["xact_count"] += avg["xact_count"]
        row["query_count"] += avg["query_count"]
        row["bytes_received"] += avg["sent"]
        row["bytes_sent"] += avg["recv"]
        # Per-event times of several servers: weighted by how many events each had.
        row["xact_time"] += avg["xact_time"] * avg["xact_count"]
        w["xact"] += avg["xact_count"]
        row["query_time"] += avg["query_time"] * avg["queries_timed"]
        w["query"] += avg["queries_timed"]
        row["wait_time"] += avg["wait_time"] * avg["server_assignment_count"]
        w["assign"] += avg["server_assignment_count"]
        for name in _PREPARED_COUNTS:
            row[name] += avg[name]
    for name, row in by_db.items():
        w = weights[name]
        row["xact_time"] = row["xact_time"] / w["xact"] if w["xact"] else 0
        row["query_time"] = row["query_time"] / w["query"] if w["query"] else 0
        row["wait_time"] = row["wait_time"] / w["assign"] if w["assign"] else 0
    return _by_database({k: {c: _int(v) for c, v in row.items()} for k, row in by_db.items()})


def _by_database(by_db: dict[str, dict[str, int]]) -> Table:
    columns = [("database", TEXT)] + _numeric(*PGBOUNCER_STATS)
    return columns, [[name] + [row[c] for c in PGBOUNCER_STATS] for name, row in sorted(by_db.items())]


def servers_table(snap: Snapshot) -> Table:
    columns = [("server_id", TEXT), ("database_name", TEXT), ("user", TEXT), ("address_id", TEXT),
               ("application_name", TEXT), ("state", TEXT)] + _numeric(
        "transaction_count", "query_count", "bytes_sent", "bytes_received", "age_seconds", "prepare_cache_hit",
        "prepare_cache_miss", "prepare_cache_eviction", "prepare_cache_size")
    rows = [[_hex_id(s.server_id), s.pool, s.user, s.address_name, s.application_name,
             s.state, s.transaction_count, s.query_count, s.bytes_sent,
             s.bytes_received, int(s.age_seconds), s.prepare_cache_hit, s.prepare_cache_miss,
             s.prepare_cache_eviction, s.prepare_cache_size] for s in snap.servers]
    return columns, rows


def clients_table(snap: Snapshot) -> Table:
    # PgBouncer's columns, then pypool's: the WAL position the client's next read must see (causal reads).
    columns = [("client_id", TEXT), ("database", TEXT), ("user", TEXT), ("application_name", TEXT),
               ("state", TEXT)] + _numeric("transaction_count", "query_count", "error_count", "age_seconds",
                                           "maxwait", "maxwait_us") + [("pinned", TEXT), ("causal_required", TEXT)]
    rows = []
    for c in snap.clients:
        if c.state == "login":
            continue  # still authenticating: not a client of any pool yet
        wait = _us(c.maxwait)
        rows.append([_hex_id(c.client_id), c.database, c.user, c.application_name, c.state, c.transaction_count,
                     c.query_count, c.error_count, int(c.age_seconds), wait // 1_000_000, wait % 1_000_000,
                     c.pinned, c.causal_required])
    return columns, rows


def databases_table(snap: Snapshot) -> Table:
    columns = [("name", TEXT), ("host", TEXT), ("port", TEXT), ("database", TEXT), ("force_user", TEXT),
               ("pool_size", INT4), ("min_pool_size", INT4), ("reserve_pool", INT4), ("pool_mode", TEXT),
               ("max_connections", INT4), ("current_connections", INT4), ("paused", INT4), ("disabled", INT4)]
    rows = [[a.name, a.host, str(a.port), a.database, a.user, a.pool_size, a.min_pool_size, 0, a.pool_mode,
             a.pool_size, a.current_connections, int(a.paused), int(a.banned)] for a in snap.addresses]
    return columns, rows


def lists_table(snap: Snapshot) -> Table:
    pooled = [c for c in snap.clients if not c.admin and c.state != "login"]
    free_servers = sum(a.states["idle"] + a.states["used"] for a in snap.addresses)
    used_servers = sum(a.states["active"] + a.states["tested"] for a in snap.addresses)
    rows = [
        ["databases", len(snap.addresses)],
        ["users", len({p.user for p in snap.pools})],
        ["pools", len(snap.pools)],
        ["free_clients", sum(1 for c in pooled if c.state == "idle")],
        ["used_clients", sum(1 for c in pooled if c.state != "idle") + sum(1 for c in snap.clients if c.admin)],
        ["login_clients", sum(1 for c in snap.clients if c.state == "login")],
        ["free_servers", free_servers],
        ["used_servers", used_servers],
        ["dns_names", 0], ["dns_zones", 0], ["dns_queries", 0], ["dns_pending", 0],
    ]
    return [("list", TEXT), ("items", INT4)], rows


def users_table(snap: Snapshot) -> Table:
    return [("name", TEXT), ("pool_mode", TEXT)], [[p.user, p.pool_mode] for p in snap.pools]


def bans_table(snap: Snapshot) -> Table:
    columns = [(c, TEXT) for c in ("db", "user", "role", "host", "reason", "ban_time", "ban_duration_seconds",
                                   "ban_remaining_seconds", "port")]
    rows = []
    for a in snap.addresses:
        if not a.banned:
            continue
        banned_at = datetime.datetime.fromtimestamp(a.banned_at, datetime.timezone.utc)
        rows.append([a.pool, a.user, a.role, a.host, a.ban_reason, banned_at.strftime("%Y-%m-%d %H:%M:%S.%f"),
                     str(int(a.ban_duration)), str(int(a.ban_remaining + 0.999)), str(a.port)])
    return columns, rows


def config_table(config) -> Table:
    columns = [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)]
    rows = []
    for f in dataclasses.fields(General):
        if "password" in f.name or f.name == "workers_auto":
            continue  # never shown; workers_auto is shown in workers' value
        default = f.default if f.default is not dataclasses.MISSING else None
        value = _config_value(getattr(config.general, f.name))
        if f.name == "workers" and config.general.workers_auto:
            value = f"auto ({value})"
        rows.append([config_keys.file_key(General, f.name), value,
                     "-" if default is None else _config_value(default),
                     "no" if config_keys.needs_restart(General, f.name) else "yes"])
    for name, pool in sorted(config.pools.items()):
        for f in dataclasses.fields(Pool):
            if f.name in ("name", "users", "shards", "sharding"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append([f"pools.{name}.{f.name}", _config_value(getattr(pool, f.name)),
                         "-" if default is None else _config_value(default), "yes"])
        defaults = Sharding().settings()
        for key, value in pool.sharding.settings().items():
            rows.append([f"pools.{name}.{key}", value, defaults[key], "yes"])
        for username, user in sorted(pool.users.items()):
            for f in dataclasses.fields(User):
                if "password" in f.name or f.name == "username":
                    continue
                rows.append([f"pools.{name}.users.{username}.{f.name}", _config_value(getattr(user, f.name)),
                             "-", "yes"])
        for index, shard in enumerate(pool.shards):
            rows.append([f"pools.{name}.shards.{index}.database", shard.database, "-", "yes"])
            servers = ", ".join(f"{s.host}:{s.port} ({s.role})" for s in shard.servers)
            rows.append([f"pools.{name}.shards.{index}.servers", servers, "-", "yes"])
    return columns, rows


# The rows BAN and UNBAN answer with.
BAN_COLUMNS = [("db", TEXT), ("user", TEXT), ("role", TEXT), ("host", TEXT), ("port", TEXT)]


def _hex_id(value: int) -> str:
    return f"0x{value & 0xFFFFFFFF:08X}"


def _int(value: float) -> int:
    return int(round(value))


def _config_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)
