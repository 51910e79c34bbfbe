"""pypool.cluster against real PostgreSQL 15 binaries.

Runs its own throwaway cluster in a private directory under /tmp on three free
ports (PG1_PORT/PG2_PORT/PG3_PORT patched for this module), so it never touches
the shared development cluster on 5433-5435. The tests share that directory but
not a state: each asks for the cluster it needs (none at all, or pg1 primary with
pg2 and pg3 streaming), whatever the test before it left, so they pass in any order.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from pypool import cluster
from tests.integration._support import make_standard_cluster, wait_for

pytestmark = pytest.mark.integration

if shutil.which("psql") is None or cluster._find_bindir() is None:  # pragma: no cover - machine without PostgreSQL
    pytestmark = [pytest.mark.integration, pytest.mark.skip(reason="PostgreSQL 15 binaries not installed")]


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def cluster_dir():
    ports = _free_ports(3)
    base = Path(tempfile.mkdtemp(prefix="pypool-cluster-test-", dir="/tmp"))
    base.chmod(0o755)  # the postgres OS user must be able to traverse it
    with pytest.MonkeyPatch.context() as mp:
        for i, port in enumerate(ports, start=1):
            mp.setenv(f"PG{i}_PORT", str(port))
        mp.delenv("PYPOOL_CLUSTER_DIR", raising=False)
        try:
            yield base
        finally:
            with contextlib.suppress(Exception):
                cluster.destroy(base)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def no_cluster(cluster_dir):
    """The private directory with no cluster in it."""
    cluster.destroy(cluster_dir)
    return cluster_dir


@pytest.fixture
def standard_cluster(cluster_dir):
    """pg1 primary, pg2 and pg3 streaming from it, all running: made so whatever an earlier test left."""
    make_standard_cluster(cluster_dir)
    return cluster_dir


@pytest.fixture
def some_cluster(cluster_dir):
    """A cluster on disk, in whatever shape an earlier test left it (stopping and destroying take any)."""
    if not (cluster_dir / "pg1" / "PG_VERSION").is_file():
        cluster.up(cluster_dir, timeout=60)
    return cluster_dir


def _new_table(node: cluster.Node, *rows: str) -> str:
    """A table of this test's own (id, note), holding ``rows`` as ids 1, 2, ..."""
    name = f"cluster_probe_{uuid.uuid4().hex[:8]}"
    values = ", ".join(f"({i}, '{note}')" for i, note in enumerate(rows, start=1))
    cluster.run_sql(node, f"CREATE TABLE {name} (id int PRIMARY KEY, note text);"
                          + (f"INSERT INTO {name} VALUES {values};" if rows else ""))
    return name


def _wait_replayed(node: cluster.Node, table: str, count: int, what: str) -> None:
    _wait_for(lambda: cluster._try_sql(node, f"SELECT count(*) FROM {table}", timeout=3) == str(count), what=what)


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["name"]: row for row in rows}


def _wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    return wait_for(predicate, timeout, what)


def _node(name: str, base: Path) -> cluster.Node:
    return next(n for n in cluster.nodes(base) if n.name == name)


def test_nodes_read_ports_from_env(cluster_dir):
    names = [(n.name, n.port, n.data_dir) for n in cluster.nodes(cluster_dir)]
    ports = [int(os.environ[f"PG{i}_PORT"]) for i in (1, 2, 3)]
    assert names == [
        ("pg1", ports[0], cluster_dir / "pg1"),
        ("pg2", ports[1], cluster_dir / "pg2"),
        ("pg3", ports[2], cluster_dir / "pg3"),
    ]
    dsn = cluster.psql_dsn(cluster.nodes(cluster_dir)[0])
    assert dsn.startswith("postgresql://") and f"@127.0.0.1:{ports[0]}/" in dsn


