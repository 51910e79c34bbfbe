"""Mainstream drivers with their default settings, through pypool in transaction mode (issue 6).

Each driver runs the same kind of workload with 20 concurrent clients on a
pool of 2 server connections: named prepared statements (the drivers'
defaults: asyncpg's statement cache, psycopg's prepare_threshold, JDBC's
prepareThreshold, pgbench -M prepared), session SETs, SET LOCAL and
transactions. Results are checked row by row, every client's settings must
stay its own, and the primary's pg_stat_activity must never show more than
2 pypool connections.

Statement texts embed the client number, so the same driver-chosen name
(``__asyncpg_stmt_1__``, ``_pg3_0``, ``S_1``) means a different statement
in each client: a mix-up runs another client's statement and shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import DATABASE, PASSWORD, USER, pool_overrides, user_overrides, wait_replicas_caught_up
from tests.integration._support import PRIMARY_ONLY, assert_clean_pgbench, merge, pgbench
from tests.integration.test_pool_limits import BackendSampler

pytestmark = pytest.mark.integration

CLIENTS = 20
POOL_SIZE = 2
ROUNDS = 8
ROWS = 5
SETTINGS_SQL = "SELECT current_setting('application_name'), current_setting('statement_timeout')"
JDBC_JAR = Path.home() / ".m2/repository/org/postgresql/postgresql/42.7.13/postgresql-42.7.13.jar"


@pytest.fixture
def pooled(start_pypool, pg_cluster):
    """pypool with pool_size 2 on the primary, a results table, and a sampler of pypool's backends."""
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=POOL_SIZE)))
    table = f"drivers_{uuid.uuid4().hex[:8]}"
    primary = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pg_cluster[0].port}/{DATABASE}?sslmode=disable"
    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (client int, n int, v bigint, PRIMARY KEY (client, n))")
    sampler = BackendSampler(pg_cluster, pypool)
    sampler.start()
    yield pypool, table, sampler
    sampler.stop()
    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def expected(client: int, rounds: int) -> tuple[int, int]:
    return rounds * ROWS, rounds * sum(range(ROWS))


def assert_at_most_pool_size(sampler: BackendSampler) -> None:
    sampler.stop()
    assert sampler.samples, "the sampler took no samples"
    assert max(sampler.samples) <= POOL_SIZE, f"the primary saw {max(sampler.samples)} pypool connections"


def own_settings(client: int) -> tuple[str, str]:
    return f"drv-{client}", f"{20000 + client}ms"


# ------------------------------------------------------------------- asyncpg

async def asyncpg_client(dsn: str, table: str, client: int) -> None:
    conn = await asyncpg.connect(dsn)  # statement cache on (the default)
    try:
        app, timeout = own_settings(client)
        await conn.execute(f"SET application_name = '{app}'")
        await conn.execute(f"SET statement_timeout = '{timeout}'")
        insert = f"INSERT INTO {table} (client, n, v) VALUES ($1, $2, $3 + {client} - {client})"
        totals = f"SELECT {client} AS me, count(*), coalesce(sum(v), 0) FROM {table} WHERE client = $1"
        for r in range(ROUNDS):
            async with conn.transaction():
                await conn.executemany(insert, [(client, r * ROWS + k, k) for k in range(ROWS)])
                await conn.execute("SET LOCAL statement_timeout = '1s'")
                assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "1s"
            me, count, total = await conn.fetchrow(totals, client)
            assert me == client
            assert (count, total) == expected(client, r + 1)
            assert tuple(await conn.fetchrow(SETTINGS_SQL)) == (app, timeout)
        tr = conn.transaction()
        await tr.start()
        await conn.execute("SET statement_timeout = '7s'")
        await tr.rollback()
        assert tuple(await conn.fetchrow(SETTINGS_SQL)) == (app, timeout)
    finally:
        await conn.close()


def test_asyncpg_default_statement_cache(pooled):
    pypool, table, sampler = pooled

    async def main() -> None:
        await asyncio.gather(*(asyncpg_client(pypool.dsn(), table, c) for c in range(1, CLIENTS + 1)))

    asyncio.run(asyncio.wait_for(main(), 240))
    assert_at_most_pool_size(sampler)
    # The admin console shows the server-side statement caches at work (PgCat's columns).
    admin = pypool.config["general"]
    with psycopg.connect(pypool.dsn(user=admin["admin_username"], password=admin["admin_password"],
                                    database="pgcat"), autocommit=True) as console:
        cur = console.execute("SHOW SERVERS")
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, row)) for row in cur.fetchall()]
    assert rows and all(int(r["prepare_cache_size"]) > 0 for r in rows), rows
    assert sum(int(r["prepare_cache_hit"]) for r in rows) > sum(int(r["prepare_cache_miss"]) for r in rows)


