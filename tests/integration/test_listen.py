"""LISTEN/NOTIFY through pypool in transaction mode: the pool's listener fans notifications out."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.conftest import user_overrides
from tests.integration._support import PRIMARY_ONLY, merge

pytestmark = pytest.mark.integration


@pytest.fixture
def one_connection(start_pypool):
    return start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))


def connect(pypool) -> psycopg.Connection:
    return psycopg.connect(pypool.dsn(), autocommit=True)


def received(conn: psycopg.Connection, count: int, timeout: float = 10) -> list[tuple[str, str]]:
    return [(n.channel, n.payload) for n in conn.notifies(timeout=timeout, stop_after=count)]


def test_psycopg_listen_gets_notify_from_another_client(one_connection):
    with connect(one_connection) as listener, connect(one_connection) as other, connect(one_connection) as bystander:
        listener.execute("LISTEN jobs")
        listener.execute('LISTEN "Mixed Case"')
        # The one pooled server connection serves everybody in between.
        assert other.execute("SELECT 1").fetchone() == (1,)
        other.execute("NOTIFY jobs, 'first'")
        with other.transaction():
            other.execute("SELECT pg_notify('Mixed Case', 'second')")
        assert received(listener, 2) == [("jobs", "first"), ("Mixed Case", "second")]
        assert received(bystander, 1, timeout=0.5) == [], "a client that did not LISTEN got a notification"

        listener.execute("UNLISTEN jobs")
        other.execute("NOTIFY jobs, 'dropped'")
        other.execute("""NOTIFY "Mixed Case", 'kept'""")
        assert received(listener, 1) == [("Mixed Case", "kept")]


def test_notification_waits_for_the_listeners_transaction_to_answer(one_connection, pg_cluster):
    with connect(one_connection) as listener, connect(one_connection) as other:
        listener.execute("LISTEN during")
        listener.execute("BEGIN")
        listener.execute("SELECT 1")
        # pool_size = 1 and the listener holds it in a transaction: notify from the primary itself.
        direct_dsn = one_connection.dsn().replace(f":{one_connection.port}/", f":{pg_cluster[0].port}/")
        with psycopg.connect(direct_dsn, autocommit=True) as direct:
            direct.execute("NOTIFY during, 'x'")
        assert listener.execute("SELECT 2").fetchone() == (2,)  # the reply is not disturbed
        listener.execute("COMMIT")
        assert received(listener, 1) == [("during", "x")]
        assert other.execute("SELECT 3").fetchone() == (3,)


def test_asyncpg_add_listener(one_connection):
    async def main() -> None:
        listener = await asyncpg.connect(one_connection.dsn())
        sender = await asyncpg.connect(one_connection.dsn())
        queue: asyncio.Queue = asyncio.Queue()
        await listener.add_listener("events", lambda _c, _pid, channel, payload: queue.put_nowait((channel, payload)))
        for i in range(3):
            await sender.execute(f"NOTIFY events, 'n{i}'")
        got = [await asyncio.wait_for(queue.get(), 10) for _ in range(3)]
        assert got == [("events", "n0"), ("events", "n1"), ("events", "n2")]
        await listener.close()
        await sender.close()

    asyncio.run(main())


def own_notifications(dsn: str) -> list:
    """What psycopg's notify handler has seen right after each statement of a client that notifies itself."""
    seen = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        got: list[psycopg.Notify] = []
        conn.add_notify_handler(got.append)
        me = conn.pgconn.backend_pid

        def now() -> list:
            return [(n.channel, n.payload, n.pid == me) for n in got]

        conn.execute("LISTEN own")
        conn.execute("NOTIFY own, 'simple'")
        seen.append(now())
        with conn.transaction():
            conn.execute("SELECT pg_notify('own', 'in a transaction')")
            seen.append(now())  # delivered at commit, not before
        seen.append(now())
        conn.execute("NOTIFY elsewhere, 'not listened'")
        seen.append(now())
        with conn.transaction():
            conn.execute("NOTIFY own, 'rolled back'")
            raise psycopg.Rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        seen.append(now())
    return seen


def test_psycopg_notify_handler_fires_right_after_its_own_notify(one_connection, pg_cluster):
    direct = one_connection.dsn().replace(f":{one_connection.port}/", f":{pg_cluster[0].port}/")
    expected = own_notifications(direct)
    assert expected[0] == [("own", "simple", True)]
    assert own_notifications(one_connection.dsn()) == expected


def test_a_notification_carries_the_pid_pypool_gave_its_sender(one_connection, pg_cluster):
    """As directly: the PID is the sender's BackendKeyData one (asyncpg: ``get_server_pid()``), also when
    the sender is another pypool client on the same pooled backend; from outside pypool, the server's."""
    direct_dsn = one_connection.dsn().replace(f":{one_connection.port}/", f":{pg_cluster[0].port}/")

    async def main() -> None:
        listener = await asyncpg.connect(one_connection.dsn())
        sender = await asyncpg.connect(one_connection.dsn())
        direct = await asyncpg.connect(direct_dsn)
        queue: asyncio.Queue = asyncio.Queue()
        await listener.add_listener("ipc", lambda _c, pid, _channel, payload: queue.put_nowait((pid, payload)))
        await listener.add_listener('12+"34', lambda _c, pid, _channel, payload: queue.put_nowait((pid, payload)))

        async def next_one() -> tuple[int, str]:
            return await asyncio.wait_for(queue.get(), 10)

        await sender.execute("NOTIFY ipc, 'simple'")
        assert await next_one() == (sender.get_server_pid(), "simple")
        await sender.execute("""NOTIFY "12+""34", 'quoted'""")
        assert await next_one() == (sender.get_server_pid(), "quoted")
        for i in range(2):  # prepared once (Parse), then only bound from asyncpg's statement cache
            await sender.execute("SELECT pg_notify($1, $2)", "ipc", f"bound {i}")
            assert await next_one() == (sender.get_server_pid(), f"bound {i}")
        async with sender.transaction():
            await sender.execute("NOTIFY ipc, 'committed'")
        assert await next_one() == (sender.get_server_pid(), "committed")
        # The listener notifying itself keeps getting its own PID.
        await listener.execute("NOTIFY ipc, 'own'")
        assert await next_one() == (listener.get_server_pid(), "own")
        # From outside pypool: the backend that sent it.
        await direct.execute("NOTIFY ipc, 'outside'")
        assert await next_one() == (direct.get_server_pid(), "outside")
        # The pooled backend serves a client that does not notify: nothing is attributed to anyone.
        assert await sender.fetchval("SELECT 1") == 1
        for conn in (listener, sender, direct):
            await conn.close()

    asyncio.run(main())
