"""Load and slow clients: thousands of clients on a small pool, a slow reader, idle transactions.

* 5,000 concurrent asyncpg clients share ``pool_size = 20`` and finish a short
  workload with no error while pypool's memory stays bounded
  (``PYPOOL_LONG=1``: 5,000 clients with more queries each);
* a client that reads a large result slowly holds back only its own server
  connection (back-pressure), not the other clients, and pypool does not
  buffer the result;
* ``idle_client_in_transaction_timeout`` ends a client that idles in a
  transaction with 25P03 and rolls the transaction back.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
import time
import uuid

import asyncpg
import psycopg
import pytest

from pypool import cluster
from tests.conftest import DATABASE, PASSWORD, USER, user_overrides
from tests.integration._support import PRIMARY_ONLY, login, merge, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = os.environ.get("PYPOOL_LONG") == "1"
CLIENTS = 5000
QUERIES_PER_CLIENT = 20 if LONG else 3


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def many_files():
    """Room for 5,000 client sockets here and 5,000 more in the pypool child (it inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 2 * CLIENTS + 2000) if hard != resource.RLIM_INFINITY else 2 * CLIENTS + 2000
    if wanted < CLIENTS + 500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {CLIENTS} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_5000_clients_through_pool_size_20(many_files, start_pypool):
    proc = start_pypool(merge(PRIMARY_ONLY, {
        "general": {"client_auth_method": "md5", "checkout_timeout": 120_000},
        "pools": {DATABASE: {"users": {"0": {"pool_size": 20}}}}}))
    rss_idle = rss_mib(proc.proc.pid)
    errors: list[BaseException] = []
    figures: dict[str, float] = {}

    async def run() -> int:
        connect_gate = asyncio.Semaphore(200)  # a connection storm, but one the accept backlog can take
        all_connected = asyncio.Event()
        connected = 0
        done = 0

        async def one(i: int) -> None:
            nonlocal connected, done
            async with connect_gate:
                conn = await asyncpg.connect(host="127.0.0.1", port=proc.port, user=USER, password=PASSWORD,
                                             database=DATABASE, statement_cache_size=0, timeout=120, ssl=False)
            try:
                connected += 1
                if connected == CLIENTS:
                    all_connected.set()
                await all_connected.wait()  # every client is connected before any works
                for q in range(QUERIES_PER_CLIENT):
                    # Tables are avoided: other runs may re-create pgbench's on the shared cluster.
                    value = await conn.fetchval("SELECT $1::int * 1000 + $2::int", i, q)
                    assert value == i * 1000 + q
                done += 1
            finally:
                await conn.close()

        async def watch_memory() -> None:
            await all_connected.wait()
            figures["rss_all_connected"] = rss_mib(proc.proc.pid)

        started = time.monotonic()
        watcher = asyncio.create_task(watch_memory())
        results = await asyncio.gather(*(one(i) for i in range(CLIENTS)), return_exceptions=True)
        figures["seconds"] = time.monotonic() - started
        watcher.cancel()
        errors.extend(r for r in results if isinstance(r, BaseException))
        return done

    done = asyncio.run(run())
    rss_after = rss_mib(proc.proc.pid)
    with psycopg.connect(proc.dsn(), prepare_threshold=None) as conn:  # pypool still takes new clients
        assert conn.execute("SELECT 1").fetchone() == (1,)
    print(f"\nload figures: {CLIENTS} concurrent clients, pool_size 20, {QUERIES_PER_CLIENT} queries each, "
          f"{done} finished, {len(errors)} errors in {figures['seconds']:.1f} s; pypool RSS {rss_idle:.0f} MiB "
          f"idle, {figures.get('rss_all_connected', 0):.0f} MiB with all connected, {rss_after:.0f} MiB after")
    assert not errors, errors[:5]
    assert done == CLIENTS
    assert figures["rss_all_connected"] < rss_idle + 400, figures  # about 70 KiB a client at most


def read_row_count(sock: socket.socket, chunk: int, pause: float, seconds: float) -> int:
    """Read a big result ``chunk`` bytes at a time, pausing between reads, for ``seconds``; count bytes."""
    got = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = sock.recv(chunk)
        if not data:
            break
        got += len(data)
        time.sleep(pause)
    return got


