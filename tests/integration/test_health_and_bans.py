"""healthcheck_delay, bans and startup with a dead server (issue 3), on the shared cluster.

A hung server is simulated without touching the shared nodes: one idle
*backend process* of pypool's own pool is stopped with SIGSTOP (the server
and every other session carry on) and continued with SIGCONT afterwards.
The pool's connection to it stays open, so only a health check can tell.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import time

import psycopg
import pytest

from pypool.config import ServerAddress
from pypool.pool.health import ServerMonitor
from pypool.pool.pool import HealthCheckFailed, PoolSettings, ServerPool
from pypool.pool.server import Credentials
from tests.conftest import DATABASE, PASSWORD, USER, free_port
from tests.integration._support import assert_failed_on_one_connect

pytestmark = pytest.mark.integration

HEALTHCHECK_DELAY_MS = 300
HEALTHCHECK_TIMEOUT_MS = 1000


def connect(proc, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(proc.dsn(), prepare_threshold=None, autocommit=autocommit)


@contextlib.contextmanager
def stopped(pid: int):
    """SIGSTOP one backend process; always SIGCONT it again."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def within(seconds: float, fn, *args):
    """Run a blocking client call, failing (not hanging) if it takes longer than ``seconds``."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn, *args)
        try:
            return future.result(seconds)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"client call still blocked after {seconds}s")


def pid_and_port(conn: psycopg.Connection, sql: str = "SELECT pg_backend_pid(), inet_server_port()"):
    return conn.execute(sql).fetchone()


def health_config(**pool: object) -> dict:
    return {
        "general": {"healthcheck_delay": HEALTHCHECK_DELAY_MS, "healthcheck_timeout": HEALTHCHECK_TIMEOUT_MS,
                    "ban_time": 60},
        "pools": {DATABASE: {"load_balancing_mode": "round_robin", "primary_reads_enabled": False,
                             "users": {"0": {"pool_size": 1}}, **pool}},
    }


# ------------------------------------------------------- the pool, in-process


def _pool(port: int, delay: float) -> ServerPool:
    settings = PoolSettings(pool_size=1, min_pool_size=0, connect_timeout=5, checkout_timeout=5, idle_timeout=0,
                            server_lifetime=0, healthcheck_delay=delay, healthcheck_timeout=1.0)
    return ServerPool(ServerAddress("127.0.0.1", port, "replica"), Credentials(USER, PASSWORD, DATABASE), settings)


async def test_recently_used_connection_skips_the_check_and_a_stale_one_gets_it(pg_cluster):
    pool = _pool(pg_cluster[1].port, delay=0.5)
    try:
        conn = await pool.acquire()
        pool.release(conn)
        for _ in range(3):  # used moments ago: handed out synchronously, no round trip
            again = pool.try_acquire()
            assert again is conn
            pool.release(again)
        assert pool.stats.healthchecks == 0
        await asyncio.sleep(0.8)
        assert pool.try_acquire() is None  # idle past healthcheck_delay: not without a check
        checked = await pool.acquire()
        assert checked is conn and pool.stats.healthchecks == 1 and pool.stats.healthcheck_failures == 0
        assert await checked.query("SELECT 1") == [["1"]]
        pool.release(checked)
    finally:
        await pool.close()


async def test_stale_connection_that_fails_its_check_is_closed(pg_cluster):
    pool = _pool(pg_cluster[1].port, delay=0.2)
    try:
        conn = await pool.acquire()
        victim = conn.backend_pid
        pool.release(conn)
        with stopped(victim):
            await asyncio.sleep(0.4)
            with pytest.raises(HealthCheckFailed) as excinfo:
                await asyncio.wait_for(pool.acquire(), 60)  # 60 s only stops a hang
            assert excinfo.value.sqlstate == "08006"
            assert "health check of an idle connection" in str(excinfo.value)
            assert "timed out after 1000 ms" in str(excinfo.value)  # healthcheck_timeout, not connect_timeout
            assert conn.closed and pool.size == 0 and not pool.idle and pool.active == 0
            assert pool.stats.healthcheck_failures == 1
            fresh = await pool.acquire()  # the server itself is fine: a new connection works
            assert fresh.backend_pid != victim
            pool.release(fresh)
    finally:
        await pool.close()


async def _cancel_took_effect(pool: ServerPool, acquiring: "asyncio.Task") -> bool:
    """Cancel ``acquiring`` now; True if the cancel was taken (the task then ends cancelled)."""
    if not acquiring.cancel():
        return False  # done already: it has its connection, no cancel was asked
    with pytest.raises(asyncio.CancelledError):  # not the connection: that would leave it checked out
        await asyncio.wait_for(acquiring, 60)  # 60 s only stops a hang
    return True


async def test_a_checkout_cancelled_as_a_connection_is_handed_to_it_gives_the_connection_back(pg_cluster):
    """A client leaving (its checkout cancelled) in the instant a release hands it a connection.

    On Python 3.11 ``asyncio.wait_for`` returned the connection to the cancelled checkout and
    dropped the cancel: the connection stayed checked out for a client that was gone.
    """
    pool = _pool(pg_cluster[0].port, delay=float("inf"))
    try:
        first = await pool.acquire()  # pool_size 1: the next checkout waits
        acquiring = asyncio.ensure_future(pool.acquire())
        while not pool.waiters:
            await asyncio.sleep(0)
        pool.release(first)  # handed to the waiting checkout ...
        assert await _cancel_took_effect(pool, acquiring)  # ... whose client leaves at once
        assert pool.active == 0 and list(pool.idle) == [first]
    finally:
        await pool.close()


async def test_a_checkout_cancelled_as_its_health_check_is_answered_gives_the_connection_back(pg_cluster):
    """The same, cancelled in the instant the ``;`` check of a stale idle connection is answered."""
    pool = _pool(pg_cluster[0].port, delay=0.05)
    try:
        conn = await pool.acquire()
        pool.release(conn)
        await asyncio.sleep(0.1)  # idle past healthcheck_delay: the next checkout checks it
        acquiring = asyncio.ensure_future(pool.acquire())
        while not conn.reply_owed:  # the check is sent
            await asyncio.sleep(0)
        while conn.reply_owed:  # until the reply is read, then cancel at once
            await asyncio.sleep(0)
        if await _cancel_took_effect(pool, acquiring):
            assert pool.active == 0
        else:
            assert acquiring.result() is conn and pool.active == 1
            pool.release(conn)
    finally:
        await pool.close()


async def test_a_cancelled_monitor_stop_is_cancelled(pg_cluster):
    """The caller of ServerMonitor.stop() cancelled while it waits for the monitor to end: cancelled
    too (a shutdown or reload cut short), not returning as if nothing had been asked of it."""
    monitor = ServerMonitor(_pool(pg_cluster[0].port, delay=float("inf")), 5.0, lambda _pool, _result: None)
    monitor.start()
    await asyncio.sleep(0)  # the monitor runs
    stopping = asyncio.ensure_future(monitor.stop())
    await asyncio.sleep(0)  # stop() cancelled the monitor and waits for it to end ...
    stopping.cancel()  # ... when its own caller is cancelled
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopping, 60)  # 60 s only stops a hang
    await monitor.stop()


# ------------------------------------------------------ through a pypool process


def test_hung_replica_connection_is_replaced_without_a_client_error(start_pypool, pg_cluster):
    replicas = {n.port for n in pg_cluster[1:]}
    proc = start_pypool(health_config())
    with connect(proc) as conn:
        backends: dict[int, set[int]] = {}
        for _ in range(6):
            pid, port = pid_and_port(conn)
            backends.setdefault(port, set()).add(pid)
        assert set(backends) == replicas and all(len(p) == 1 for p in backends.values()), backends
        victim_port = pg_cluster[1].port
        (victim,) = backends[victim_port]
        with stopped(victim):
            time.sleep(HEALTHCHECK_DELAY_MS / 1000 * 2)
            # Round robin reaches the hung connection within two reads; its check fails,
            # the replica is banned and the read runs on the other one.
            ports = [within(30, pid_and_port, conn)[1] for _ in range(6)]
        assert set(ports) == replicas - {victim_port}, ports
    log = proc.log()
    assert f"banning replica 127.0.0.1:{victim_port}" in log
    assert "health check of an idle connection" in log


def test_hung_primary_connection_is_replaced_by_a_fresh_one(start_pypool, pg_cluster):
    primary = pg_cluster[0].port
    # Causal reads off: the connection goes idle with the reply (no commit-position lookup after
    # the hinted query, which a stopped backend would leave unanswered until healthcheck_timeout).
    proc = start_pypool(health_config(causal_reads="off"))
    hint = "/* pypool: role=primary */ SELECT pg_backend_pid(), inet_server_port()"
    with connect(proc) as conn:
        victim, port = pid_and_port(conn, hint)
        assert port == primary
        with stopped(victim):
            time.sleep(HEALTHCHECK_DELAY_MS / 1000 * 2)
            pid, port = within(30, pid_and_port, conn, hint)
        assert port == primary and pid != victim
    assert "reconnecting to the primary" in proc.log()


def test_pool_exhaustion_and_slow_queries_do_not_ban_a_replica(start_pypool, pg_cluster):
    replicas = {n.port for n in pg_cluster[1:]}
    proc = start_pypool(health_config(checkout_timeout=1000))
    holders: list[psycopg.Connection] = []
    held: set[int] = set()
    try:
        # Hold both replicas' only connection in open transactions.
        for _ in range(6):
            if held == replicas:
                break
            conn = connect(proc, autocommit=False)
            try:
                held.add(conn.execute("SELECT inet_server_port()").fetchone()[0])
                holders.append(conn)
            except psycopg.OperationalError as exc:  # landed on a held one: that is exhaustion too
                assert exc.sqlstate == "53300", exc
                conn.close()
        assert held == replicas
        with connect(proc) as waiting:
            with pytest.raises(psycopg.OperationalError) as excinfo:
                waiting.execute("SELECT inet_server_port()")
            assert excinfo.value.sqlstate == "53300"
            assert "checkout_timeout" in str(excinfo.value)
    finally:
        for conn in holders:
            conn.close()
    with connect(proc) as conn:
        # Queries slower than healthcheck_timeout on both replicas (the hint forces pg_sleep there).
        for _ in range(2):
            conn.execute("/* pypool: role=replica */ SELECT pg_sleep(1.5)")
        seen = {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(10)}
    assert seen == replicas, "a replica lost its reads after pool exhaustion or a slow query"
    assert "banning replica" not in proc.log()


def test_startup_with_an_unreachable_replica_serves_reads_from_the_other(start_pypool, pg_cluster):
    primary, live = pg_cluster[0].port, pg_cluster[1].port
    dead = free_port()  # nothing listens here
    proc = start_pypool({"pools": {DATABASE: {
        "load_balancing_mode": "round_robin", "primary_reads_enabled": False,
        "shards": {"0": {"database": DATABASE, "servers": [
            ["127.0.0.1", primary, "primary"], ["127.0.0.1", live, "replica"], ["127.0.0.1", dead, "replica"]]}},
    }}})
    with connect(proc) as conn:
        ports = [conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(10)]
        assert set(ports) == {live}
        port = conn.execute("/* pypool: role=primary */ SELECT inet_server_port()").fetchone()[0]
        assert port == primary
    assert f"banning replica 127.0.0.1:{dead}" in proc.log()


def test_startup_with_an_unreachable_primary_serves_reads_and_fails_writes_fast(start_pypool, pg_cluster):
    replicas = {n.port for n in pg_cluster[1:]}
    dead = free_port()
    proc = start_pypool({
        "general": {"connect_timeout": 1000},
        "pools": {DATABASE: {
            "load_balancing_mode": "round_robin", "primary_reads_enabled": False,
            "shards": {"0": {"database": DATABASE, "servers": [
                ["127.0.0.1", dead, "primary"]] + [["127.0.0.1", port, "replica"] for port in sorted(replicas)]}},
        }}})
    with connect(proc) as conn:
        assert {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(6)} == replicas
        with pytest.raises(psycopg.OperationalError) as excinfo:
            conn.execute("CREATE TEMP TABLE never (v int)")
        assert excinfo.value.sqlstate == "08006" and f"127.0.0.1:{dead}" in str(excinfo.value)
        assert_failed_on_one_connect(str(excinfo.value), 1000)
        # The session carries on after the failed write.
        assert conn.execute("SELECT 1").fetchone() == (1,)
