"""All server pools of one PgCat pool entry for one user: the primary and its replicas.

A client session asks the group for a connection of a role ("primary" or
"replica"); which server answers is decided here, so choosing a server per
transaction is one call.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pypool.pool.balancer import Balancer
from pypool.pool.pool import PoolSettings, ServerPool
from pypool.pool.server import Credentials, ServerConnection, ServerError
from pypool.protocol import messages as m

if TYPE_CHECKING:
    from pypool.config import General, Pool, User

log = logging.getLogger("pypool.pool")

PRIMARY = "primary"
REPLICA = "replica"

# Parameters a client is told at login even before any server was reached.
FALLBACK_PARAMETERS = {
    "server_version": "15.0",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "IntervalStyle": "postgres",
    "is_superuser": "off",
}
# Reported parameters that describe one backend session, not the server.
SESSION_PARAMETERS = ("application_name", "is_superuser", "session_authorization")


def _override(user_value: int | None, pool_value: int) -> int:
    return pool_value if user_value is None else user_value


class PoolGroup:
    def __init__(self, pool: "Pool", user: "User", general: "General", share: float = 1.0) -> None:
        self.config = pool
        self.user = user
        self.general = general
        self.name = pool.name
        self.pool_mode = user.pool_mode or pool.pool_mode
        server_user = user.server_username or user.username
        server_password = user.server_password or user.password
        shard = pool.shards[0]
        credentials = Credentials(server_user, server_password, shard.database)
        # With several worker processes each takes its share of pool_size so the total holds.
        size = max(1, int(user.pool_size * share))
        settings = PoolSettings(
            pool_size=size,
            min_pool_size=min(size, int(user.min_pool_size * share)),
            connect_timeout=_override(user.connect_timeout, pool.connect_timeout) / 1000,
            checkout_timeout=pool.checkout_timeout / 1000,
            idle_timeout=_override(user.idle_timeout, pool.idle_timeout) / 1000,
            server_lifetime=_override(user.server_lifetime, pool.server_lifetime) / 1000,
        )
        self.settings = settings
        self.primary: ServerPool | None = None
        self.replicas: list[ServerPool] = []
        for address in shard.servers:
            server_pool = ServerPool(address, credentials, settings)
            if address.role == PRIMARY:
                self.primary = server_pool
            else:
                self.replicas.append(server_pool)
        self.balancer = Balancer(pool.load_balancing_mode)
        self.server_parameters: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"<PoolGroup {self.name}/{self.user.username}>"

    @property
    def all_pools(self) -> list[ServerPool]:
        return ([self.primary] if self.primary else []) + self.replicas

    def start(self) -> None:
        for server_pool in self.all_pools:
            server_pool.start()

    async def close(self) -> None:
        for server_pool in self.all_pools:
            await server_pool.close()

    # ----------------------------------------------------------------- checkout

    def _pool_for(self, role: str) -> ServerPool:
        if role == REPLICA and self.replicas:
            return self.balancer.pick(self.replicas)
        if self.primary is None:
            raise ServerError(f"pool {self.name} has no primary server", {"C": m.SQLSTATE_CONNECTION_FAILURE})
        return self.primary

    def try_checkout(self, role: str) -> ServerConnection | None:
        """An idle connection of ``role`` right now, or None (then use checkout)."""
        return self._pool_for(role).try_acquire()

    async def checkout(self, role: str) -> ServerConnection:
        server_pool = self._pool_for(role)
        conn = await server_pool.acquire()
        self._learn_parameters(conn)
        return conn

    def checkin(self, conn: ServerConnection) -> None:
        if conn.pool is not None:
            conn.pool.release(conn)
        else:
            conn.detach()
            conn.close()

    def checkin_broken(self, conn: ServerConnection) -> None:
        if conn.pool is not None:
            conn.pool.release_broken(conn)
        else:
            conn.detach()
            conn.close()

    def _learn_parameters(self, conn: ServerConnection) -> None:
        if self.server_parameters is None and conn.parameters:
            self.server_parameters = {k: v for k, v in conn.parameters.items() if k not in SESSION_PARAMETERS}

    async def login_parameters(self) -> dict[str, str]:
        """The ParameterStatus set a newly logged-in client is told.

        Learnt from the first server connection; if none was made yet, make
        one (primary first, then replicas) so clients see real values.
        """
        if self.server_parameters is None:
            for role in (PRIMARY, REPLICA):
                try:
                    conn = await self.checkout(role)
                except Exception as exc:  # noqa: BLE001 - try the next server
                    log.debug("parameter discovery via %s failed: %s", role, exc)
                    continue
                self.checkin(conn)
                break
        return dict(self.server_parameters or FALLBACK_PARAMETERS)