def test_slow_reader_does_not_stall_others_or_fill_memory(start_pypool, pg_cluster):
    proc = start_pypool(merge(PRIMARY_ONLY, {"pools": {DATABASE: {"users": {"0": {"pool_size": 4}}}}}))
    rss_before = rss_mib(proc.proc.pid)
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        slow.connect(("127.0.0.1", proc.port))
        slow.settimeout(30)
        login(slow)
        marker = f"slow-reader-{uuid.uuid4().hex[:8]}"
        sql = f"SELECT repeat('x', 1000) FROM generate_series(1, 300000) /* {marker} */\0".encode()  # ~300 MB
        slow.sendall(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
        got = read_row_count(slow, 4096, 0.01, 2.0)  # a slow start: the server produces much faster
        latencies = []
        with psycopg.connect(proc.dsn(), autocommit=True, prepare_threshold=None) as other:
            for _ in range(20):
                started = time.monotonic()
                assert other.execute("SELECT count(*) FROM generate_series(1, 1000)").fetchone() == (1000,)
                latencies.append(time.monotonic() - started)
        # The other client was served while the big result was still on its way: the primary still sends it.
        with psycopg.connect(cluster.psql_dsn(pg_cluster[0]), autocommit=True) as direct:
            assert direct.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                  "AND strpos(query, %s) > 0 AND pid <> pg_backend_pid()", [marker]).fetchone()[0] == 1
        got += read_row_count(slow, 4096, 0.01, 2.0)
        rss_during = rss_mib(proc.proc.pid)
    latencies.sort()
    print(f"\nslow reader figures: it read {got / 1e6:.1f} MB of a ~300 MB result in ~4 s; other client's "
          f"query p50 {latencies[10] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; pypool RSS "
          f"{rss_before:.0f} -> {rss_during:.0f} MiB")
    assert got < 200e6  # it really was slow
    # pypool paused reading the server instead of buffering the result.
    assert rss_during < rss_before + 64, (rss_before, rss_during)
    with psycopg.connect(proc.dsn(), autocommit=True, prepare_threshold=None) as conn:  # and the slow client's server came back clean
        for _ in range(8):
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_idle_client_in_transaction_timeout(start_pypool, pg_cluster):
    proc = start_pypool(merge(PRIMARY_ONLY, {"general": {"idle_client_in_transaction_timeout": 1000}}))
    table = f"pypool_idle_tx_{uuid.uuid4().hex[:8]}"  # other test sessions share the cluster
    with psycopg.connect(proc.dsn(), autocommit=True, prepare_threshold=None) as setup:
        setup.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        setup.execute(f"INSERT INTO {table} VALUES (1, 0)")
    idler = psycopg.connect(proc.dsn(), prepare_threshold=None)
    idler.execute(f"UPDATE {table} SET v = 99 WHERE id = 1")  # psycopg opened a transaction
    busy = psycopg.connect(proc.dsn(), prepare_threshold=None)
    outside = psycopg.connect(proc.dsn(), autocommit=True, prepare_threshold=None)
    # A transaction that is working (a long statement) is not idle, however long it takes.
    assert busy.execute("SELECT pg_sleep(2.5), 1").fetchone()[1] == 1
    wait_for(lambda: "idle in transaction for more than 1000 ms" in proc.log(), what="pypool to end the idle transaction")
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as excinfo:
        idler.execute("SELECT 1")
    assert excinfo.value.sqlstate == "25P03", excinfo.value
    assert "idle_client_in_transaction_timeout (1000 ms)" in str(excinfo.value)
    assert "rolled back" in str(excinfo.value)
    idler.close()
    # The update was rolled back, and the row lock is free again.
    assert outside.execute(f"SELECT v FROM {table} WHERE id = 1").fetchone() == (0,)
    outside.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
    # A client idle outside any transaction is left alone.
    time.sleep(2.0)
    assert outside.execute("SELECT 2").fetchone() == (2,)
    busy.close()
    outside.execute(f"DROP TABLE {table}")
    outside.close()
    assert "idle in transaction for more than 1000 ms" in proc.log()


def test_idle_client_in_transaction_timeout_ends_a_begin_pypool_holds(start_pypool):
    """Read/write splitting on: pypool answers a bare BEGIN itself and holds it (no server yet).
    Idle there past the timeout, the client is ended as PostgreSQL would end it: 25P03, same words."""
    proc = start_pypool({"general": {"idle_client_in_transaction_timeout": 1000}})
    idler = psycopg.connect(proc.dsn(), autocommit=True, prepare_threshold=None)
    idler.execute("BEGIN")
    working = psycopg.connect(proc.dsn(), autocommit=True, prepare_threshold=None)
    working.execute("BEGIN")
    deadline = time.monotonic() + 30  # only stops a hang
    while "idle in transaction for more than 1000 ms" not in proc.log():  # the working one is never idle 1 s
        assert time.monotonic() < deadline, "pypool did not end the client idle in the BEGIN it holds"
        assert working.execute("SELECT 1").fetchone() == (1,)
        time.sleep(0.2)
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as excinfo:
        idler.execute("SELECT 1")
    assert "idle_client_in_transaction_timeout (1000 ms)" in str(excinfo.value)
    assert "terminating connection due to idle-in-transaction timeout" in str(excinfo.value)
    idler.close()
    working.execute("COMMIT")
    assert working.execute("SELECT 2").fetchone() == (2,)
    working.close()


def test_user_statement_timeout_cancels_long_statements(start_pypool):
    proc = start_pypool(merge(PRIMARY_ONLY, user_overrides(statement_timeout=500)))
    with psycopg.connect(proc.dsn(), autocommit=True, prepare_threshold=None) as conn:
        # Not cancelled, the sleep would end without an error; the message names the server's timeout.
        with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to statement timeout"):
            conn.execute("SELECT pg_sleep(5)")
        # The session goes on, with the configured default in force on whichever server connection.
        assert conn.execute("SHOW statement_timeout").fetchone() == ("500ms",)
        # A client may still choose its own value for its transaction.
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '5s'")
            assert conn.execute("SELECT pg_sleep(0.8), 1").fetchone()[1] == 1
