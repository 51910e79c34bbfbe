"""How many connections several pypool instances may open to each PostgreSQL server.

Every instance runs every pool with the full ``pool_size`` (instances do not
know each other), so N instances may open N times the configured connections.
Each (pool, user) also keeps one health-monitor connection per server in each
worker process. ``pypool config check --instances N`` warns when the total
reaches a server's ``max_connections`` less its ``superuser_reserved_connections``.
(A pool whose clients use LISTEN also opens one listener connection to its primary.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pypool.config import Config

POSTGRES_MAX_CONNECTIONS = 100  # PostgreSQL's default
POSTGRES_RESERVED = 3  # superuser_reserved_connections' default


def connections_per_server(config: "Config", instances: int) -> dict[tuple[str, int], int]:
    """(host, port) -> the most connections ``instances`` instances of this config open there."""
    out: dict[tuple[str, int], int] = {}
    monitors = config.general.workers
    for pool in config.pools.values():
        per_group = sum(user.pool_size + monitors for user in pool.users.values())
        for shard in pool.shards:
            for server in shard.servers:
                key = (server.host, server.port)
                out[key] = out.get(key, 0) + instances * per_group
    return out


def instance_warnings(config: "Config", instances: int, max_connections: int = POSTGRES_MAX_CONNECTIONS,
                      reserved: int = POSTGRES_RESERVED) -> list[str]:
    usable = max_connections - reserved
    return [f"{instances} instance(s) may open up to {n} connections to {host}:{port} (pool_size of every user, "
            f"plus {config.general.workers} health-check connection(s) per pool and user, per instance), "
            f"not under max_connections {max_connections} - {reserved} reserved = {usable}: lower pool_size "
            f"or raise max_connections"
            for (host, port), n in sorted(connections_per_server(config, instances).items()) if n >= usable]
