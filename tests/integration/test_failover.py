"""Reads survive dead replicas and a dead primary; writes follow a promotion (issue 3).

These tests kill, stop and promote servers, so they run on a private cluster
(own directory, own free ports). Each test gets that cluster as pg1 primary with
pg2 and pg3 streaming (re-created if an earlier test promoted a replica) and a
pypool of its own, so they pass in any order.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pypool import cluster
from tests.conftest import (DATABASE, USER, free_port, local_config, start_pypool_process,
                            wait_replicas_caught_up)
from tests.integration._support import assert_failed_on_one_connect, make_standard_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BAN_TIME = 3  # seconds
CONNECT_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def failover_dir():
    """A private cluster directory and ports (PG1_PORT.. patched while the module runs)."""
    base = Path(tempfile.mkdtemp(prefix="pypool-failover-", dir="/tmp"))
    base.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        for i in (1, 2, 3):
            mp.setenv(f"PG{i}_PORT", str(free_port()))
        mp.setenv("PYPOOL_CLUSTER_DIR", str(base))
        try:
            yield base
        finally:
            with contextlib.suppress(Exception):
                cluster.destroy(base)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def private_cluster(failover_dir):
    """pg1 primary with pgbench tables, pg2 and pg3 streaming and caught up: whatever an earlier test left."""
    nodes, fresh = make_standard_cluster(failover_dir)
    if fresh:
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(nodes[0].port),
                        "-U", USER, DATABASE], env={**os.environ, "PGPASSWORD": cluster._credentials()["password"]},
                       check=True, capture_output=True, timeout=120)
    wait_replicas_caught_up(nodes)
    return nodes


@pytest.fixture
def pooler(private_cluster, tmp_path):
    """A pypool of this test's own: no bans or pooled connections left by another test."""
    port = free_port()
    config = local_config(private_cluster, port, {
        "general": {"ban_time": BAN_TIME, "connect_timeout": CONNECT_TIMEOUT_MS, "healthcheck_timeout": 1000},
        "pools": {DATABASE: {"primary_reads_enabled": False, "load_balancing_mode": "random",
                             "users": {"0": {"pool_size": 8}}}},
    })
    proc = start_pypool_process(config, tmp_path, port)
    yield proc
    proc.stop()


def connect(proc, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proc.dsn(), prepare_threshold=None, autocommit=True, **kwargs)


def read_ports(proc, count: int = 20) -> set[int]:
    with connect(proc) as conn:
        return {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(count)}


def run_pgbench(proc, seconds: int, clients: int = 8) -> tuple[subprocess.Popen, list[str]]:
    out: list[str] = []
    p = subprocess.Popen(["pgbench", "-h", "127.0.0.1", "-p", str(proc.port), "-U", USER, "-S", "-c", str(clients),
                          "-j", "2", "-T", str(seconds), DATABASE], env=proc.env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    reader.start()
    p.reader = reader  # type: ignore[attr-defined]
    return p, out


def finish(p: subprocess.Popen, out: list[str], timeout: float) -> str:
    p.wait(timeout)
    p.reader.join(5)  # type: ignore[attr-defined]
    return out[0] if out else ""


def processed(text: str) -> int:
    match = re.search(r"number of transactions actually processed: (\d+)", text)
    return int(match.group(1)) if match else 0


def node(nodes, name) -> cluster.Node:
    return next(n for n in nodes if n.name == name)


def test_kill_replica_during_select_only_run(private_cluster, pooler):
    pg2, pg3 = node(private_cluster, "pg2"), node(private_cluster, "pg3")
    assert read_ports(pooler) == {pg2.port, pg3.port}
    bench, out = run_pgbench(pooler, seconds=20)
    time.sleep(5)
    cluster.kill_node("pg2", sig=signal.SIGKILL)
    text = finish(bench, out, timeout=60)
    # The run completes; at most the transactions in flight on pg2 (one per client) could fail,
    # and pypool replays unanswered reads elsewhere, so normally none do.
    aborted = len(re.findall(r"aborted", text))
    assert aborted <= 8, text
    assert processed(text) > 1000, text
    # Reads continue on the surviving replica.
    assert read_ports(pooler) == {pg3.port}
    # Restart it: after ban_time it gets reads again.
    cluster.start_node("pg2")
    deadline = time.monotonic() + BAN_TIME + 15
    while time.monotonic() < deadline:
        if pg2.port in read_ports(pooler):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"pg2 got no reads after restart + ban_time:\n{pooler.log()[-3000:]}")


def test_primary_down_reads_keep_working_and_writes_fail_fast(private_cluster, pooler):
    pg1 = node(private_cluster, "pg1")
    wait_replicas_caught_up(private_cluster)
    bench, out = run_pgbench(pooler, seconds=8)
    time.sleep(2)
    cluster.stop_node("pg1", mode="immediate")
    text = finish(bench, out, timeout=60)
    assert "aborted" not in text, text
    assert re.search(r"number of failed transactions: 0\b", text), text
    with connect(pooler) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_branches").fetchone()[0] >= 1
        with pytest.raises(psycopg.OperationalError) as excinfo:
            conn.execute("UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1")
        assert excinfo.value.sqlstate == "08006"
        assert f"127.0.0.1:{pg1.port}" in str(excinfo.value) and "primary" in str(excinfo.value)
        assert_failed_on_one_connect(str(excinfo.value), CONNECT_TIMEOUT_MS)
        # The session survives the failed write; once the primary is back, writes succeed.
        cluster.start_node("pg1")
        deadline = time.monotonic() + 20
        while True:
            try:
                port = conn.execute("UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1 "
                                    "RETURNING inet_server_port()").fetchone()[0]
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert port == pg1.port


def wait_for_writes_on(conn: psycopg.Connection, promoted: cluster.Node, pooler) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            port = conn.execute("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                                "VALUES (1, 1, 1, 0, now()) RETURNING inet_server_port()").fetchone()[0]
            if port == promoted.port:
                return
        except psycopg.OperationalError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"writes never reached the promoted {promoted.name}:\n{pooler.log()[-3000:]}")
        time.sleep(0.3)


def test_promoted_replica_receives_writes(private_cluster, pooler):
    pg2 = node(private_cluster, "pg2")
    cluster.stop_node("pg1", mode="fast")
    cluster.promote_node("pg2")
    with connect(pooler) as conn:
        wait_for_writes_on(conn, pg2, pooler)
    assert "sending writes to" in pooler.log()


def test_after_a_promotion_reads_after_writes_run_on_the_new_primary(private_cluster, pooler):
    """Causal reads (on by default with the split) across a failover: pg3 still follows the stopped pg1
    on the old timeline and can never replay a write made on the promoted pg2, so a read after a write
    runs on pg2: never stale, never a 57014 after waiting for pg3."""
    pg2 = node(private_cluster, "pg2")
    cluster.stop_node("pg1", mode="fast")
    cluster.promote_node("pg2")
    stale, ports = 0, set()
    with connect(pooler, options="-c synchronous_commit=on") as conn:
        wait_for_writes_on(conn, pg2, pooler)
        conn.execute("CREATE TABLE after_promotion (id int PRIMARY KEY)")
        for n in range(50):
            conn.execute("INSERT INTO after_promotion VALUES (%s)", (n,))
            count, port = conn.execute("SELECT count(*), inet_server_port() FROM after_promotion WHERE id = %s",
                                       (n,)).fetchone()
            stale += count == 0
            ports.add(port)
    assert stale == 0 and ports == {pg2.port}, (stale, ports)
