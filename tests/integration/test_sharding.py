"""Sharded pools end to end (issue 14): three shards as databases shard0..2 on the local primary.

The replicas replicate the databases, so every shard has the cluster's primary
and both replicas. Where a row must land is asked of PostgreSQL itself: a
``PARTITION BY HASH (id)`` table with ``MODULUS 3`` stores each id in the
partition whose number is its shard.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pypool import cluster
from pypool.config import dump_config
from tests.integration._ops import admin, rows, wait_for_log
from tests.conftest import PASSWORD, USER, pgbench_database, wait_replicas_caught_up

SHARDS = 3
POOL = "sharded_db"
SET_SHARD_SCRIPT = """\\set aid random(1, 100000)
\\set bid random(1, 1)
\\set tid random(1, 10)
\\set delta random(-5000, 5000)
\\set shard random(0, 2)
SET SHARD TO :shard;
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


def _direct(pg_cluster, database: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=pg_cluster[0].port, user=USER, password=PASSWORD,
                           dbname=database, autocommit=True)


@pytest.fixture(scope="module")
def shard_databases(pg_cluster):
    """shard0..2 with a ``data`` table and pgbench's tables; dropped after the module."""
    primary = pg_cluster[0]
    for shard in range(SHARDS):
        cluster.run_sql(primary, f"DROP DATABASE IF EXISTS shard{shard} WITH (FORCE)")
        pgbench_database(pg_cluster, f"shard{shard}")
        with _direct(pg_cluster, f"shard{shard}") as conn:
            conn.execute("CREATE TABLE data (id bigint PRIMARY KEY, value text)")
    with _direct(pg_cluster, "shard0") as conn:
        # The oracle: PostgreSQL's own hash partitioning of bigint.
        conn.execute("CREATE TABLE hash_oracle (id bigint) PARTITION BY HASH (id)")
        for r in range(SHARDS):
            conn.execute(f"CREATE TABLE hash_oracle_{r} PARTITION OF hash_oracle "
                         f"FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {r})")
    wait_replicas_caught_up(pg_cluster)
    yield
    for shard in range(SHARDS):
        cluster.run_sql(primary, f"DROP DATABASE IF EXISTS shard{shard} WITH (FORCE)")


@pytest.fixture
def clean_data(pg_cluster, shard_databases):
    for shard in range(SHARDS):
        with _direct(pg_cluster, f"shard{shard}") as conn:
            conn.execute("TRUNCATE data")


def _oracle(pg_cluster, ids: list[int]) -> dict[int, int]:
    """id -> the partition (shard) PostgreSQL stores it in."""
    with _direct(pg_cluster, "shard0") as conn:
        conn.execute("TRUNCATE hash_oracle")
        with conn.cursor().copy("COPY hash_oracle (id) FROM STDIN") as copy:
            for i in ids:
                copy.write_row((i,))
        rows = conn.execute("SELECT id, tableoid::regclass::text FROM hash_oracle").fetchall()
    return {i: int(table.rsplit("_", 1)[1]) for i, table in rows}


def _stored(pg_cluster) -> dict[int, int]:
    """id -> the shard database it is in."""
    out = {}
    for shard in range(SHARDS):
        with _direct(pg_cluster, f"shard{shard}") as conn:
            for (i,) in conn.execute("SELECT id FROM data"):
                out[i] = shard
    return out


def _config(pg_cluster, **pool: object) -> dict:
    host = "127.0.0.1"
    servers = [[host, pg_cluster[0].port, "primary"], [host, pg_cluster[1].port, "replica"],
               [host, pg_cluster[2].port, "replica"]]
    return {"pools": {POOL: {
        "pool_mode": "transaction", "default_role": "any", "query_parser_enabled": True,
        "query_parser_read_write_splitting": True,
        "users": {"0": {"username": USER, "password": PASSWORD, "pool_size": 5}},
        "shards": {str(s): {"database": f"shard{s}", "servers": servers} for s in range(SHARDS)},
        **pool,
    }}}


