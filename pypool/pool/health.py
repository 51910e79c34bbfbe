"""Health monitor: one dedicated connection per server, asked every second.

Each check reads ``pg_is_in_recovery()`` and the replica's replay lag, so the
group learns three things without waiting for a client to hit a problem:
whether the server is reachable (bans), how far behind it is
(``max_replica_lag_ms``), and which server is really the primary (failover).

The monitor's connection is not taken from the pool, so it never counts
against ``pool_size``; it carries ``application_name = 'pypool-monitor'``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pypool.pool.server import ServerConnection, ServerError, open_connection

if TYPE_CHECKING:
    from pypool.pool.pool import ServerPool

log = logging.getLogger("pypool.health")

MONITOR_INTERVAL = 1.0  # seconds between checks of one server
MONITOR_APPLICATION_NAME = "pypool-monitor"

# Lag is 0 when the replica has replayed all it received (or receives nothing,
# e.g. the primary is down: nothing newer exists to be behind on).
HEALTH_QUERY = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN NOT pg_is_in_recovery() "
    "OR COALESCE(pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), true) THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000, 0) "
    "END"
)


@dataclass(frozen=True, slots=True)
class HealthResult:
    ok: bool
    in_recovery: bool | None = None
    lag_ms: float | None = None
    error: str | None = None


class ServerMonitor:
    def __init__(self, server_pool: "ServerPool", timeout: float,
                 on_result: Callable[["ServerPool", HealthResult], None],
                 interval: float = MONITOR_INTERVAL) -> None:
        self.server_pool = server_pool
        self.timeout = timeout
        self.interval = interval
        self.on_result = on_result
        self._conn: ServerConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self) -> None:
        while True:
            result = await self.check()
            try:
                self.on_result(self.server_pool, result)
            except Exception:  # noqa: BLE001 - the monitor must keep running
                log.exception("handling health result for %s failed", self.server_pool.label)
            await asyncio.sleep(self.interval)

    async def check(self) -> HealthResult:
        sp = self.server_pool
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await open_connection(sp.address, sp.credentials,
                                                   {"application_name": MONITOR_APPLICATION_NAME},
                                                   sp.settings.connect_timeout, tls=sp.settings.tls)
            rows = await asyncio.wait_for(self._conn.query(HEALTH_QUERY), self.timeout)
        except asyncio.TimeoutError:
            self._drop()
            return HealthResult(False, error=f"health check timed out after {self.timeout * 1000:.0f} ms")
        except (ServerError, OSError) as exc:
            self._drop()
            return HealthResult(False, error=str(exc))
        in_recovery = rows[0][0] == "t"
        lag_ms = float(rows[0][1] or 0)
        return HealthResult(True, in_recovery, lag_ms)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