def test_up_starts_primary_and_two_streaming_replicas(no_cluster):
    cluster_dir = no_cluster
    steps: list[str] = []
    returned = cluster.up(cluster_dir, timeout=60, progress=steps.append)
    assert [n.name for n in returned] == ["pg1", "pg2", "pg3"]
    # Each step is reported as it starts, in order (`pypool cluster up` prints them).
    ports = {n.name: n.port for n in returned}
    assert steps == [
        f"initdb of pg1 in {cluster_dir / 'pg1'}",
        f"starting pg1 (primary) on 127.0.0.1:{ports['pg1']}",
        "pg1 accepts connections; checking the replication role, database and extensions",
        "base backup of pg2 from pg1 (pg_basebackup)",
        f"starting pg2 (replica) on 127.0.0.1:{ports['pg2']}",
        "base backup of pg3 from pg1 (pg_basebackup)",
        f"starting pg3 (replica) on 127.0.0.1:{ports['pg3']}",
        "waiting for pg2, pg3 to stream from pg1",
        "cluster ready",
    ]
    rows = _by_name(cluster.status(cluster_dir))
    assert rows["pg1"]["role"] == "primary" and rows["pg1"]["running"]
    for name in ("pg2", "pg3"):
        assert rows[name]["role"] == "replica"
        assert rows[name]["running"] and rows[name]["streaming"]
        assert rows[name]["replay_lag_bytes"] is not None
    primary = _node("pg1", cluster_dir)
    assert cluster.run_sql(primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "2"
    # Settings the rest of the project relies on.
    assert cluster.run_sql(primary, "SHOW listen_addresses") == "127.0.0.1"
    assert cluster.run_sql(primary, "SHOW max_connections") == "300"
    assert cluster.run_sql(primary, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'") == "1"
    assert cluster.run_sql(primary, "SELECT rolreplication FROM pg_roles WHERE rolname = 'repl_user'") == "t"
    # Each node keeps its log file in its own directory.
    for node in cluster.nodes(cluster_dir):
        assert (node.data_dir / cluster.LOG_NAME).is_file()


def test_status_cli_prints_table_without_passwords(standard_cluster, capsys):
    cluster_dir = standard_cluster
    assert cluster.main(["status", "--data-dir", str(cluster_dir)]) == 0
    out = capsys.readouterr().out
    assert "pg1" in out and "primary" in out and out.count("replica") == 2
    assert "mysecretpassword" not in out and "repl_password" not in out


def test_write_on_primary_is_visible_on_both_replicas(standard_cluster):
    cluster_dir = standard_cluster
    table = _new_table(_node("pg1", cluster_dir), "hello replicas")
    for name in ("pg2", "pg3"):
        replica = _node(name, cluster_dir)
        _wait_for(
            lambda: cluster._try_sql(replica, f"SELECT note FROM {table} WHERE id = 1", timeout=3) == "hello replicas",
            what=f"row on {name}",
        )
        # and the replica refuses writes
        with pytest.raises(cluster.ClusterError, match="read-only"):
            cluster.run_sql(replica, f"INSERT INTO {table} VALUES (2, 'no')")


def _what_up_would_redo(base: Path) -> dict[str, tuple]:
    """Per node: the postmaster pid (a restart, re-initdb or base backup changes it) and the
    WAL receiver pid (re-pointing a replica at another primary restarts its receiver)."""
    return {node.name: (cluster._running_pid(node), cluster.run_sql(node, "SELECT pid FROM pg_stat_wal_receiver"))
            for node in cluster.nodes(base)}


def test_up_again_is_a_noop(standard_cluster, capsys):
    cluster_dir = standard_cluster
    table = _new_table(_node("pg1", cluster_dir), "kept")
    before = _what_up_would_redo(cluster_dir)
    assert all(pid for pid, _ in before.values())
    assert before["pg2"][1] and before["pg3"][1]  # both replicas are receiving WAL
    assert cluster.main(["up", "--data-dir", str(cluster_dir), "--timeout", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The command line prints each step as it happens, then the status table.
    assert lines[0] == f"pypool cluster: pg1 (primary) already running on 127.0.0.1:{_node('pg1', cluster_dir).port}"
    assert "pypool cluster: pg3 (replica) already running on" in lines[3]
    assert lines[4:6] == ["pypool cluster: waiting for pg2, pg3 to stream from pg1", "pypool cluster: cluster ready"]
    assert lines[6].split() == ["name", "port", "role", "state", "replay", "lag"]
    # Nothing restarted, re-initialised, re-copied or re-pointed; the data is still there.
    assert _what_up_would_redo(cluster_dir) == before
    assert cluster.run_sql(_node("pg1", cluster_dir), f"SELECT count(*) FROM {table}") == "1"


def test_stopped_replica_shows_down_and_comes_back(standard_cluster):
    cluster_dir = standard_cluster
    cluster.stop_node("pg3", cluster_dir)
    rows = _by_name(cluster.status(cluster_dir))
    assert rows["pg3"]["role"] == "down" and not rows["pg3"]["running"]
    assert rows["pg1"]["role"] == "primary" and rows["pg2"]["role"] == "replica"
    cluster.start_node("pg3", cluster_dir)
    _wait_for(lambda: _by_name(cluster.status(cluster_dir))["pg3"]["streaming"], what="pg3 streaming again")


def test_kill_node_then_start_recovers(standard_cluster):
    cluster_dir = standard_cluster
    replica = _node("pg3", cluster_dir)
    pid = cluster._running_pid(replica)
    cluster.kill_node("pg3", cluster_dir)
    assert cluster._running_pid(replica) is None
    assert _by_name(cluster.status(cluster_dir))["pg3"]["role"] == "down"
    cluster.start_node("pg3", cluster_dir)
    assert cluster._running_pid(replica) not in (None, pid)


def test_start_failure_reports_log_tail(standard_cluster):
    cluster_dir = standard_cluster
    # Occupy pg3's port with a plain socket: the start must fail with the server's own words.
    cluster.stop_node("pg3", cluster_dir)
    replica = _node("pg3", cluster_dir)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", replica.port))
    blocker.listen()
    try:
        with pytest.raises(cluster.ClusterError) as info:
            cluster.start_node("pg3", cluster_dir)
        message = str(info.value)
        assert "pg3" in message and "postgresql.log" in message
        assert "mysecretpassword" not in message and "repl_password" not in message
    finally:
        blocker.close()


def _fail_over_to_pg2(base: Path) -> str:
    """Stop pg1, promote pg2, write there; returns the table holding one row from before and one after."""
    table = _new_table(_node("pg1", base), "before failover")
    _wait_replayed(_node("pg2", base), table, 1, "pg2 to replay the first row")
    cluster.stop_node("pg1", base)
    assert _by_name(cluster.status(base))["pg1"]["role"] == "down"
    cluster.promote_node("pg2", base)
    cluster.run_sql(_node("pg2", base), f"INSERT INTO {table} VALUES (2, 'after failover')")
    return table


def test_promote_replica_after_primary_stops(standard_cluster):
    cluster_dir = standard_cluster
    table = _fail_over_to_pg2(cluster_dir)
    new_primary = _node("pg2", cluster_dir)
    assert cluster.run_sql(new_primary, "SELECT pg_is_in_recovery()") == "f"
    assert cluster.run_sql(new_primary, f"SELECT count(*) FROM {table}") == "2"
    assert _by_name(cluster.status(cluster_dir))["pg2"]["role"] == "primary"


def test_rebuild_replica_follows_new_primary(standard_cluster):
    cluster_dir = standard_cluster
    table = _fail_over_to_pg2(cluster_dir)
    cluster.rebuild_replica("pg1", cluster_dir, timeout=60)
    old_primary = _node("pg1", cluster_dir)
    assert cluster.run_sql(old_primary, "SELECT pg_is_in_recovery()") == "t"
    _wait_replayed(old_primary, table, 2, "pg1 to replay the post-failover row")
    # up() repairs the rest (pg3 still points at the old primary) and leaves 1 primary + 2 streaming.
    cluster.up(cluster_dir, timeout=60)
    rows = _by_name(cluster.status(cluster_dir))
    assert [r["role"] for r in rows.values()].count("primary") == 1
    assert rows["pg2"]["role"] == "primary"
    assert rows["pg1"]["streaming"] and rows["pg3"]["streaming"]


def test_down_and_destroy(some_cluster):
    cluster_dir = some_cluster
    cluster.down(cluster_dir)
    rows = cluster.status(cluster_dir)
    assert all(r["role"] == "down" and not r["running"] for r in rows)
    assert (cluster_dir / "pg1" / "PG_VERSION").is_file()  # down keeps the data
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cluster.main(["destroy", "--data-dir", str(cluster_dir)]) == 0
    assert not cluster_dir.exists()
    for port in (int(os.environ[f"PG{i}_PORT"]) for i in (1, 2, 3)):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