@pytest.fixture
def sharded(start_pypool, pg_cluster, shard_databases, clean_data):
    """Factory: a pypool serving POOL with the given pool keys."""
    def _start(**pool: object):
        return start_pypool(_config(pg_cluster, **pool))
    return _start


def _psql(pypool, script: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1",
                           "-p", str(pypool.port), "-U", USER, "-d", POOL, *extra],
                          input=script, env=pypool.env(), capture_output=True, text=True, timeout=60)


def test_set_sharding_key_inserts_land_where_postgresql_hash_partitioning_puts_them(sharded, pg_cluster):
    # PgCat's CI script (query_routing_test_insert.sql), any spelling of the command.
    pypool = sharded()
    ids = list(range(1, 41))
    spellings = ["SET SHARDING KEY TO '{i}';", "set sharding key to '{i}';", "SeT SHaRDInG KeY to '{i}';"]
    script = "".join(spellings[i % 3].format(i=i) + f"\nINSERT INTO data (id, value) VALUES ({i}, 'value_{i}');\n"
                     for i in ids)
    result = _psql(pypool, script)
    assert result.returncode == 0 and "ERROR" not in result.stderr, result.stderr
    assert _stored(pg_cluster) == _oracle(pg_cluster, ids)
    assert len(set(_stored(pg_cluster).values())) == SHARDS


def test_set_shard_show_shard_and_the_default_shard_0(sharded):
    pypool = sharded()
    result = _psql(pypool, "SHOW SHARD;\nSELECT current_database();\nSET SHARD TO '1';\nSHOW SHARD;\n"
                           "SELECT current_database();\nSET SHARD TO 2;\nSELECT current_database();\n"
                           "SET SHARD TO '7';\nSHOW SHARD;\nSELECT current_database();\n")
    assert result.stdout.split() == ["unset", "shard0", "1", "shard1", "shard2", "2", "shard2"]
    assert "shard 7 is not configured 3, staying on shard 2" in result.stderr


def test_pgbench_set_shard_script_runs_without_failed_transactions(sharded, tmp_path: Path):
    # PgCat's tests/pgbench/set_shard.sql, sized to pgbench's scale-1 tables.
    pypool = sharded()
    script = tmp_path / "set_shard.sql"
    script.write_text(SET_SHARD_SCRIPT)
    result = subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER,
                             "-t", "60", "-c", "3", "--protocol", "simple", "-f", str(script), POOL],
                            env=pypool.env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "number of transactions actually processed: 180/180" in result.stdout
    assert "number of failed transactions: 0" in result.stdout or "failed" not in result.stdout


def test_comments_pick_the_shard(sharded, pg_cluster):
    pypool = sharded(shard_id_regex=r"/\* shard_id: (\d+) \*/", sharding_key_regex=r"/\* sharding_key: (\d+) \*/")
    key = 5
    on = _oracle(pg_cluster, [key])[key]
    result = _psql(pypool, "/* shard_id: 2 */ SELECT current_database();\n"
                           f"/* sharding_key: {key} */ SELECT current_database();\n")
    assert result.stdout.split() == ["shard2", f"shard{on}"], result.stderr


def test_automatic_sharding_key_in_simple_and_extended_protocols(sharded, pg_cluster):
    pypool = sharded(automatic_sharding_key="data.id")
    ids = list(range(100, 120))
    with psycopg.connect(pypool.dsn(database=POOL), autocommit=True) as conn:
        simple = psycopg.ClientCursor(conn)
        for i in ids[:10]:
            simple.execute(f"INSERT INTO data (id, value) VALUES ({i}, 'simple')")
        for i in ids[10:20]:
            conn.execute("INSERT INTO data (id, value) VALUES (%s, %s)", (i, "psycopg"))  # extended, $1
        wait_replicas_caught_up(pg_cluster)  # the reads go to a replica of the row's shard
        for i in ids[:20]:
            row = conn.execute("SELECT value FROM data WHERE id = %s", (i,)).fetchone()
            assert row is not None and row[0] in ("simple", "psycopg")
            assert simple.execute(f"SELECT current_database() FROM data WHERE id = {i}").fetchone() is not None
    assert _stored(pg_cluster) == _oracle(pg_cluster, ids)


