"""A pool's list of open connections (SHOW SERVERS, the pool's counts): each leaves it as it ends."""

from __future__ import annotations

import asyncio

import pytest

from pypool.config import ServerAddress
from pypool.pool import pool as pool_module
from pypool.pool.pool import PoolSettings, ServerPool
from pypool.pool.server import Credentials, ServerConnection
from tests.unit._fakes import Recorder


@pytest.fixture
def opened(monkeypatch) -> list[ServerConnection]:
    """Connections the pool opens: logged in at once, writing to a Recorder."""
    made: list[ServerConnection] = []

    async def fake_open_connection(address, credentials, startup_params, timeout, tls=None):
        conn = ServerConnection(address, credentials)
        conn.connection_made(Recorder())
        made.append(conn)
        return conn

    monkeypatch.setattr(pool_module, "open_connection", fake_open_connection)
    return made


def _pool(size: int) -> ServerPool:
    return ServerPool(ServerAddress("127.0.0.1", 1, "primary"), Credentials("u", "p", "db"),
                      PoolSettings(pool_size=size, min_pool_size=0, connect_timeout=1, checkout_timeout=5,
                                   idle_timeout=0, server_lifetime=0))


def test_every_way_a_connection_ends_takes_it_off_the_list_with_its_counts_kept(opened):
    async def main() -> None:
        pool = _pool(3)
        lost, broken, idle = [await pool.acquire() for _ in range(3)]
        assert pool.connections == {lost, broken, idle}
        for conn in (lost, broken, idle):
            conn.query_count = 5  # requests it answered
        pool.release(lost)
        pool.release(idle)
        lost.connection_lost(None)  # the server closed an idle connection (a restart, idle_session_timeout)
        pool.release_broken(broken)  # pypool closed one whose state it could not trust
        assert pool.connections == {idle}
        assert pool.stats.query_count == 10  # the two that ended; the open one is added at read time
        await pool.close()
        assert pool.connections == set() and pool.stats.query_count == 15

    asyncio.run(main())


def test_a_connection_ending_twice_is_counted_once(opened):
    async def main() -> None:
        pool = _pool(1)
        conn = await pool.acquire()
        conn.query_count = 7
        pool.release_broken(conn)  # closes it
        conn.connection_lost(None)  # and then its socket reports the close
        assert pool.connections == set() and pool.stats.query_count == 7

    asyncio.run(main())
