"""Health monitor: one dedicated connection per server, asked every second.

Each check reads ``pg_is_in_recovery()``, the replica's replay lag and the
server's WAL position, so the group learns four things without waiting for a
client to hit a problem: whether the server is reachable (bans), how far behind
it is (``max_replica_lag_ms``), which server is really the primary (failover),
and where each replica's replay stands (causal reads, ``pypool.causal``). A
read waiting for a replica to catch up asks for that position again on the same
connection (``check_position``) rather than wait for the next tick.

The monitor's connection is not taken from the pool, so it never counts
against ``pool_size``; it carries ``application_name = 'pypool-monitor'``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pypool.causal.lsn import Position, parse_position
from pypool.pool.connect import open_connection
from pypool.pool.server import ServerConnection, ServerError

if TYPE_CHECKING:
    from pypool.causal.positions import ReplicaPositions
    from pypool.pool.pool import ServerPool

log = logging.getLogger("pypool.health")

MONITOR_INTERVAL = 1.0  # seconds between checks of one server
MONITOR_APPLICATION_NAME = "pypool-monitor"

# The server's WAL position and timeline (``causal.lsn.parse_position`` reads the two columns).
# A replica: how far it replayed, on the timeline it receives (pg_stat_wal_receiver hides that from
# roles without pg_read_all_stats: then the timeline of its last restartpoint). The primary: its
# flush position (a record end or page boundary a replica can reach) and, from the WAL file name,
# its current timeline (right after a promotion too).
POSITION_COLUMNS = (
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_flush_lsn() END, "
    "CASE WHEN pg_is_in_recovery() THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), "
    "(SELECT timeline_id FROM pg_control_checkpoint()))::text "
    "ELSE pg_walfile_name(pg_current_wal_flush_lsn()) END"
)
POSITION_QUERY = "SELECT " + POSITION_COLUMNS
# Lag is 0 when the replica has replayed all it received (or receives nothing,
# e.g. the primary is down: nothing newer exists to be behind on).
HEALTH_QUERY = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN NOT pg_is_in_recovery() "
    "OR COALESCE(pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), true) THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000, 0) "
    "END, " + POSITION_COLUMNS
)


@dataclass(frozen=True, slots=True)
class HealthResult:
    ok: bool
    in_recovery: bool | None = None
    lag_ms: float | None = None
    error: str | None = None
    position: Position | None = None  # replay position of a replica, flush position of the primary


class ServerMonitor:
    def __init__(self, server_pool: "ServerPool", timeout: float,
                 on_result: Callable[["ServerPool", HealthResult], None],
                 interval: float = MONITOR_INTERVAL,
                 positions: "ReplicaPositions[ServerPool] | None" = None) -> None:
        self.server_pool = server_pool
        self.timeout = timeout
        self.interval = interval
        self.on_result = on_result
        self.positions = positions
        self._conn: ServerConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one query at a time on the monitor's connection

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Not ``await self._task`` in a try: its CancelledError and one for the caller of stop()
            # look alike, and swallowing the caller's would leave it running on.
            await asyncio.wait([self._task])
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

    def _record_position(self, in_recovery: bool | None, position: Position | None) -> None:
        positions = self.positions
        if positions is None or in_recovery is None:
            return
        if in_recovery:
            positions.observe(self.server_pool, position, time.monotonic())
        else:
            positions.forget(self.server_pool)  # a primary serves every read: nothing to wait for
            if position is not None:
                positions.observe_primary(position)

    async def check(self) -> HealthResult:
        try:
            rows = await self._query(HEALTH_QUERY)
        except asyncio.TimeoutError:
            return HealthResult(False, error=f"health check timed out after {self.timeout * 1000:.0f} ms")
        except (ServerError, OSError) as exc:
            return HealthResult(False, error=str(exc))
        in_recovery = rows[0][0] == "t"
        position = parse_position(rows[0][2], rows[0][3])
        self._record_position(in_recovery, position)
        return HealthResult(True, in_recovery, float(rows[0][1] or 0), position=position)

    async def check_position(self) -> Position | None:
        """The server's WAL position now, asked on the monitor's connection (for a waiting causal read).

        The caller records it (``causal.wait``); raises ServerError, OSError or
        TimeoutError if the server cannot answer within the health check timeout.
        """
        rows = await self._query(POSITION_QUERY)
        return parse_position(rows[0][0], rows[0][1])

    async def _query(self, sql: str) -> list[list[str | None]]:
        sp = self.server_pool
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await open_connection(sp.address, sp.credentials,
                                                       {"application_name": MONITOR_APPLICATION_NAME},
                                                       sp.settings.connect_timeout, tls=sp.settings.tls)
                # Not wait_for: on Python 3.11 it drops a cancel that comes with the reply, and stop() hangs.
                async with asyncio.timeout(self.timeout):
                    return await self._conn.query(sql)
            except BaseException:  # also cancelled half-way: the connection may still owe a reply
                self._drop()
                raise

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
