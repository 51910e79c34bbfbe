"""Read/write splitting, proven by each server's own view (issue 3).

Every assertion about where a statement ran comes from PostgreSQL itself:
``inet_server_port()`` in the result, or ``pg_stat_statements`` counters read
directly on each node -- never from pypool's own statistics.
"""

from __future__ import annotations

import re
import subprocess
import uuid

import psycopg
import pytest

from pypool import cluster
from tests.conftest import DATABASE, PASSWORD, USER, pool_overrides, wait_replicas_caught_up

pytestmark = pytest.mark.integration

PRIMARY_PORT_INDEX = 0


def ports(nodes: list[cluster.Node]) -> tuple[int, set[int]]:
    return nodes[0].port, {n.port for n in nodes[1:]}


def connect(dsn: str, **kwargs) -> psycopg.Connection:
    # Named prepared statements across transactions come with issue 6; until then
    # keep psycopg on unnamed statements.
    return psycopg.connect(dsn, prepare_threshold=None, **kwargs)


def server_port(conn: psycopg.Connection, sql: str = "SELECT inet_server_port()") -> int:
    return conn.execute(sql).fetchone()[0]


@pytest.fixture
def splitting(start_pypool):
    return start_pypool(pool_overrides(load_balancing_mode="round_robin", primary_reads_enabled=False))


def test_reads_go_to_replicas_and_writes_to_the_primary(splitting, pg_cluster):
    primary, replicas = ports(pg_cluster)
    table = f"routing_{uuid.uuid4().hex[:8]}"
    with connect(splitting.dsn(), autocommit=True) as conn:
        seen = {server_port(conn) for _ in range(10)}
        assert seen == replicas, "round_robin should use both replicas and only them"
        conn.execute(f"CREATE TABLE {table} (id int, port int)")
        written = conn.execute(f"INSERT INTO {table} VALUES (1, inet_server_port()) RETURNING port").fetchone()[0]
        assert written == primary
    # The row exists on the primary itself.
    assert cluster.run_sql(pg_cluster[0], f"SELECT count(*) FROM {table}").strip() == "1"
    cluster.run_sql(pg_cluster[0], f"DROP TABLE {table}")


@pytest.mark.parametrize("sql", [
    "SELECT inet_server_port() FROM pg_class LIMIT 1 FOR UPDATE",
    "SELECT inet_server_port(), nextval('routing_seq')",
    "WITH x AS (SELECT 1) SELECT inet_server_port() FROM x WHERE pg_try_advisory_xact_lock(42)",
])
def test_locking_and_side_effect_reads_go_to_the_primary(splitting, pg_cluster, sql):
    cluster.run_sql(pg_cluster[0], "CREATE SEQUENCE IF NOT EXISTS routing_seq")
    with connect(splitting.dsn(), autocommit=True) as conn:
        assert server_port(conn, sql) == pg_cluster[0].port


def test_transaction_role_is_decided_by_its_first_statement(splitting, pg_cluster):
    primary, replicas = ports(pg_cluster)
    cluster.run_sql(pg_cluster[0], "CREATE TABLE IF NOT EXISTS routing_tx (v int)")
    wait_replicas_caught_up(pg_cluster)
    with connect(splitting.dsn()) as conn:  # psycopg opens transactions with BEGIN
        assert server_port(conn) in replicas
        # A write inside a transaction that started on a replica: PostgreSQL's own error.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO routing_tx VALUES (1)")
        conn.rollback()
        # BEGIN alone decides nothing: the INSERT that follows takes the transaction to the primary.
        conn.execute("INSERT INTO routing_tx VALUES (2)")
        assert server_port(conn) == primary
        conn.commit()
    assert cluster.run_sql(pg_cluster[0], "SELECT count(*) FROM routing_tx WHERE v = 2").strip() != "0"


def test_begin_read_only_and_read_write(splitting, pg_cluster):
    primary, replicas = ports(pg_cluster)
    with connect(splitting.dsn(), autocommit=True) as conn:
        conn.execute("BEGIN READ WRITE")
        assert server_port(conn) == primary
        conn.execute("COMMIT")
        conn.execute("BEGIN READ ONLY")
        assert server_port(conn) in replicas
        conn.execute("COMMIT")
        # An empty held-back transaction is answered without a server.
        conn.execute("BEGIN")
        conn.execute("COMMIT")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_pgcat_custom_commands_and_hints(splitting, pg_cluster):
    primary, replicas = ports(pg_cluster)
    with connect(splitting.dsn(), autocommit=True) as conn:
        cur = conn.execute("SHOW SERVER ROLE")
        assert [d.name for d in cur.description] == ["server role"]
        assert cur.fetchone() == ("auto",)
        cur = conn.execute("SHOW PRIMARY READS")
        assert [d.name for d in cur.description] == ["primary reads"]
        assert cur.fetchone() == ("off",)
        assert server_port(conn, "/* pypool: role=primary */ SELECT inet_server_port()") == primary
        conn.execute("SET SERVER ROLE TO 'primary'")
        assert conn.execute("SHOW SERVER ROLE").fetchone() == ("primary",)
        assert server_port(conn) == primary
        conn.execute("SET SERVER ROLE TO 'replica'")
        assert server_port(conn) in replicas
        conn.execute("SET SERVER ROLE TO 'auto'")
        conn.execute("SET PRIMARY READS TO on")
        assert conn.execute("SHOW PRIMARY READS").fetchone() == ("on",)
        assert {server_port(conn) for _ in range(30)} == {primary} | replicas