# ------------------------------------------------------------------- psycopg

async def psycopg_client(dsn: str, table: str, client: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:  # prepare_threshold = 5
        assert conn.prepare_threshold == 5
        app, timeout = own_settings(client)
        await conn.execute(f"SET application_name = '{app}'")
        await conn.execute(f"SET statement_timeout = '{timeout}'")
        await conn.commit()
        insert = f"INSERT INTO {table} (client, n, v) VALUES (%s, %s, %s + {client} - {client})"
        totals = f"SELECT {client} AS me, count(*), coalesce(sum(v), 0) FROM {table} WHERE client = %s"
        for r in range(ROUNDS):
            async with conn.transaction():
                for k in range(ROWS):
                    await conn.execute(insert, (client, r * ROWS + k, k))
                await conn.execute("SET LOCAL statement_timeout = '1s'")
            cur = await conn.execute(totals, (client,))
            me, count, total = await cur.fetchone()
            assert me == client
            assert (count, total) == expected(client, r + 1)
            cur = await conn.execute(SETTINGS_SQL)
            assert await cur.fetchone() == (app, timeout)
            await conn.commit()
        await conn.execute("SET statement_timeout = '7s'")
        await conn.rollback()
        cur = await conn.execute(SETTINGS_SQL)
        assert await cur.fetchone() == (app, timeout)
        await conn.rollback()


def test_psycopg_default_prepare_threshold(pooled):
    pypool, table, sampler = pooled

    async def main() -> None:
        await asyncio.gather(*(psycopg_client(pypool.dsn(), table, c) for c in range(1, CLIENTS + 1)))

    asyncio.run(asyncio.wait_for(main(), 240))
    assert_at_most_pool_size(sampler)


# ---------------------------------------------------------------- SQLAlchemy

@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_sqlalchemy(pooled, driver):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import create_async_engine

    pypool, table, sampler = pooled
    url = f"postgresql+{driver}://{USER}:{PASSWORD}@127.0.0.1:{pypool.port}/{DATABASE}"
    text = sqlalchemy.text

    async def client_work(engine, client: int) -> None:
        app, timeout = own_settings(client)
        async with engine.connect() as conn:
            await conn.execute(text(f"SET application_name = '{app}'"))
            await conn.execute(text(f"SET statement_timeout = '{timeout}'"))
            await conn.commit()
            insert = text(f"INSERT INTO {table} (client, n, v) VALUES (:c, :n, :v + {client} - {client})")
            totals = text(f"SELECT {client} AS me, count(*), coalesce(sum(v), 0) FROM {table} WHERE client = :c")
            for r in range(ROUNDS):
                await conn.execute(insert, [{"c": client, "n": r * ROWS + k, "v": k} for k in range(ROWS)])
                await conn.commit()
                me, count, total = (await conn.execute(totals, {"c": client})).one()
                assert me == client
                assert (count, total) == expected(client, r + 1)
                assert tuple((await conn.execute(text(SETTINGS_SQL))).one()) == (app, timeout)
                await conn.commit()

    async def main() -> None:
        engine = create_async_engine(url, pool_size=CLIENTS, max_overflow=0,
                                     connect_args={"ssl": False} if driver == "asyncpg" else {"sslmode": "disable"})
        try:
            await asyncio.gather(*(client_work(engine, c) for c in range(1, CLIENTS + 1)))
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(main(), 240))
    assert_at_most_pool_size(sampler)


# ------------------------------------------------------------------- pgbench

def test_pgbench_prepared(pooled, pgbench_tables):
    pypool, _, sampler = pooled
    # One thread per client: pgbench prepares with a blocking call, so clients sharing a
    # thread would wait on each other while another holds one of the 2 connections.
    result = pgbench(pypool, "-M", "prepared", "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", "6", timeout=120)
    assert_clean_pgbench(result)
    assert "query mode: prepared" in result.output
    assert_at_most_pool_size(sampler)


# ---------------------------------------------------------------------- JDBC

