"""What an operator reads first: a summary of the config at start, and a one-time login probe of each server.

The summary says which config file was read and, per pool, its mode, routing,
servers with their roles and users, so a wrong file or a misread key shows in
the first lines of the log. The probe logs in to every server once with the
pool's credentials, in the background, and warns about each one that is
unreachable or refuses the login: the pooler starts either way (a server may
come up later), but the operator learns at once instead of at the first
client's error. Passwords are never part of a line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pypool import __version__, sqlstates
from pypool.about import runtime
from pypool.pool.connect import open_connection
from pypool.pool.server import Credentials, ServerError
from pypool.tls import server_context

if TYPE_CHECKING:
    from pypool.config import Config, Pool, ServerAddress

log = logging.getLogger("pypool.startup")

# SQLSTATEs with which a reachable server refuses a login (wrong password, no such role or database).
_REFUSALS = (sqlstates.INVALID_PASSWORD, sqlstates.INVALID_AUTHORIZATION_SPECIFICATION, sqlstates.INVALID_CATALOG_NAME)


def describe(config: "Config") -> list[str]:
    """The start-up summary, one log line per entry."""
    general = config.general
    lines = [f"pypool {__version__} starting with config {config.path}", f"running on {runtime()}"]
    workers = f", {general.workers} worker processes" if general.workers > 1 else ""
    if general.workers_auto:
        workers = f", workers = \"auto\": {general.workers} worker process{'es' if general.workers > 1 else ''}"
    lines.append(f"listen {general.host}:{general.port}{workers}; admin console user {general.admin_username}")
    for pool in config.pools.values():
        lines.extend(_describe_pool(pool))
    if not config.pools:
        lines.append("no pools configured: every client will be refused")
    return lines


def _describe_pool(pool: "Pool") -> list[str]:
    if pool.query_parser_enabled and pool.query_parser_read_write_splitting:
        routing = "reads split to replicas by the query parser"
    else:
        routing = "no read/write splitting"
    lines = [f'pool "{pool.name}": {pool.pool_mode} mode, {routing}, default_role {pool.default_role}, '
             f"load balancing {pool.load_balancing_mode}, primary reads "
             f"{'on' if pool.primary_reads_enabled else 'off'}"]
    for index, shard in enumerate(pool.shards):
        servers = ", ".join(f"{s.host}:{s.port} ({s.role})" for s in shard.servers)
        lines.append(f'pool "{pool.name}" shard {index}: database {shard.database} on {servers}')
    for user in pool.users.values():
        mode = user.pool_mode or pool.pool_mode
        server_user = f", logs in to PostgreSQL as {user.server_username}" if user.server_username else ""
        lines.append(f'pool "{pool.name}" user {user.username}: pool_size {user.pool_size}, '
                     f"min_pool_size {user.min_pool_size}, {mode} mode{server_user}")
    return lines


def log_startup(config: "Config") -> None:
    for line in describe(config):
        log.info("%s", line)


@dataclass(frozen=True)
class ProbeResult:
    address: "ServerAddress"
    pool: str
    user: str  # the user the server was asked to accept
    database: str
    problem: str | None  # None: the login worked
    refused: bool = False  # reachable, but the login was refused


def _probes(config: "Config") -> dict[tuple, tuple["ServerAddress", str, Credentials, float]]:
    """One login per server and credentials: pool users that log in to a server alike probe it once."""
    probes: dict[tuple, tuple["ServerAddress", str, Credentials, float]] = {}
    for pool in config.pools.values():
        for user in pool.users.values():
            server_user = user.server_username or user.username
            password = user.server_password or user.password
            timeout = (pool.connect_timeout if user.connect_timeout is None else user.connect_timeout) / 1000
            for shard in pool.shards:
                credentials = Credentials(server_user, password, shard.database)
                for address in shard.servers:
                    probes.setdefault((address.host, address.port, credentials),
                                      (address, pool.name, credentials, timeout))
    return probes


async def _probe_one(address: "ServerAddress", pool: str, credentials: Credentials, timeout: float,
                     config: "Config") -> ProbeResult:
    try:
        conn = await open_connection(address, credentials, {"application_name": "pypool startup check"},
                                     timeout, tls=server_context(config.general))
    except ServerError as exc:
        return ProbeResult(address, pool, credentials.user, credentials.database, str(exc),
                           refused=exc.sqlstate in _REFUSALS)
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never stops the pooler
        return ProbeResult(address, pool, credentials.user, credentials.database, f"{type(exc).__name__}: {exc}")
    conn.close()
    return ProbeResult(address, pool, credentials.user, credentials.database, None)


async def probe_servers(config: "Config") -> list[ProbeResult]:
    """Log in once to every configured server; log a warning for each that cannot be reached or refuses."""
    results = await asyncio.gather(*(_probe_one(address, pool, credentials, timeout, config)
                                     for address, pool, credentials, timeout in _probes(config).values()))
    for r in results:
        where = f'{r.address.host}:{r.address.port} ({r.address.role} of pool "{r.pool}")'
        if r.problem is None:
            log.info("server %s accepts user %s on database %s", where, r.user, r.database)
        elif r.refused:
            log.warning("server %s refuses the login of user %s to database %s: %s", where, r.user, r.database,
                        r.problem)
        else:
            log.warning("server %s is unreachable: %s", where, r.problem)
    return results


def probe_in_background(config: "Config") -> threading.Thread:
    """Run :func:`probe_servers` on a thread of its own, so that it never delays or blocks start-up."""
    thread = threading.Thread(target=lambda: asyncio.run(probe_servers(config)), name="pypool-startup-probe",
                              daemon=True)
    thread.start()
    return thread