def test_parse_failure_goes_to_the_primary_and_reports_the_servers_error(splitting):
    with connect(splitting.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC inet_server_port()")
        # The session is still usable.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_extended_protocol_routes_by_parse(splitting, pg_cluster):
    primary, replicas = ports(pg_cluster)
    with connect(splitting.dsn(), autocommit=True) as conn:
        # psycopg sends parameters with Parse/Bind/Execute/Sync.
        assert conn.execute("SELECT inet_server_port() + %s", [0]).fetchone()[0] in replicas
        cluster.run_sql(pg_cluster[0], "CREATE TABLE IF NOT EXISTS routing_ext (v int)")
        port = conn.execute("INSERT INTO routing_ext VALUES (%s) RETURNING inet_server_port()", [1]).fetchone()[0]
        assert port == primary


# ------------------------------------------------------------ pgbench share

def _reset_statements(nodes: list[cluster.Node]) -> None:
    for node in nodes:
        cluster.run_sql(node, "SELECT pg_stat_statements_reset()")


def _calls(node: cluster.Node, pattern: str) -> int:
    out = cluster.run_sql(node, "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                                f"WHERE query ILIKE '{pattern}'")
    return int(out.strip() or 0)


def _pgbench(proc, *args: str, seconds: int = 10) -> str:
    result = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(proc.port), "-U", USER, "-j", "2",
                             "-T", str(seconds), *args, DATABASE], env=proc.env(), capture_output=True,
                            text=True, timeout=seconds + 60)
    assert result.returncode == 0, result.stderr + result.stdout
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is not None and failed.group(1) == "0", result.stdout
    return result.stdout


@pytest.mark.parametrize("mode", ["random", "loc"])
def test_pgbench_select_only_is_spread_over_both_replicas(start_pypool, pg_cluster, pgbench_tables, mode):
    proc = start_pypool(pool_overrides(load_balancing_mode=mode, primary_reads_enabled=False))
    _reset_statements(pg_cluster)
    _pgbench(proc, "-S", "-c", "32")
    select = "SELECT abalance FROM pgbench_accounts%"
    counts = [_calls(node, select) for node in pg_cluster]
    assert counts[0] == 0, f"the primary served reads: {counts}"
    total = counts[1] + counts[2]
    assert total > 1000
    for share in (counts[1] / total, counts[2] / total):
        assert 0.35 <= share <= 0.65, f"replica shares {counts} outside 35-65 % ({mode})"


def test_pgbench_tpcb_like_writes_land_on_the_primary(start_pypool, pg_cluster, pgbench_tables):
    proc = start_pypool(pool_overrides(primary_reads_enabled=False))
    _reset_statements(pg_cluster)
    _pgbench(proc, "-c", "8", seconds=5)
    update = "UPDATE pgbench_accounts%"
    counts = [_calls(node, update) for node in pg_cluster]
    assert counts[0] > 100 and counts[1] == 0 and counts[2] == 0, counts


def test_lagging_replica_gets_no_reads_until_it_catches_up(start_pypool, pg_cluster):
    import time

    pg2, pg3 = pg_cluster[1], pg_cluster[2]
    proc = start_pypool(pool_overrides(max_replica_lag_ms=500, load_balancing_mode="round_robin"))
    cluster.run_sql(pg_cluster[0], "CREATE TABLE IF NOT EXISTS routing_lag (v int)")
    wait_replicas_caught_up(pg_cluster)
    cluster.run_sql(pg2, "SELECT pg_wal_replay_pause()")
    try:
        cluster.run_sql(pg_cluster[0], "INSERT INTO routing_lag VALUES (1)")
        deadline = time.monotonic() + 15
        with connect(proc.dsn(), autocommit=True) as conn:
            while {server_port(conn) for _ in range(6)} != {pg3.port}:
                assert time.monotonic() < deadline, "the paused replica kept getting reads"
                time.sleep(0.3)
            cluster.run_sql(pg2, "SELECT pg_wal_replay_resume()")
            while {server_port(conn) for _ in range(6)} != {pg2.port, pg3.port}:
                assert time.monotonic() < deadline + 15, "the replica got no reads after catching up"
                time.sleep(0.3)
    finally:
        cluster.run_sql(pg2, "SELECT pg_wal_replay_resume()")
    assert "max_replica_lag_ms" in proc.log()