def test_jdbc_default_prepare_threshold_and_batches(pooled, tmp_path):
    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.skip("java/javac not installed")
    if not JDBC_JAR.exists():
        pytest.skip(f"PostgreSQL JDBC driver not found at {JDBC_JAR}")
    pypool, table, sampler = pooled
    source = Path(__file__).parent / "drivers" / "JdbcWorkload.java"
    subprocess.run(["javac", "-d", str(tmp_path), "-cp", str(JDBC_JAR), str(source)], check=True,
                   capture_output=True, timeout=180)
    url = f"jdbc:postgresql://127.0.0.1:{pypool.port}/{DATABASE}"
    proc = subprocess.run(["java", "-cp", f"{JDBC_JAR}{os.pathsep}{tmp_path}", "JdbcWorkload", url, USER, PASSWORD,
                           table, str(CLIENTS), str(ROUNDS), str(ROWS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"OK {CLIENTS * ROUNDS * ROWS}"
    assert_at_most_pool_size(sampler)


# -------------------------------------------------------- harder protocol paths

def test_error_inside_a_pipeline_leaves_statements_consistent(start_pypool):
    """A failed message makes the server skip the rest of the batch, including Parses pypool sent."""
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    with psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=0) as conn, \
            psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=0) as other:
        for attempt in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.pipeline():
                    conn.execute("SELECT 10 / %s", (2,))
                    conn.execute("SELECT 10 / %s", (0,))
                    conn.execute(f"SELECT {attempt} + %s", (1,))  # skipped by the server
            # Every statement works afterwards, on the same and on other clients.
            assert conn.execute(f"SELECT {attempt} + %s", (1,)).fetchone() == (attempt + 1,)
            assert other.execute(f"SELECT {attempt} + %s", (2,)).fetchone() == (attempt + 2,)
            assert conn.execute("SELECT 10 / %s", (5,)).fetchone() == (2,)


def test_unnamed_statement_bound_in_a_later_request(start_pypool):
    """PostgreSQL keeps the unnamed statement until the next unnamed Parse or simple Query: a client
    may Parse/Describe/Sync it and Bind it in a later request. Through pypool that request may run
    after another client's unnamed statement on the same server connection (pool_size 1 here)."""
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    with psycopg.connect(pypool.dsn(), autocommit=True) as conn, \
            psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=None) as other:
        pgconn = conn.pgconn
        assert pgconn.prepare(b"", b"SELECT $1::int + 1").status == psycopg.pq.ExecStatus.COMMAND_OK
        # The other client's unnamed statement (psycopg: Parse/Bind/Execute unnamed) replaces it on the server.
        assert other.execute("SELECT %s::text || '!'", ("other",)).fetchone() == ("other!",)
        assert pgconn.describe_prepared(b"").nparams == 1
        assert other.execute("SELECT %s::text || '?'", ("again",)).fetchone() == ("again?",)
        result = pgconn.exec_prepared(b"", [b"41"])
        assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message
        assert result.get_value(0, 0) == b"42"


def test_asyncpg_uncached_statement_across_a_type_introspection(start_pypool):
    """asyncpg's test_introspection_no_stmt_cache_03: an uncacheable statement is parsed unnamed, its
    unknown type is introspected in between (with jit on, asyncpg's set_config('jit', ...) makes pypool
    read the session's settings back on that server connection), then it is bound."""
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    mood = f"mood_{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        conn = await asyncpg.connect(pypool.dsn(), max_cacheable_statement_size=10000, server_settings={"jit": "on"})
        try:
            await conn.execute(f"CREATE TYPE {mood} AS ENUM ('sad', 'happy')")
            long_text = "a" * 10000  # only this one is over max_cacheable_statement_size (unnamed), not the introspection
            assert await conn.fetchval(f"SELECT $1::{mood}, '{long_text}'", "happy") == "happy"
            assert await conn.fetchval("SELECT current_setting('jit')") == "on"
        finally:
            await conn.execute(f"DROP TYPE IF EXISTS {mood}")
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_large_bind_split_across_reads(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    big = "x" * 3_000_000

    async def main() -> None:
        a = await asyncpg.connect(pypool.dsn())
        b = await asyncpg.connect(pypool.dsn())
        try:
            for conn in (a, b, a):
                assert await conn.fetchval("SELECT length($1::text) + 0", big) == len(big)
                assert await conn.fetchval("SELECT md5($1::text) = md5(repeat('x', 3000000))", big)
        finally:
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_named_statements_of_reads_still_go_to_replicas(start_pypool, pg_cluster):
    """With read/write splitting, a Bind of a prepared SELECT is routed by the statement's text."""
    pypool = start_pypool(pool_overrides(load_balancing_mode="round_robin", primary_reads_enabled=False))
    replicas = {n.port for n in pg_cluster[1:]}

    async def main() -> None:
        conn = await asyncpg.connect(pypool.dsn())
        try:
            ports = {await conn.fetchval("SELECT inet_server_port() + $1::int", 0) for _ in range(8)}
            assert ports == replicas
            written = await conn.fetchval("SELECT inet_server_port() + $1::int FROM (SELECT nextval('drivers_seq')) s", 0)
            assert written == pg_cluster[0].port
        finally:
            await conn.close()

    with psycopg.connect(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pg_cluster[0].port}/{DATABASE}?sslmode=disable",
                         autocommit=True) as direct:
        direct.execute("CREATE SEQUENCE IF NOT EXISTS drivers_seq")
    wait_replicas_caught_up(pg_cluster)
    asyncio.run(asyncio.wait_for(main(), 60))