@pytest.mark.parametrize("cache_size", [100, 0], ids=["statement cache", "no statement cache"])
def test_asyncpg_follows_the_key(sharded, pg_cluster, cache_size: int):
    # With its cache asyncpg prepares each statement once under a name; without (PgBouncer's
    # advice) it describes the unnamed statement in one request (Parse, Describe, Flush) and binds
    # it in the next. Either way the statement's first run is described before its key is known.
    pypool = sharded(automatic_sharding_key="data.id")
    ids = list(range(201, 216))  # 201 is on shard 1: a first run sent to shard 0 shows

    async def run() -> None:
        conn = await asyncpg.connect(pypool.dsn(database=POOL), statement_cache_size=cache_size)
        try:
            for i in ids:
                await conn.execute("INSERT INTO data (id, value) VALUES ($1, $2)", i, f"v{i}")
            wait_replicas_caught_up(pg_cluster)
            for i in ids:
                assert await conn.fetchval("SELECT value FROM data WHERE id = $1", i) == f"v{i}"
        finally:
            await conn.close()

    asyncio.run(run())
    assert _stored(pg_cluster) == _oracle(pg_cluster, ids)


def _all_rows(pg_cluster) -> list[tuple[int, str]]:
    rows = []
    for shard in range(SHARDS):
        with _direct(pg_cluster, f"shard{shard}") as conn:
            rows += conn.execute("SELECT id, value FROM data").fetchall()
    return rows


def test_fanout_reads_are_merged_like_one_database(sharded, pg_cluster):
    pypool = sharded(automatic_sharding_key="data.id", default_shard="all")
    ids = [3, 17, 42, 5, 99, 8, 61, 23, 14, 77, 36, 50]
    with psycopg.connect(pypool.dsn(database=POOL), autocommit=True) as conn:
        for i in ids:
            conn.execute("INSERT INTO data (id, value) VALUES (%s, %s)", (i, f"v{i % 4}"))
        wait_replicas_caught_up(pg_cluster)
        stored = _stored(pg_cluster)
        assert len(set(stored.values())) == SHARDS  # the rows really are spread
        simple = psycopg.ClientCursor(conn)
        for cur in (conn, simple):  # extended protocol (unnamed statement), then simple
            assert cur.execute("SELECT id FROM data ORDER BY id DESC LIMIT 4 OFFSET 2").fetchall() == \
                [(i,) for i in sorted(ids, reverse=True)[2:6]]
            count, total, low, high = cur.execute("SELECT count(*), sum(id), min(id), max(id) FROM data").fetchone()
            assert (count, total, low, high) == (len(ids), sum(ids), min(ids), max(ids))
            groups = sorted(cur.execute("SELECT value, count(*), avg(id) FROM data GROUP BY value").fetchall())
            # Text follows each shard's collation: pypool refuses to guess the order.
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="cannot be merged"):
                cur.execute("SELECT value FROM data ORDER BY value")
        with _direct(pg_cluster, "shard0") as one:  # the same query on one database holding every row
            one.execute("CREATE TEMP TABLE everything (id bigint, value text)")
            with one.cursor().copy("COPY everything FROM STDIN") as copy:
                for row in _all_rows(pg_cluster):
                    copy.write_row(row)
            assert groups == one.execute("SELECT value, count(*), avg(id) FROM everything GROUP BY value "
                                         "ORDER BY value").fetchall()
        assert len(conn.execute("SELECT * FROM data").fetchall()) == len(ids)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="data.id"):
            conn.execute("UPDATE data SET value = 'x'")
        # The client keeps working after the refusal.
        wait_replicas_caught_up(pg_cluster)
        assert conn.execute("SELECT value FROM data WHERE id = 42").fetchone() == ("v2",)


