"""Config reload (admin RELOAD and SIGHUP) under load, with real clients and the servers' own view."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import psycopg
import pytest

from pypool.config import ServerAddress, dump_config
from pypool.pool.pool import PoolRetired, PoolSettings, ServerPool
from pypool.pool.server import Credentials
from tests.conftest import DATABASE, PASSWORD, USER, user_overrides
from tests.integration._ops import admin, on_private_db, private_db, show, wait_for_log  # noqa: F401 - fixture
from tests.integration._support import PRIMARY_ONLY, local_tcp_ports, merge, wait_for
from tests.integration.test_metrics import scrape, total
from tests.integration.test_pool_limits import BackendSampler

pytestmark = pytest.mark.integration

# The acceptance run is 20 s; 8 s keeps the default suite short (PYPOOL_RELOAD_BENCH_SECONDS=20).
BENCH_SECONDS = int(os.environ.get("PYPOOL_RELOAD_BENCH_SECONDS", "8"))
CLIENTS = 8


def rewrite(pypool, *overrides: dict) -> None:
    pypool.config = merge(pypool.config, *overrides)
    pypool.config_path.write_text(dump_config(pypool.config))


def run_pgbench(pypool) -> subprocess.Popen:
    return subprocess.Popen(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER, "-c",
                             str(CLIENTS), "-j", "2", "-T", str(BENCH_SECONDS), "-S", DATABASE],
                            env=pypool.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(bench: subprocess.Popen) -> str:
    out, _ = bench.communicate(timeout=120)
    assert bench.returncode == 0, out
    assert "number of failed transactions: 0" in out, out
    assert "aborted" not in out, out
    return out


@pytest.mark.parametrize("trigger", ["RELOAD", "SIGHUP"])
def test_pool_size_change_during_pgbench(start_pypool, pg_cluster, private_db, trigger):
    pypool = start_pypool(merge(PRIMARY_ONLY, on_private_db(), user_overrides(pool_size=10)))
    sampler = BackendSampler(pg_cluster, pypool)
    bench = run_pgbench(pypool)
    sampler.start()
    try:
        # Reload once pgbench uses more connections than the new limit allows.
        wait_for(lambda: max(sampler.samples, default=0) > 3, timeout=BENCH_SECONDS,
                 what="pgbench to use more than 3 server connections")
        before = len(sampler.samples)
        rewrite(pypool, user_overrides(pool_size=3))
        if trigger == "RELOAD":
            with admin(pypool) as conn:
                assert conn.execute("RELOAD").statusmessage == "RELOAD"
        else:
            pypool.proc.send_signal(signal.SIGHUP)
        wait_for_log(pypool, "config reloaded")
        with admin(pypool) as conn:
            assert {d["pool_size"] for d in show(conn, "DATABASES")} == {3}
        out = finish(bench)
    finally:
        if bench.poll() is None:
            bench.kill()
        sampler.stop()
    assert f"number of clients: {CLIENTS}" in out
    old, new = sampler.samples[:before], sampler.samples[-5:]
    assert max(old) > 3, f"before the reload the primary saw at most {max(old)} connections"
    # The servers see the new limit once the old connections have drained.
    assert max(new) <= 3, f"after the reload the primary still saw {new} pool connections"
    with admin(pypool) as conn:
        primary = show(conn, "DATABASES")[0]
        assert primary["pool_size"] == 3 and primary["current_connections"] <= 3


@pytest.mark.parametrize("connecting_for", ["a waiting client", "min_pool_size"])
async def test_a_pool_retired_while_it_connects_counts_no_connection(pg_cluster, connecting_for):
    """A reload retires a pool in the middle of a connect: SHOW DATABASES current_connections (the
    pool's size, summed with its successor's) must not keep counting the connect it cancelled."""
    settings = PoolSettings(pool_size=3, min_pool_size=1 if connecting_for == "min_pool_size" else 0,
                            connect_timeout=5, checkout_timeout=5, idle_timeout=0, server_lifetime=0)
    pool = ServerPool(ServerAddress("127.0.0.1", pg_cluster[0].port, "primary"),
                      Credentials(USER, PASSWORD, DATABASE), settings)
    errors: list[Exception] = []
    if connecting_for == "min_pool_size":
        pool.start()
    else:
        assert pool.queue(lambda conn: None, errors.append) is not None  # no idle connection: one is opened
    await asyncio.sleep(0)  # the connect is under way
    assert pool.size == 1
    pool.retired = True  # as ``Reloader._retire`` does
    await pool.close()
    await pool.wait_closed()
    assert pool.size == 0
    if connecting_for == "a waiting client":
        assert [type(e) for e in errors] == [PoolRetired]


def test_unchanged_pool_keeps_its_connections(start_pypool, pg_cluster):
    pypool = start_pypool(PRIMARY_ONLY)
    with psycopg.connect(pypool.dsn(), autocommit=True) as app:
        backend = app.execute("SELECT pg_backend_pid()").fetchone()[0]
        rewrite(pypool, {"general": {"log_client_connections": True}})
        with admin(pypool) as conn:
            conn.execute("RELOAD")
            config = {r["key"]: r["value"] for r in show(conn, "CONFIG")}
        assert config["log_client_connections"] == "true"
        assert "1 pool(s) kept, 0 rebuilt" in wait_for_log(pypool, "config reloaded")
        assert app.execute("SELECT pg_backend_pid()").fetchone()[0] == backend


def test_removed_server_drains_without_client_errors(start_pypool, pg_cluster):
    primary, replica1, replica2 = (n.port for n in pg_cluster)
    pypool = start_pypool({"pools": {DATABASE: {"primary_reads_enabled": False}}})
    with psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=None) as app, \
            psycopg.connect(pypool.dsn(), prepare_threshold=None) as in_tx:
        ports = {app.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(20)}
        assert ports == {replica1, replica2}
        # A transaction on the replica about to be removed (psycopg opens it with BEGIN).
        while in_tx.execute("SELECT inet_server_port()").fetchone()[0] != replica2:
            in_tx.rollback()
        servers = [["127.0.0.1", primary, "primary"], ["127.0.0.1", replica1, "replica"]]
        rewrite(pypool, {"pools": {DATABASE: {"shards": {"0": {"servers": servers}}}}})
        with admin(pypool) as conn:
            conn.execute("RELOAD")
            assert [int(d["port"]) for d in show(conn, "DATABASES")] == [primary, replica1]
        # The open transaction finishes where it started; new reads avoid the removed server.
        assert in_tx.execute("SELECT inet_server_port()").fetchone()[0] == replica2
        in_tx.commit()
        assert {app.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(20)} == {replica1}
        assert in_tx.execute("SELECT inet_server_port()").fetchone()[0] == replica1
        in_tx.commit()
    # Nothing of this pypool stays connected to the removed server (its health monitor included).
    deadline = time.monotonic() + 15
    while True:
        with psycopg.connect(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{replica2}/{DATABASE}?sslmode=disable",
                             autocommit=True) as direct:
            ours = local_tcp_ports(pypool.proc.pid, replica2)
            left = [p for (p,) in direct.execute("SELECT client_port FROM pg_stat_activity "
                                                 "WHERE client_port IS NOT NULL").fetchall() if p in ours]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"pypool still holds {len(left)} connection(s) to the removed server"


def test_invalid_file_is_rejected_and_the_old_config_stays(start_pypool):
    pypool = start_pypool(PRIMARY_ONLY)
    rewrite(pypool, user_overrides(pool_size=-5))
    pypool.proc.send_signal(signal.SIGHUP)
    log = wait_for_log(pypool, "config reload (SIGHUP) rejected")
    line = next(line for line in log.splitlines() if "config reload (SIGHUP) rejected" in line)
    assert str(pypool.config_path) in line and "pool_size" in line, line
    with admin(pypool) as conn:
        assert {d["pool_size"] for d in show(conn, "DATABASES")} == {10}
    with psycopg.connect(pypool.dsn(), autocommit=True) as app:
        assert app.execute("SELECT 1").fetchone() == (1,)
    assert pypool.proc.poll() is None


def test_healthcheck_delay_change_applies_to_the_running_pools(start_pypool):
    """A reload that changes only healthcheck_delay must use the new value, not just show it."""
    pypool = start_pypool(merge(PRIMARY_ONLY, {"general": {"enable_prometheus_exporter": True,
                                                           "healthcheck_delay": 3_600_000}}))
    metrics_port = pypool.config["general"]["prometheus_exporter_port"]

    def healthchecks_after_queries() -> float:
        with psycopg.connect(pypool.dsn(), autocommit=True) as app:
            for _ in range(5):
                app.execute("SELECT 1")
        return total(scrape(metrics_port), "pypool_server_healthchecks", "_total")

    assert healthchecks_after_queries() == 0  # an hour: no connection is old enough to be checked
    rewrite(pypool, {"general": {"healthcheck_delay": 0}})  # 0: check before every reuse
    with admin(pypool) as conn:
        conn.execute("RELOAD")
        assert {r["key"]: r["value"] for r in show(conn, "CONFIG")}["healthcheck_delay"] == "0"
    assert healthchecks_after_queries() > 0


def test_reject_unknown_keys_refuses_a_misspelt_reload(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, {"general": {"reject_unknown_keys": True}}))
    rewrite(pypool, {"pools": {DATABASE: {"pool_mod": "session"}}})
    pypool.proc.send_signal(signal.SIGHUP)
    log = wait_for_log(pypool, "config reload (SIGHUP) rejected")
    line = next(line for line in log.splitlines() if "config reload (SIGHUP) rejected" in line)
    assert f"pools.{DATABASE}.pool_mod" in line and "did you mean `pool_mode`?" in line, line
    with admin(pypool) as conn:
        assert {p["pool_mode"] for p in show(conn, "POOLS")} == {"transaction"}
