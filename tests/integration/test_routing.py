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
from tests.conftest import (DATABASE, USER, drop_database, pgbench_database, pool_overrides, run_database_name,
                            wait_replicas_caught_up)
from tests.integration._support import wait_for

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
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as excinfo:
            conn.execute("INSERT INTO routing_tx VALUES (1)")
        assert excinfo.value.sqlstate == "25006"
        assert "read-only transaction" in str(excinfo.value)  # the server's words, not pypool's
        conn.rollback()
        # BEGIN alone decides nothing: the INSERT that follows takes the transaction to the primary.
        conn.execute("INSERT INTO routing_tx VALUES (2)")
        assert server_port(conn) == primary
        conn.commit()
    assert cluster.run_sql(pg_cluster[0], "SELECT count(*) FROM routing_tx WHERE v = 2").strip() != "0"


def test_write_after_a_read_in_one_transaction_gets_the_servers_read_only_error(splitting, pg_cluster):
    # psql's simple protocol, one statement per message: the SELECT opens the transaction on a
    # replica and the UPDATE that follows must fail there, never move to the primary.
    cluster.run_sql(pg_cluster[0], "CREATE TABLE IF NOT EXISTS routing_ro (v int)")
    wait_replicas_caught_up(pg_cluster)
    result = subprocess.run(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(splitting.port), "-U", USER, "-d", DATABASE,
         "-v", "VERBOSITY=verbose", "-c", "BEGIN", "-c", "SELECT inet_server_port()",
         "-c", "UPDATE routing_ro SET v = 1", "-c", "ROLLBACK"],
        env=splitting.env(), capture_output=True, text=True, timeout=30)
    assert "ERROR:  25006: cannot execute UPDATE in a read-only transaction" in result.stderr, result.stderr
    _, replicas = ports(pg_cluster)
    port = re.search(r"^\s*(\d+)\s*$", result.stdout, re.M)
    assert port is not None and int(port.group(1)) in replicas, result.stdout


@pytest.mark.parametrize("default_role", ["primary", "replica", "any"])
def test_default_role_without_the_query_parser(start_pypool, pg_cluster, default_role):
    primary, replicas = ports(pg_cluster)
    proc = start_pypool(pool_overrides(query_parser_enabled=False, query_parser_read_write_splitting=False,
                                       default_role=default_role, load_balancing_mode="random"))
    with connect(proc.dsn(), autocommit=True) as conn:
        seen = {server_port(conn) for _ in range(40)}
        if default_role == "replica":
            # Everything goes to a replica, so a write meets PostgreSQL's read-only error.
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("CREATE TABLE routing_default_never_created (v int)")
    expected = {"primary": {primary}, "replica": replicas, "any": {primary} | replicas}[default_role]
    assert seen == expected


def test_query_parser_max_length_sends_longer_queries_to_the_primary(start_pypool, pg_cluster):
    primary, replicas = ports(pg_cluster)
    proc = start_pypool(pool_overrides(query_parser_max_length=80, load_balancing_mode="round_robin"))
    short = "SELECT inet_server_port()"
    long = short + " /* " + "x" * 80 + " */"
    with connect(proc.dsn(), autocommit=True) as conn:
        assert {server_port(conn, short) for _ in range(4)} == replicas
        assert {server_port(conn, long) for _ in range(4)} == {primary}


def test_serializable_transactions_run_on_the_primary(splitting, pg_cluster):
    # A hot standby refuses SERIALIZABLE ("cannot use serializable mode in a hot standby"),
    # even for a read-only transaction: psycopg's BEGIN ISOLATION LEVEL SERIALIZABLE must not
    # be held back and replayed on a replica.
    primary, _ = ports(pg_cluster)
    with connect(splitting.dsn()) as conn:
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        assert server_port(conn) == primary
        conn.commit()
        conn.read_only = True
        assert server_port(conn) == primary
        conn.commit()


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
        # Causal reads (on by default): the queries above ran on the primary, so until the health
        # monitors report both replicas past them, only the primary and replicas known to be there
        # share the reads.
        seen: set[int] = set()
        wait_for(lambda: seen.update(server_port(conn) for _ in range(10)) or seen == {primary} | replicas,
                 timeout=15, what=f"reads on every server with primary reads on (seen {seen})")


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

# pgbench runs in a database of its own so that other users of the shared cluster
# (benchmarks, other test sessions) can neither add to nor reset the counts.
SHARE_DB = run_database_name("pypool_routing_share")


@pytest.fixture(scope="module")
def share_db(pg_cluster):
    yield pgbench_database(pg_cluster, SHARE_DB)
    drop_database(pg_cluster, SHARE_DB)


def _share_overrides(**values: object) -> dict:
    # Clients still connect to the pool named DATABASE; pypool's server connections use SHARE_DB.
    return pool_overrides(shards={"0": {"database": SHARE_DB}}, **values)


def _reset_statements(nodes: list[cluster.Node]) -> None:
    for node in nodes:
        cluster.run_sql(node, "SELECT pg_stat_statements_reset(0, "
                              f"(SELECT oid FROM pg_database WHERE datname = '{SHARE_DB}'), 0)")


def _calls(node: cluster.Node, pattern: str) -> int:
    out = cluster.run_sql(node, "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                                f"WHERE query ILIKE '{pattern}' AND dbid = "
                                f"(SELECT oid FROM pg_database WHERE datname = '{SHARE_DB}')")
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
def test_pgbench_select_only_is_spread_over_both_replicas(start_pypool, pg_cluster, share_db, mode):
    proc = start_pypool(_share_overrides(load_balancing_mode=mode, primary_reads_enabled=False))
    _reset_statements(pg_cluster)
    _pgbench(proc, "-S", "-c", "32")
    select = "SELECT abalance FROM pgbench_accounts%"
    counts = [_calls(node, select) for node in pg_cluster]
    assert counts[0] == 0, f"the primary served reads: {counts}"
    total = counts[1] + counts[2]
    assert total > 1000
    for share in (counts[1] / total, counts[2] / total):
        assert 0.35 <= share <= 0.65, f"replica shares {counts} outside 35-65 % ({mode})"


def test_pgbench_tpcb_like_writes_land_on_the_primary(start_pypool, pg_cluster, share_db):
    proc = start_pypool(_share_overrides(primary_reads_enabled=False))
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
