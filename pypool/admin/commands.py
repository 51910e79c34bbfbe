"""Admin console commands: parse one statement, run it against the pooler, answer with wire bytes.

``SHOW ...`` renders a table (``pypool.admin.tables``) from one statistics
snapshot taken for the statement; ``RELOAD``, ``PAUSE``/``RESUME``,
``BAN``/``UNBAN``, ``SHUTDOWN`` and ``SET`` (accepted, ignored) change or ask
the running pooler. Every failure is an ``AdminError`` carrying a SQLSTATE, which
the console turns into an ErrorResponse; the session stays usable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from pypool import __version__, sqlstates
from pypool.admin import tables
from pypool.admin.tables import BAN_COLUMNS, TEXT
from pypool.config import ConfigError
from pypool.errors import PoolerError
from pypool.protocol import messages as m

if TYPE_CHECKING:
    from pypool.config import Config
    from pypool.pool.group import PoolGroup
    from pypool.pool.pool import ServerPool
    from pypool.snapshot import Averager, Snapshot

log = logging.getLogger("pypool.admin")

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


class AdminError(PoolerError):
    """An admin command failed: the console answers with an ERROR and keeps the session."""


class Pooler(Protocol):
    """What the console needs of the running pooler (``pypool.app.Application`` is one)."""

    config: Config
    file_config: Config  # as configured: what SHOW CONFIG reports for the instance
    groups: dict[tuple[str, str, int], PoolGroup]
    averager: Averager
    worker: Instance | None

    async def stats_snapshot(self) -> Snapshot: ...

    def reload(self, reason: str) -> None: ...

    def request_shutdown(self, reason: str) -> None: ...

    def register_cancel_key(self, client: object) -> tuple[int, int]: ...


class Instance(Protocol):
    """One worker of several processes (``pypool.instance.Worker``): runs a statement for all of them."""

    async def admin_command(self, commands: AdminCommands, statement: str) -> bytes: ...


class AdminCommands:
    """Runs admin statements for one caller: a console session, or a peer worker's control request."""

    def __init__(self, pooler: Pooler, peer: str) -> None:
        self.pooler = pooler
        self.peer = peer  # who asked, for the log
        self._commands: dict[str, Callable[[list[str]], bytes]] = {
            "SET": self.ignore_set, "RELOAD": self.reload, "PAUSE": self.pause, "RESUME": self.resume,
            "SHUTDOWN": self.shutdown, "BAN": self.ban, "UNBAN": self.unban,
        }
        self._show: dict[str, Callable[[Snapshot], tables.Table]] = {
            "POOLS": tables.pools_table, "STATS": self._stats_table, "SERVERS": tables.servers_table,
            "CLIENTS": tables.clients_table, "DATABASES": tables.databases_table, "LISTS": tables.lists_table,
            "USERS": tables.users_table, "BANS": tables.bans_table, "STATS_TOTALS": tables.stats_totals_table,
            "STATS_AVERAGES": self._stats_averages_table,
        }
        self._show_static: dict[str, Callable[[], bytes]] = {
            "CONFIG": self.show_config, "VERSION": self.show_version, "HELP": self.show_help,
        }

    async def run(self, statement: str) -> bytes:
        """One statement (no ``;``) of this process; raises AdminError."""
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

    # ---------------------------------------------------------------- SHOW

    async def show(self, args: list[str]) -> bytes:
        if not args:
            raise AdminError(sqlstates.SYNTAX_ERROR, "SHOW needs an argument; SHOW HELP lists them")
        what = args[0].upper()
        static = self._show_static.get(what)
        if static is not None:
            return static()
        table = self._show.get(what)
        if table is not None:
            return m.result_set(*table(await self.pooler.stats_snapshot()),
                                tag="SHOW BANS" if what == "BANS" else "SHOW")
        if what in _SHOW_NOT_IMPLEMENTED:
            raise AdminError(sqlstates.FEATURE_NOT_SUPPORTED, f"SHOW {what} is not implemented by pypool")
        raise AdminError(sqlstates.UNDEFINED_OBJECT,
                         f'unsupported SHOW "{args[0]}" on the admin console; SHOW HELP lists them')

    def _stats_table(self, snap: Snapshot) -> tables.Table:
        return tables.stats_table(snap, self.pooler.averager)

    def _stats_averages_table(self, snap: Snapshot) -> tables.Table:
        return tables.stats_averages_table(snap, self.pooler.averager)

    def show_config(self) -> bytes:
        return m.result_set(*tables.config_table(self.pooler.file_config), tag="SHOW")

    def show_version(self) -> bytes:
        return m.result_set([("version", TEXT)], [[f"pypool {__version__}"]], tag="SHOW")

    def show_help(self) -> bytes:
        usage = m.notice_response("Console usage", detail="\n\t" + "\n\t".join(HELP_LINES))
        return usage + m.command_complete("SHOW")

    # ------------------------------------------------------------ commands

    def ignore_set(self, args: list[str]) -> bytes:
        return m.command_complete("SET")

    def reload(self, args: list[str]) -> bytes:
        log.info("admin %s: RELOAD", self.peer)
        try:
            self.pooler.reload(reason="admin RELOAD")
        except ConfigError as exc:
            raise AdminError(sqlstates.CONFIG_FILE_ERROR, f"config not reloaded, the old one stays: {exc}") from None
        return m.command_complete("RELOAD")

    def _pool_target(self, verb: str, args: list[str]) -> tuple[list[PoolGroup], str]:
        text = " ".join(args).strip()
        groups = self.pooler.groups
        if not text:
            return list(groups.values()), verb
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 2 or not all(parts):
            raise AdminError(sqlstates.SYNTAX_ERROR, f"usage: {verb} [db[, user]]")
        database = parts[0]
        if len(parts) == 2:
            shards = [g for (name, user, _), g in groups.items() if name == database and user == parts[1]]
            if not shards:
                raise AdminError(sqlstates.INVALID_CATALOG_NAME,
                                 f"No pool configured for database: {database}, user: {parts[1]}")
            return shards, f"{verb} {database},{parts[1]}"
        matching = [g for (name, _, _), g in groups.items() if name == database]
        if not matching:
            raise AdminError(sqlstates.INVALID_CATALOG_NAME, f"No pool configured for database: {database}")
        return matching, verb

    def pause(self, args: list[str]) -> bytes:
        return self._pause_or_resume("PAUSE", args)

    def resume(self, args: list[str]) -> bytes:
        return self._pause_or_resume("RESUME", args)

    def _pause_or_resume(self, verb: str, args: list[str]) -> bytes:
        groups, tag = self._pool_target(verb, args)
        for group in groups:
            for sp in group.all_pools:
                if verb == "PAUSE":
                    sp.pause()
                else:
                    sp.resume()
        log.info("admin %s: %s %s", self.peer, "paused" if verb == "PAUSE" else "resumed",
                 ", ".join(f"{g.name}/{g.user.username}" for g in groups))
        return m.command_complete(tag)

    def shutdown(self, args: list[str]) -> bytes:
        log.info("admin %s: SHUTDOWN", self.peer)
        # After this reply is written: the drain runs as its own task.
        asyncio.get_running_loop().call_soon(self.pooler.request_shutdown, "admin SHUTDOWN")
        return m.result_set([("success", TEXT)], [["t"]], tag="SHUTDOWN")

    def _matching(self, target: str) -> Iterator[tuple[PoolGroup, ServerPool]]:
        """(group, server pool) pairs whose server is ``host`` or ``host:port``."""
        host, _, port = target.partition(":")
        if port and not port.isdigit():
            raise AdminError(sqlstates.SYNTAX_ERROR, f"invalid port in {target!r}")
        for _, group in sorted(self.pooler.groups.items()):
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
        log.info("admin %s: BAN %s %ss: %d server(s)", self.peer, args[0], seconds, len(rows))
        return m.result_set(BAN_COLUMNS, rows, tag="BAN")

    def unban(self, args: list[str]) -> bytes:
        if len(args) != 1:
            raise AdminError(sqlstates.SYNTAX_ERROR, "UNBAN command requires a hostname[:port] to unban")
        rows = []
        for group, sp in list(self._matching(args[0])):
            if group.is_banned(sp):
                group.unban(sp)
                role = "primary" if sp is group.primary else "replica"
                rows.append([group.name, group.user.username, role, sp.address.host, sp.address.port])
        log.info("admin %s: UNBAN %s: %d server(s)", self.peer, args[0], len(rows))
        return m.result_set(BAN_COLUMNS, rows, tag="UNBAN")