def test_show_databases_and_metrics_carry_the_shard(start_pypool, pg_cluster, shard_databases):
    config = _config(pg_cluster)
    config["general"] = {"enable_prometheus_exporter": True}
    pypool = start_pypool(config)
    _psql(pypool, "SET SHARD TO '2';\nSELECT 1;\n")
    admin = _psql_admin(pypool, "SHOW DATABASES;")
    names = {line.split("|")[0]: line.split("|")[3] for line in admin.stdout.split() if "|" in line}
    for shard in range(SHARDS):
        assert names[f"{POOL}_shard_{shard}_primary"] == f"shard{shard}"
        assert names[f"{POOL}_shard_{shard}_replica_1"] == f"shard{shard}"
    port = pypool.config["general"]["prometheus_exporter_port"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    queries = {}
    for line in metrics.splitlines():
        if line.startswith("pgcat_stats_total_query_count{") and f'pool="{POOL}"' in line:
            shard = re.search(r'shard="(\d+)"', line).group(1)
            queries[shard] = queries.get(shard, 0) + float(line.rsplit(" ", 1)[1])
    assert set(queries) == {"0", "1", "2"}
    assert queries["2"] >= 1  # the SELECT ran on shard 2


def _psql_admin(pypool, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": "admin_pass", "PGSSLMODE": "disable"}
    return subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", "admin_user",
                           "-d", "pgcat"], input=script, env=env, capture_output=True, text=True, timeout=30)


def test_fanout_of_prepared_statements(sharded, pg_cluster):
    # psycopg prepares a statement run 5 times (named from then on); asyncpg always names them.
    pypool = sharded(automatic_sharding_key="data.id", default_shard="all")
    ids = list(range(1, 31))
    with psycopg.connect(pypool.dsn(database=POOL), autocommit=True) as conn:
        for i in ids:
            conn.execute("INSERT INTO data (id, value) VALUES (%s, %s)", (i, "x"))
        wait_replicas_caught_up(pg_cluster)
        for limit in (3, 4, 5, 6, 7, 8, 3):
            rows = conn.execute("SELECT id FROM data WHERE id > %s ORDER BY id LIMIT 3", (limit,)).fetchall()
            assert rows == [(limit + 1,), (limit + 2,), (limit + 3,)]

    async def run() -> None:
        conn = await asyncpg.connect(pypool.dsn(database=POOL))
        try:
            for _ in range(3):
                assert sorted(r["id"] for r in await conn.fetch("SELECT id FROM data WHERE id > $1", 0)) == ids
                # asyncpg asks for binary results without a Describe: rows can only be concatenated,
                # anything to merge is refused rather than answered wrongly.
                with pytest.raises(asyncpg.exceptions.FeatureNotSupportedError, match="across shards"):
                    await conn.fetch("SELECT count(*) FROM data WHERE id > $1", 10)
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(run())


def test_reload_rebuilds_every_shard_and_clients_follow(sharded, pg_cluster):
    pypool = sharded()
    with psycopg.connect(pypool.dsn(database=POOL), autocommit=True) as conn:
        conn.execute("SET SHARD TO '2'")
        assert conn.execute("SELECT current_database()").fetchone() == ("shard2",)
        pypool.config["pools"][POOL]["users"]["0"]["pool_size"] = 3
        pypool.config_path.write_text(dump_config(pypool.config))
        with admin(pypool) as console:
            console.execute("RELOAD")
            sizes = {(d["name"], d["pool_size"]) for d in rows(console, "SHOW DATABASES") if d["name"].startswith(POOL)}
        assert sizes == {(f"{POOL}_shard_{s}_{role}", 3) for s in range(SHARDS)
                         for role in ("primary", "replica_0", "replica_1")}
        assert "3 rebuilt" in wait_for_log(pypool, "config reloaded")
        # The client keeps its shard on the rebuilt groups.
        assert conn.execute("SELECT current_database()").fetchone() == ("shard2",)
        conn.execute("SET SHARD TO '1'")
        assert conn.execute("SELECT current_database()").fetchone() == ("shard1",)
