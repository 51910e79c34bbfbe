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

Every error is an ErrorResponse with a SQLSTATE; the session stays usable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

from pypool import __version__
from pypool import metrics as stats
from pypool.config import ConfigError, General, Pool, User
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.protocol.frames import ProtocolViolation

if TYPE_CHECKING:
    from pypool.app import Application
    from pypool.client import ClientConnection

log = logging.getLogger("pypool.admin")

ADMIN_DATABASES = frozenset({"pgcat", "pgbouncer", "pypool"})

TEXT = 25
INT4 = 23
NUMERIC = 1700

SQLSTATE_CONFIG_FILE_ERROR = "F0000"
SQLSTATE_UNDEFINED_OBJECT = "42704"

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
_NOT_CHANGEABLE = frozenset({"host", "port", "worker_threads", "enable_prometheus_exporter",
                             "prometheus_exporter_port", "tls_certificate", "tls_private_key", "client_tls_mode"})
_GENERAL_KEYS = {"workers": "worker_threads"}  # dataclass field -> PgCat's key


class AdminError(Exception):
    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


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
        self._commands: dict[str, Callable[[list[str]], bytes]] = {
            "SHOW": self.show, "SET": self.ignore_set, "RELOAD": self.reload, "PAUSE": self.pause,
            "RESUME": self.resume, "SHUTDOWN": self.shutdown, "BAN": self.ban, "UNBAN": self.unban,
        }
        self._show: dict[str, Callable[[list[str]], bytes]] = {
            "POOLS": self.show_pools, "STATS": self.show_stats, "SERVERS": self.show_servers,
            "CLIENTS": self.show_clients, "DATABASES": self.show_databases, "CONFIG": self.show_config,
            "LISTS": self.show_lists, "USERS": self.show_users, "VERSION": self.show_version,
            "BANS": self.show_bans, "HELP": self.show_help, "STATS_TOTALS": self.show_stats_totals,
            "STATS_AVERAGES": self.show_stats_averages,
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
                self.execute(m.parse_query(payload))
            elif tag == m.SYNC:
                discarding = False
                self._write(m.ready_for_query())
            elif tag in _EXTENDED:
                if not discarding:
                    discarding = True
                    self._write(m.error_response(
                        m.SQLSTATE_FEATURE_NOT_SUPPORTED,
                        "the pypool admin console supports only the simple query protocol",
                        hint="send admin commands as simple queries (psql does; in psycopg use "
                             "execute() without parameters)"))
            else:
                raise ProtocolViolation(f"unexpected message type {chr(tag)!r} on the admin console")

    def execute(self, sql: str) -> None:
        statements = [s.strip() for s in sql.split(";")]
        statements = [s for s in statements if s]
        if not statements:
            self._write(m.empty_query_response() + m.ready_for_query())
            return
        out = []
        for statement in statements:
            try:
                out.append(self.command(statement))
            except AdminError as exc:
                out.append(m.error_response(exc.sqlstate, str(exc)))
                break
            except Exception as exc:  # noqa: BLE001 - a bug in one command must not end the session
                log.exception("admin command %r failed", statement)
                out.append(m.error_response(m.SQLSTATE_INTERNAL_ERROR, f"internal error in pypool: {exc}"))
                break
        out.append(m.ready_for_query())
        self._write(b"".join(out))

    def command(self, statement: str) -> bytes:
        tokens = statement.split()
        verb = tokens[0].upper()
        handler = self._commands.get(verb)
        if handler is not None:
            return handler(tokens[1:])
        if verb in _NOT_IMPLEMENTED:
            raise AdminError(m.SQLSTATE_FEATURE_NOT_SUPPORTED,
                             f"{verb} is a PgBouncer admin command that pypool does not implement; "
                             "SHOW HELP lists the commands pypool supports")
        raise AdminError(m.SQLSTATE_SYNTAX_ERROR,
                         f'unsupported admin command "{statement[:60]}"; SHOW HELP lists the commands')

    # ------------------------------------------------------------- commands

    def show(self, args: list[str]) -> bytes:
        if not args:
            raise AdminError(m.SQLSTATE_SYNTAX_ERROR, "SHOW needs an argument; SHOW HELP lists them")
        what = args[0].upper()
        handler = self._show.get(what)
        if handler is not None:
            return handler(args[1:])
        if what in _SHOW_NOT_IMPLEMENTED:
            raise AdminError(m.SQLSTATE_FEATURE_NOT_SUPPORTED, f"SHOW {what} is not implemented by pypool")
        raise AdminError(SQLSTATE_UNDEFINED_OBJECT,
                         f'unsupported SHOW "{args[0]}" on the admin console; SHOW HELP lists them')

    def ignore_set(self, args: list[str]) -> bytes:
        return m.command_complete("SET")

    def reload(self, args: list[str]) -> bytes:
        log.info("admin %s: RELOAD", self.client.peer)
        try:
            self.app.reload(reason="admin RELOAD")
        except ConfigError as exc:
            raise AdminError(SQLSTATE_CONFIG_FILE_ERROR, f"config not reloaded, the old one stays: {exc}") from None
        return m.command_complete("RELOAD")

    def _pool_target(self, verb: str, args: list[str]) -> tuple[list, str]:
        text = " ".join(args).strip()
        if not text:
            return list(self.app.groups.values()), verb
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 2 or not all(parts):
            raise AdminError(m.SQLSTATE_SYNTAX_ERROR, f"usage: {verb} [db[, user]]")
        database = parts[0]
        if len(parts) == 2:
            group = self.app.groups.get((database, parts[1]))
            if group is None:
                raise AdminError(m.SQLSTATE_INVALID_CATALOG,
                                 f"No pool configured for database: {database}, user: {parts[1]}")
            return [group], f"{verb} {database},{parts[1]}"
        groups = [g for (name, _), g in self.app.groups.items() if name == database]
        if not groups:
            raise AdminError(m.SQLSTATE_INVALID_CATALOG, f"No pool configured for database: {database}")
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
        host, _, port = target.partition(":")
        if port and not port.isdigit():
            raise AdminError(m.SQLSTATE_SYNTAX_ERROR, f"invalid port in {target!r}")
        for view in stats.address_views(self.app):
            if view.host == host and (not port or view.port == int(port)):
                yield view

    def ban(self, args: list[str]) -> bytes:
        if len(args) != 2:
            raise AdminError(m.SQLSTATE_SYNTAX_ERROR, "usage: BAN hostname[:port] duration_seconds")
        try:
            seconds = int(args[1])
        except ValueError:
            raise AdminError(m.SQLSTATE_SYNTAX_ERROR, "duration_seconds must be an integer") from None
        if seconds <= 0:
            raise AdminError(m.SQLSTATE_SYNTAX_ERROR, "duration_seconds must be > 0")
        rows = []
        for view in list(self._matching(args[0])):
            group, sp = view.group, view.current
            if sp is group.primary or group.is_banned(sp):
                continue  # the primary is never banned, as in PgCat
            group.ban(sp, f"AdminBan({seconds})", duration=seconds)
            rows.append([view.pool_name, view.user, view.role, view.host, view.port])
        log.info("admin %s: BAN %s %ss: %d server(s)", self.client.peer, args[0], seconds, len(rows))
        return m.result_set(_BAN_COLUMNS, rows, tag="BAN")

    def unban(self, args: list[str]) -> bytes:
        if len(args) != 1:
            raise AdminError(m.SQLSTATE_SYNTAX_ERROR, "UNBAN command requires a hostname[:port] to unban")
        rows = []
        for view in list(self._matching(args[0])):
            group, sp = view.group, view.current
            if group.is_banned(sp):
                group.unban(sp)
                rows.append([view.pool_name, view.user, view.role, view.host, view.port])
        log.info("admin %s: UNBAN %s: %d server(s)", self.client.peer, args[0], len(rows))
        return m.result_set(_BAN_COLUMNS, rows, tag="UNBAN")

    # ---------------------------------------------------------------- SHOW

    def show_pools(self, args: list[str]) -> bytes:
        columns = [("database", TEXT), ("user", TEXT), ("pool_mode", TEXT)] + [
            (c, NUMERIC) for c in ("cl_idle", "cl_active", "cl_waiting", "cl_cancel_req", "sv_active", "sv_idle",
                                   "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us")]
        rows = []
        now = time.monotonic()
        for view in stats.pool_views(self.app):
            c = stats.pool_counts(self.app, view, now)
            wait = c["maxwait_us_total"]
            rows.append([view.pool_name, view.user, view.group.pool_mode, c["cl_idle"], c["cl_active"],
                         c["cl_waiting"], c["cl_cancel_req"], c["sv_active"], c["sv_idle"], c["sv_used"],
                         c["sv_tested"], c["sv_login"], wait // 1_000_000, wait % 1_000_000])
        return m.result_set(columns, rows, tag="SHOW")

    def show_stats(self, args: list[str]) -> bytes:
        columns = [("instance", TEXT), ("database", TEXT), ("user", TEXT)] + [(c, NUMERIC) for c in (
            "total_xact_count", "total_query_count", "total_received", "total_sent", "total_xact_time",
            "total_query_time", "total_wait_time", "total_errors", "avg_xact_count", "avg_query_count", "avg_recv",
            "avg_sent", "avg_errors", "avg_xact_time", "avg_query_time", "avg_wait_time")]
        rows = []
        for view in stats.address_views(self.app):
            t = stats.totals(view)
            a = self.app.averager.get(view.key)
            rows.append([view.name, view.pool_name, view.user, t.xact_count, t.query_count, t.bytes_received,
                         t.bytes_sent, int(t.xact_time * 1e6), 0, int(t.wait_time * 1e6), t.errors,
                         _int(a["xact_count"]), _int(a["query_count"]), _int(a["recv"]), _int(a["sent"]),
                         _int(a["errors"]), _int(a["xact_time"]), _int(a["query_time"]), _int(a["wait_time"])])
        return m.result_set(columns, rows, tag="SHOW")

    _PGBOUNCER_STATS = ("server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
                        "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
                        "bind_count")

    def show_stats_totals(self, args: list[str]) -> bytes:
        """PgBouncer's SHOW STATS_TOTALS: per database, bytes from the clients' side, times in microseconds."""
        by_db: dict[str, dict[str, int]] = {}
        for view in stats.address_views(self.app):
            t = stats.totals(view)
            row = by_db.setdefault(view.pool_name, dict.fromkeys(self._PGBOUNCER_STATS, 0))
            row["server_assignment_count"] += t.checkouts
            row["xact_count"] += t.xact_count
            row["query_count"] += t.query_count
            row["bytes_received"] += t.bytes_sent  # what clients sent pypool went on to the server
            row["bytes_sent"] += t.bytes_received
            row["xact_time"] += int(t.xact_time * 1e6)
            row["wait_time"] += int(t.wait_time * 1e6)
        return self._stats_by_db(by_db)

    def show_stats_averages(self, args: list[str]) -> bytes:
        by_db: dict[str, dict[str, float]] = {}
        weights: dict[str, dict[str, float]] = {}
        for view in stats.address_views(self.app):
            a = self.app.averager.get(view.key)
            row = by_db.setdefault(view.pool_name, dict.fromkeys(self._PGBOUNCER_STATS, 0.0))
            w = weights.setdefault(view.pool_name, {"xact": 0.0, "assign": 0.0})
            row["server_assignment_count"] += a["server_assignment_count"]
            row["xact_count"] += a["xact_count"]
            row["query_count"] += a["query_count"]
            row["bytes_received"] += a["sent"]
            row["bytes_sent"] += a["recv"]
            # Per-transaction / per-assignment times, weighted by how many there were.
            row["xact_time"] += a["xact_time"] * a["xact_count"]
            w["xact"] += a["xact_count"]
            row["wait_time"] += a["wait_time"] * a["server_assignment_count"]
            w["assign"] += a["server_assignment_count"]
        for name, row in by_db.items():
            w = weights[name]
            row["xact_time"] = row["xact_time"] / w["xact"] if w["xact"] else 0
            row["wait_time"] = row["wait_time"] / w["assign"] if w["assign"] else 0
        return self._stats_by_db({k: {c: _int(v) for c, v in row.items()} for k, row in by_db.items()})

    def _stats_by_db(self, by_db: dict[str, dict[str, int]]) -> bytes:
        columns = [("database", TEXT)] + [(c, NUMERIC) for c in self._PGBOUNCER_STATS]
        rows = [[name] + [row[c] for c in self._PGBOUNCER_STATS] for name, row in sorted(by_db.items())]
        return m.result_set(columns, rows, tag="SHOW")

    def show_servers(self, args: list[str]) -> bytes:
        columns = [("server_id", TEXT), ("database_name", TEXT), ("user", TEXT), ("address_id", TEXT),
                   ("application_name", TEXT), ("state", TEXT)] + [(c, NUMERIC) for c in (
                       "transaction_count", "query_count", "bytes_sent", "bytes_received", "age_seconds",
                       "prepare_cache_hit", "prepare_cache_miss", "prepare_cache_eviction", "prepare_cache_size")]
        now = time.monotonic()
        check_delay = self.app.config.general.healthcheck_delay / 1000
        rows = []
        for view in stats.address_views(self.app):
            for sp in view.pools:
                for conn in stats._live(sp):
                    state = stats.server_state(conn, sp, now, check_delay)
                    ps = conn.statements
                    cache = (ps.hits, ps.misses, ps.evictions, len(ps.names)) if ps is not None else (0, 0, 0, 0)
                    rows.append([_hex_id(conn.backend_pid), view.pool_name, view.user, view.name,
                                 conn.applied_parameters.get("application_name", ""),
                                 "test" if state == "tested" else state, conn.xact_count, conn.query_count,
                                 conn.bytes_sent, conn.bytes_received, int(now - conn.created_at), *cache])
        return m.result_set(columns, rows, tag="SHOW")

    def show_clients(self, args: list[str]) -> bytes:
        columns = [("client_id", TEXT), ("database", TEXT), ("user", TEXT), ("application_name", TEXT),
                   ("state", TEXT)] + [(c, NUMERIC) for c in (
                       "transaction_count", "query_count", "error_count", "age_seconds", "maxwait", "maxwait_us")]
        now = time.monotonic()
        rows = []
        for client in sorted(self.app.clients, key=lambda c: c.connected_at):
            if client.admin is not None:
                state = "active" if client is self.client else "idle"
            elif client.group is not None:
                state = stats.client_state(client)
            else:
                continue  # still logging in
            wait_us = int(stats.client_wait(client, now) * 1_000_000)
            rows.append([_hex_id(client.process_id), client.database, client.user,
                         client.session_parameters.get("application_name", ""), state, client.xact_count,
                         client.query_count, client.error_count, int(now - client.connected_at),
                         wait_us // 1_000_000, wait_us % 1_000_000])
        return m.result_set(columns, rows, tag="SHOW")

    def show_databases(self, args: list[str]) -> bytes:
        columns = [("name", TEXT), ("host", TEXT), ("port", TEXT), ("database", TEXT), ("force_user", TEXT),
                   ("pool_size", INT4), ("min_pool_size", INT4), ("reserve_pool", INT4), ("pool_mode", TEXT),
                   ("max_connections", INT4), ("current_connections", INT4), ("paused", INT4), ("disabled", INT4)]
        rows = []
        for view in stats.address_views(self.app):
            sp, group = view.current, view.group
            rows.append([view.name, view.host, str(view.port), view.database, view.user, sp.settings.pool_size,
                         sp.settings.min_pool_size, 0, group.pool_mode, sp.settings.pool_size,
                         sum(p.size for p in view.pools), int(sp.paused), int(group.is_banned(sp))])
        return m.result_set(columns, rows, tag="SHOW")

    def show_config(self, args: list[str]) -> bytes:
        columns = [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)]
        config = self.app.config
        rows = []
        for f in dataclasses.fields(General):
            if "password" in f.name:
                continue
            key = _GENERAL_KEYS.get(f.name, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append([key, _config_value(getattr(config.general, f.name)),
                         "-" if default is None else _config_value(default),
                         "no" if key in _NOT_CHANGEABLE else "yes"])
        for name, pool in sorted(config.pools.items()):
            for f in dataclasses.fields(Pool):
                if f.name in ("name", "users", "shards"):
                    continue
                default = f.default if f.default is not dataclasses.MISSING else None
                rows.append([f"pools.{name}.{f.name}", _config_value(getattr(pool, f.name)),
                             "-" if default is None else _config_value(default), "yes"])
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
        return m.result_set(columns, rows, tag="SHOW")

    def show_lists(self, args: list[str]) -> bytes:
        clients = list(self.app.clients)
        pooled = [c for c in clients if c.group is not None and c.admin is None]
        addresses = stats.address_views(self.app)
        free_servers = used_servers = 0
        for view in addresses:
            for sp in view.pools:
                live = stats._live(sp)
                idle = sum(1 for c in sp.idle if not c.closed)
                free_servers += idle
                used_servers += len(live) - idle
        rows = [
            ["databases", len(addresses)],
            ["users", len({u for (_, u) in self.app.groups})],
            ["pools", len(self.app.groups)],
            ["free_clients", sum(1 for c in pooled if stats.client_state(c) == "idle")],
            ["used_clients", sum(1 for c in pooled if stats.client_state(c) != "idle")
             + sum(1 for c in clients if c.admin is not None)],
            ["login_clients", sum(1 for c in clients if c.group is None and c.admin is None)],
            ["free_servers", free_servers],
            ["used_servers", used_servers],
            ["dns_names", 0], ["dns_zones", 0], ["dns_queries", 0], ["dns_pending", 0],
        ]
        return m.result_set([("list", TEXT), ("items", INT4)], rows, tag="SHOW")

    def show_users(self, args: list[str]) -> bytes:
        rows = [[user, group.pool_mode] for (_, user), group in sorted(self.app.groups.items())]
        return m.result_set([("name", TEXT), ("pool_mode", TEXT)], rows, tag="SHOW")

    def show_version(self, args: list[str]) -> bytes:
        return m.result_set([("version", TEXT)], [[f"pypool {__version__}"]], tag="SHOW")

    def show_bans(self, args: list[str]) -> bytes:
        columns = [(c, TEXT) for c in ("db", "user", "role", "host", "reason", "ban_time", "ban_duration_seconds",
                                       "ban_remaining_seconds", "port")]
        now = time.monotonic()
        rows = []
        for view in stats.address_views(self.app):
            sp = view.current
            remaining = sp.banned_until - now
            if remaining <= 0:
                continue
            banned_at = datetime.datetime.fromtimestamp(sp.banned_at, datetime.timezone.utc)
            rows.append([view.pool_name, view.user, view.role, view.host, sp.ban_reason,
                         banned_at.strftime("%Y-%m-%d %H:%M:%S.%f"), str(int(sp.ban_duration)),
                         str(int(remaining + 0.999)), str(view.port)])
        return m.result_set(columns, rows, tag="SHOW BANS")

    def show_help(self, args: list[str]) -> bytes:
        fields = (b"S" + m.cstr("NOTICE") + b"V" + m.cstr("NOTICE") + b"C" + m.cstr("00000")
                  + b"M" + m.cstr("Console usage") + b"D" + m.cstr("\n\t" + "\n\t".join(HELP_LINES)) + b"\x00")
        return m.message(m.NOTICE_RESPONSE, fields) + m.command_complete("SHOW")


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
