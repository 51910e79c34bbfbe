"""The admin console: the virtual databases ``pgcat``, ``pgbouncer`` and ``pypool``.

A client that logs in to one of them with ``[general] admin_username`` /
``admin_password`` (SCRAM-SHA-256 or md5, the same exchange as any client)
talks to pypool itself; no server is involved. It speaks the simple query
protocol only, like PgCat's and PgBouncer's consoles, and answers:

``SHOW POOLS | STATS | SERVERS | CLIENTS | DATABASES | CONFIG | LISTS | USERS |
VERSION | BANS | HELP | STATS_TOTALS | STATS_AVERAGES``, ``RELOAD``,
``PAUSE [db[,user]]``, ``RESUME [db[,user]]``, ``SHUTDOWN``,
``BAN host[:port] seconds``, ``UNBAN host[:port]`` and ``SET ...`` (ignored).

Column names and order are PgCat's (``src/admin.rs``); ``STATS_TOTALS`` and
``STATS_AVERAGES``, which PgCat lacks, follow PgBouncer. Where PgCat leaves a
column at 0 and pypool knows the value, pypool fills it in: ``total_xact_time``,
``sv_used``, ``sv_tested``, ``cl_cancel_req``. ``BAN``/``UNBAN``/``SHOW BANS``
add a trailing ``port`` column and accept ``host:port``, because several
servers may share a host (all of them do in the local cluster).

Every SHOW renders from a ``pypool.snapshot.Snapshot`` (plain data, taken
once per statement through ``Application.stats_snapshot()``), never from live
pool objects, so the same tables can be built from several processes' merged
snapshots. Every error is an ErrorResponse with a SQLSTATE; the session stays
usable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

from pypool import __version__, sqlstates
from pypool.snapshot import Averager, Snapshot
from pypool.config import ConfigError, General, Pool, User
from pypool.errors import PoolerError
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.protocol.frames import ProtocolViolation
from pypool.routing.sharding import Sharding

if TYPE_CHECKING:
    from pypool.app import Application
    from pypool.client import ClientConnection

log = logging.getLogger("pypool.admin")

ADMIN_DATABASES = frozenset({"pgcat", "pgbouncer", "pypool"})

TEXT = 25
INT4 = 23
NUMERIC = 1700

# Extended-protocol messages: refused (simple protocol only), discarded up to Sync.
_EXTENDED = frozenset((m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.FLUSH))

HELP_LINES = (
    "SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION",
    "SHOW LISTS",
    "SHOW STATS|STATS_TOTALS|STATS_AVERAGES",
    "SHOW BANS",
    "SET key = arg (accepted and ignored)",
    "RELOAD",
    "PAUSE [<db>[, <user>]]",
    "RESUME [<db>[, <user>]]",
    "BAN <host>[:<port>] <seconds>",
    "UNBAN <host>[:<port>]",
    "SHUTDOWN",
)

# PgBouncer commands pypool knows of but does not implement: a clearer error than "unknown".
_NOT_IMPLEMENTED = frozenset({"KILL", "SUSPEND", "DISABLE", "ENABLE", "RECONNECT", "WAIT_CLOSE", "KILL_CLIENT"})
_SHOW_NOT_IMPLEMENTED = frozenset({"FDS", "SOCKETS", "ACTIVE_SOCKETS", "MEM", "STATE", "DNS_HOSTS", "DNS_ZONES",
                                   "PEERS", "PEER_POOLS", "TOTALS", "PREPARED_STATEMENTS"})

# Settings that only take effect at start (PgCat lists host, port and connect_timeout).
_NOT_CHANGEABLE = frozenset({"host", "port", "workers", "enable_prometheus_exporter",
                             "prometheus_exporter_port", "tls_certificate", "tls_private_key", "client_tls_mode",
                             "server_tls", "verify_server_certificate", "server_tls_ca_file"})
_GENERAL_KEYS: dict[str, str] = {}  # dataclass field -> PgCat's key, where they differ


class AdminError(PoolerError):
    """An admin command failed: the console answers with an ERROR and keeps the session."""


# ------------------------------------------------------------------- login

async def login(client: "ClientConnection") -> "AdminConsole":
    """Authenticate an admin-database login and greet it; raises auth.AuthError on a bad login."""
    general = client.app.config.general
    identity = None
    if client.user == general.admin_username:
        identity = SimpleNamespace(user=SimpleNamespace(username=general.admin_username,
                                                        password=general.admin_password))
    await client._authenticate(identity)  # type: ignore[arg-type]
    if identity is None:
        raise auth.AuthError("not the admin user")
    console = AdminConsole(client)
    console.greet()
    log.info("admin console: %s logged in as %s to %s", client.peer, client.user, client.database)
    return console


class AdminConsole:
    def __init__(self, client: "ClientConnection") -> None:
        self.client = client
        self.app: Application = client.app
        self.busy = False  # running a command (SHOW CLIENTS: "active")
        self._commands: dict[str, Callable[[list[str]], bytes]] = {
            "SET": self.ignore_set, "RELOAD": self.reload, "PAUSE": self.pause, "RESUME": self.resume,
            "SHUTDOWN": self.shutdown, "BAN": self.ban, "UNBAN": self.unban,
        }
        self._show: dict[str, Callable[[Snapshot], bytes]] = {
            "POOLS": self.show_pools, "STATS": self.show_stats, "SERVERS": self.show_servers,
            "CLIENTS": self.show_clients, "DATABASES": self.show_databases, "LISTS": self.show_lists,
            "USERS": self.show_users, "BANS": self.show_bans, "STATS_TOTALS": self.show_stats_totals,
            "STATS_AVERAGES": self.show_stats_averages,
        }
        self._show_static: dict[str, Callable[[], bytes]] = {
            "CONFIG": self.show_config, "VERSION": self.show_version, "HELP": self.show_help,
        }

    def _write(self, data: bytes) -> None:
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def greet(self) -> None:
        client = self.client
        server_version = "15.0"
        for group in self.app.groups.values():
            if group.server_parameters and group.server_parameters.get("server_version"):
                server_version = group.server_parameters["server_version"]
                break
        params = {
            "server_version": server_version, "server_encoding": "UTF8", "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY", "TimeZone": "UTC", "integer_datetimes": "on", "IntervalStyle": "postgres",
            "standard_conforming_strings": "on", "is_superuser": "off",
            "application_name": "",
        }
        client.process_id, client.secret_key = self.app.register_cancel_key(client)
        out = [m.authentication_ok()]
        out.extend(m.parameter_status(k, v) for k, v in params.items())
        out.append(m.backend_key_data(client.process_id, client.secret_key))
        out.append(m.ready_for_query())
        self._write(b"".join(out))

    # ------------------------------------------------------------- the loop

    async def run(self) -> None:
        client = self.client
        discarding = False
        while True:
            tag, payload = await client._read_message()
            if tag == m.TERMINATE:
                client._close_session()
                return
            if tag == m.QUERY:
                discarding = False
                await self.execute(m.parse_query(payload))
            elif tag == m.SYNC:
                discarding = False
                self._write(m.ready_for_query())
            elif tag in _EXTENDED:
                if not discarding:
                    discarding = True
                    self._write(m.error_response(
                        sqlstates.FEATURE_NOT_SUPPORTED,
                        "the pypool admin console supports only the simple query protocol",
                        hint="send admin commands as simple queries (psql does; in psycopg use "
                             "execute() without parameters)"))
            else:
                raise ProtocolViolation(f"unexpected message type {chr(tag)!r} on the admin console")

    async def execute(self, sql: str) -> None:
        statements = [s.strip() for s in sql.split(";")]
        statements = [s for s in statements if s]
        if not statements:
            self._write(m.empty_query_response() + m.ready_for_query())
            return
        out = []
        worker = self.app.worker  # one of several processes: answer for the whole instance
        self.busy = True
        try:
            for statement in statements:
                try:
                    out.append(await self.command(statement) if worker is None
                               else await worker.admin_command(self, statement))
                except AdminError as exc:
                    out.append(m.error_response_for(exc))
                    break
                except Exception as exc:  # noqa: BLE001 - a bug in one command must not end the session
                    log.exception("admin command %r failed", statement)
                    out.append(m.error_response(sqlstates.INTERNAL_ERROR, f"internal error in pypool: {exc}"))
                    break
        finally:
            self.busy = False
        out.append(m.ready_for_query())
        self._write(b"".join(out))

    async def command(self, statement: str) -> bytes:
        tokens = statement.split()
        verb = tokens[0].upper()
        if verb == "SHOW":
            return await self.show(tokens[1:])
        handler = self._commands.get(verb)
        if handler is not None:
            return handler(tokens[1:])
        if verb in _NOT_IMPLEMENTED:
            raise AdminError(sqlstates.FEATURE_NOT_SUPPORTED,
                             f"{verb} is a PgBouncer admin command that pypool does not implement; "
                             "SHOW HELP lists the commands pypool supports")
        raise AdminError(sqlstates.SYNTAX_ERROR,
                         f'unsupported admin command "{statement[:60]}"; SHOW HELP lists the commands')

    # ------------------------------------------------------------- commands

    async def show(self, args: list[str]) -> bytes:
        if not args:
            raise AdminError(sqlstates.SYNTAX_ERROR, "SHOW needs an argument; SHOW HELP lists them")
        what = args[0].upper()
        static = self._show_static.get(what)
        if static is not None:
            return static()
        handler = self._show.get(what)
        if handler is not None:
            return handler(await self.app.stats_snapshot())
        if what in _SHOW_NOT_IMPLEMENTED:
            raise AdminError(sqlstates.FEATURE_NOT_SUPPORTED, f"SHOW {what} is not implemented by pypool")
        raise AdminError(sqlstates.UNDEFINED_OBJECT,
                         f'unsupported SHOW "{args[0]}" on the admin console; SHOW HELP lists them')

    def ignore_set(self, args: list[str]) -> bytes:
        return m.command_complete("SET")

    def reload(self, args: list[str]) -> bytes:
        log.info("admin %s: RELOAD", self.client.peer)
        try:
            self.app.reload(reason="admin RELOAD")
        except ConfigError as exc:
            raise AdminError(sqlstates.CONFIG_FILE_ERROR, f"config not reloaded, the old one stays: {exc}") from None
        return m.command_complete("RELOAD")

    def _pool_target(self, verb: str, args: list[str]) -> tuple[list, str]:
        text = " ".join(args).strip()
        if not text:
            return list(self.app.groups.values()), verb
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 2 or not all(parts):
            raise AdminError(sqlstates.SYNTAX_ERROR, f"usage: {verb} [db[, user]]")
        database = parts[0]
        if len(parts) == 2:
            group = self.app.groups.get((database, parts[1]))
            if group is None:
                raise AdminError(sqlstates.INVALID_CATALOG_NAME,
                                 f"No pool configured for database: {database}, user: {parts[1]}")
            return [group], f"{verb} {database},{parts[1]}"
        groups = [g for (name, _), g in self.app.groups.items() if name == database]
        if not groups:
            raise AdminError(sqlstates.INVALID_CATALOG_NAME, f"No pool configured for database: {database}")
        return groups, verb

    def pause(self, args: list[str]) -> bytes:
        groups, tag = self._pool_target("PAUSE", args)
        for group in groups:
            for sp in group.all_pools:
                sp.pause()
        log.info("admin %s: paused %s", self.client.peer, ", ".join(f"{g.name}/{g.user.username}" for g in groups))
        return m.command_complete(tag)

    def resume(self, args: list[str]) -> bytes:
        groups, tag = self._pool_target("RESUME", args)
        for group in groups:
            for sp in group.all_pools:
                sp.resume()
        log.info("admin %s: resumed %s", self.client.peer, ", ".join(f"{g.name}/{g.user.username}" for g in groups))
        return m.command_complete(tag)

    def shutdown(self, args: list[str]) -> bytes:
        log.info("admin %s: SHUTDOWN", self.client.peer)
        # After this reply is written: the drain runs as its own task.
        asyncio.get_running_loop().call_soon(self.app.request_shutdown, "admin SHUTDOWN")
        return m.result_set([("success", TEXT)], [["t"]], tag="SHUTDOWN")

    def _matching(self, target: str):
        """(group, server pool) pairs whose server is ``host`` or ``host:port``."""
        host, _, port = target.partition(":")
        if port and not port.isdigit():
            raise AdminError(sqlstates.SYNTAX_ERROR, f"invalid port in {target!r}")
        for (name, user), group in sorted(self.app.groups.items()):
            for sp in group.all_pools:
                if sp.address.host == host and (not port or sp.address.port == int(port)):
                    yield group, sp

    def ban(self, args: list[str]) -> bytes:
        if len(args) != 2:
            raise AdminError(sqlstates.SYNTAX_ERROR, "usage: BAN hostname[:port] duration_seconds")
        try:
            seconds = int(args[1])
        except ValueError:
            raise AdminError(sqlstates.SYNTAX_ERROR, "duration_seconds must be an integer") from None
        if seconds <= 0:
            raise AdminError(sqlstates.SYNTAX_ERROR, "duration_seconds must be > 0")
        rows = []
        for group, sp in list(self._matching(args[0])):
            if sp is group.primary or group.is_banned(sp):
                continue  # the primary is never banned, as in PgCat
            group.ban(sp, f"AdminBan({seconds})", duration=seconds)
            rows.append([group.name, group.user.username, "replica", sp.address.host, sp.address.port])
        log.info("admin %s: BAN %s %ss: %d server(s)", self.client.peer, args[0], seconds, len(rows))
        return m.result_set(_BAN_COLUMNS, rows, tag="BAN")

    def unban(self, args: list[str]) -> bytes:
        if len(args) != 1:
            raise AdminError(sqlstates.SYNTAX_ERROR, "UNBAN command requires a hostname[:port] to unban")
        rows = []
        for group, sp in list(self._matching(args[0])):
            if group.is_banned(sp):
                group.unban(sp)
                role = "primary" if sp is group.primary else "replica"
                rows.append([group.name, group.user.username, role, sp.address.host, sp.address.port])
        log.info("admin %s: UNBAN %s: %d server(s)", self.client.peer, args[0], len(rows))
        return m.result_set(_BAN_COLUMNS, rows, tag="UNBAN")

    # ---------------------------------------------------------------- SHOW

    def show_pools(self, snap: Snapshot) -> bytes:
        return m.result_set(*pools_table(snap), tag="SHOW")

    def show_stats(self, snap: Snapshot) -> bytes:
        return m.result_set(*stats_table(snap, self.app.averager), tag="SHOW")

    def show_stats_totals(self, snap: Snapshot) -> bytes:
        return m.result_set(*stats_totals_table(snap), tag="SHOW")

    def show_stats_averages(self, snap: Snapshot) -> bytes:
        return m.result_set(*stats_averages_table(snap, self.app.averager), tag="SHOW")

    def show_servers(self, snap: Snapshot) -> bytes:
        return m.result_set(*servers_table(snap), tag="SHOW")

    def show_clients(self, snap: Snapshot) -> bytes:
        return m.result_set(*clients_table(snap), tag="SHOW")

    def show_databases(self, snap: Snapshot) -> bytes:
        return m.result_set(*databases_table(snap), tag="SHOW")

    def show_lists(self, snap: Snapshot) -> bytes:
        return m.result_set(*lists_table(snap), tag="SHOW")

    def show_users(self, snap: Snapshot) -> bytes:
        rows = [[p.user, p.pool_mode] for p in snap.pools]
        return m.result_set([("name", TEXT), ("pool_mode", TEXT)], rows, tag="SHOW")

    def show_bans(self, snap: Snapshot) -> bytes:
        return m.result_set(*bans_table(snap), tag="SHOW BANS")

    def show_config(self) -> bytes:
        return m.result_set(*config_table(self.app.file_config), tag="SHOW")

    def show_version(self) -> bytes:
        return m.result_set([("version", TEXT)], [[f"pypool {__version__}"]], tag="SHOW")

    def show_help(self) -> bytes:
        usage = m.notice_response("Console usage", detail="\n\t" + "\n\t".join(HELP_LINES))
        return usage + m.command_complete("SHOW")


# ------------------------------------------------------------------ tables
# Pure functions: a snapshot (and the averages) in, (columns, rows) out.

Table = tuple[list[tuple[str, int]], list[list[object]]]


def _numeric(*names: str) -> list[tuple[str, int]]:
    return [(n, NUMERIC) for n in names]


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def pools_table(snap: Snapshot) -> Table:
    columns = [("database", TEXT), ("user", TEXT), ("pool_mode", TEXT)] + _numeric(
        "cl_idle", "cl_active", "cl_waiting", "cl_cancel_req", "sv_active", "sv_idle", "sv_used", "sv_tested",
        "sv_login", "maxwait", "maxwait_us")
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
                     sv.get("tested", 0), sv.get("login", 0), wait // 1_000_000, wait % 1_000_000])
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
        "total_xact_time": _us(c["xact_time"]), "total_query_time": 0, "total_wait_time": _us(c["wait_time"]),
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
        row["wait_time"] += _us(c["wait_time"])
    return _by_database(by_db)


def stats_averages_table(snap: Snapshot, averager: Averager) -> Table:
    """PgBouncer's SHOW STATS_AVERAGES: rates per second, times per transaction / assignment (us)."""
    by_db: dict[str, dict[str, float]] = {}
    weights: dict[str, dict[str, float]] = {}
    for a in snap.addresses:
        avg = averager.get(a.key)
        row = by_db.setdefault(a.pool, dict.fromkeys(PGBOUNCER_STATS, 0.0))
        w = weights.setdefault(a.pool, {"xact": 0.0, "assign": 0.0})
        row["server_assignment_count"] += avg["server_assignment_count"]
        row["xact_count"] += avg["xact_count"]
        row["query_count"] += avg["query_count"]
        row["bytes_received"] += avg["sent"]
        row["bytes_sent"] += avg["recv"]
        # Per-event times of several servers: weighted by how many events each had.
        row["xact_time"] += avg["xact_time"] * avg["xact_count"]
        w["xact"] += avg["xact_count"]
        row["wait_time"] += avg["wait_time"] * avg["server_assignment_count"]
        w["assign"] += avg["server_assignment_count"]
    for name, row in by_db.items():
        w = weights[name]
        row["xact_time"] = row["xact_time"] / w["xact"] if w["xact"] else 0
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
    columns = [("client_id", TEXT), ("database", TEXT), ("user", TEXT), ("application_name", TEXT),
               ("state", TEXT)] + _numeric("transaction_count", "query_count", "error_count", "age_seconds",
                                           "maxwait", "maxwait_us")
    rows = []
    for c in snap.clients:
        if c.state == "login":
            continue  # still authenticating: not a client of any pool yet
        wait = _us(c.maxwait)
        rows.append([_hex_id(c.client_id), c.database, c.user, c.application_name, c.state, c.transaction_count,
                     c.query_count, c.error_count, int(c.age_seconds), wait // 1_000_000, wait % 1_000_000])
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
        if "password" in f.name:
            continue  # never shown
        key = _GENERAL_KEYS.get(f.name, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append([key, _config_value(getattr(config.general, f.name)),
                     "-" if default is None else _config_value(default),
                     "no" if key in _NOT_CHANGEABLE else "yes"])
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


_BAN_COLUMNS = [("db", TEXT), ("user", TEXT), ("role", TEXT), ("host", TEXT), ("port", TEXT)]


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
