"""Real clients through pypool: psql, psycopg 3 (sync and async), asyncpg, pgbench.

Each test drives a client the way an application would and checks what that
application sees: results, transaction outcomes, errors, COPY data, cancel.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
import uuid

import asyncpg
import psycopg
import psycopg.errors
import pytest

from tests.conftest import DATABASE, PASSWORD, USER
from tests.integration._support import (
    PRIMARY_ONLY,
    assert_clean_pgbench,
    cancel_when_running,
    login,
    pgbench,
    psql,
    read_message,
    simple_query,
)

pytestmark = pytest.mark.integration

BIG_ROWS = 50_000
BIG_WIDTH = 1_000  # 50 000 rows x 1 000 bytes = 50 MB of column data


def primary_dsn(pg_cluster) -> str:
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pg_cluster[0].port}/{DATABASE}?sslmode=disable"


@pytest.fixture
def pypool(start_pypool):
    return start_pypool(PRIMARY_ONLY)


@pytest.fixture
def table(pg_cluster):
    """A fresh table on the primary, created and dropped directly (not through pypool)."""
    name = f"pypool_it_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, txt text)")
    yield name
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def primary_ids(pg_cluster, table: str) -> list[int]:
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


# -------------------------------------------------------------------- psql

def test_psql_queries_transaction_and_error_in_transaction(pypool, table, pg_cluster):
    script = f"""
SELECT 40 + 2;
SELECT current_user || '@' || current_database();
BEGIN;
INSERT INTO {table} VALUES (1, 'one');
INSERT INTO {table} VALUES (2, 'two');
COMMIT;
BEGIN;
INSERT INTO {table} VALUES (3, 'three');
SELECT 1/0;
SELECT 'must not run';
ROLLBACK;
SELECT 'after rollback: ' || count(*) FROM {table};
"""
    result = psql(pypool, "-A", "-t", "-v", "ON_ERROR_STOP=0", input=script)
    lines = result.stdout.split()
    assert "42" in lines, result
    assert f"{USER}@{DATABASE}" in lines, result
    assert "after rollback: 2" in result.stdout, result
    assert "must not run" not in result.stdout, result
    assert "division by zero" in result.stderr, result
    assert "current transaction is aborted" in result.stderr, result
    assert primary_ids(pg_cluster, table) == [1, 2]


def test_psql_copy_round_trip(pypool, table, tmp_path):
    rows = "".join(f"{i}\trow {i} with tab-free text\n" for i in range(1, 5001))
    dump = tmp_path / "dump.tsv"
    script = f"""
COPY {table} (id, txt) FROM STDIN;
{rows}\\.
SELECT 'loaded ' || count(*) || ' ' || sum(id) FROM {table};
\\copy {table} TO '{dump}'
TRUNCATE {table};
\\copy {table} FROM '{dump}'
SELECT 'reloaded ' || count(*) || ' ' || sum(id) FROM {table};
COPY (SELECT id, txt FROM {table} WHERE id <= 3 ORDER BY id) TO STDOUT;
"""
    result = psql(pypool, "-A", "-t", "-v", "ON_ERROR_STOP=1", input=script)
    assert result.returncode == 0, result
    total = sum(range(1, 5001))
    assert f"loaded 5000 {total}" in result.stdout, result
    assert f"reloaded 5000 {total}" in result.stdout, result
    assert "1\trow 1 with tab-free text\n2\trow 2 with tab-free text\n3\trow 3 with tab-free text" \
        in result.stdout, result
    assert dump.read_text() == rows


# ---------------------------------------------------------- psycopg (sync)

def test_psycopg_queries_transactions_and_errors(pypool, table, pg_cluster):
    with psycopg.connect(pypool.dsn(), prepare_threshold=None) as conn:
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
        assert conn.execute("SELECT %s || %s", ("py", "pool")).fetchone() == ("pypool",)
        conn.commit()

        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "committed"))
        with conn.transaction() as tx:
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (2, "rolled back"))
            raise psycopg.Rollback(tx)
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (3, "failed"))
                conn.execute("SELECT 1/0")

        # Error inside an implicit transaction: the session is aborted until ROLLBACK.
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (4, "aborted"))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "duplicate"))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == ([1],)
        conn.commit()
    assert primary_ids(pg_cluster, table) == [1]


def test_psycopg_copy_in_and_out(pypool, table):
    rows = [(i, f"text {i} \t with a tab and a 'quote'") for i in range(1, 3001)]
    with psycopg.connect(pypool.dsn(), prepare_threshold=None, autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy(f"COPY {table} (id, txt) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        assert conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (3000, sum(range(1, 3001)))
        with cur.copy(f"COPY (SELECT id, txt FROM {table} ORDER BY id) TO STDOUT") as copy:
            copy.set_types(["int4", "text"])
            out = list(copy.rows())
        assert out == rows
        # Binary format, and the connection still answers plain queries afterwards.
        with cur.copy(f"COPY (SELECT id FROM {table} ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4"])
            assert [r[0] for r in copy.rows()] == list(range(1, 3001))
        assert conn.execute("SELECT 'ok'").fetchone() == ("ok",)


def test_psycopg_streams_a_50_mb_result(pypool):
    with psycopg.connect(pypool.dsn(), prepare_threshold=None, autocommit=True) as conn:
        total = rows = 0
        for (value,) in conn.cursor().stream(
                f"SELECT repeat('x', {BIG_WIDTH}) FROM generate_series(1, {BIG_ROWS})"):
            total += len(value)
            rows += 1
        assert (rows, total) == (BIG_ROWS, BIG_ROWS * BIG_WIDTH)
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_result_to_a_stalled_reader_is_back_pressured(pypool):
    """A client that stops reading must not make pypool buffer the whole result."""
    with socket.create_connection(("127.0.0.1", pypool.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        login(sock)
        simple_query(sock, "SELECT 1")  # warm up: the server connection exists
        before = _rss_kib(pypool.proc.pid)
        sql = f"SELECT repeat('x', {BIG_WIDTH}) FROM generate_series(1, {BIG_ROWS})".encode() + b"\0"
        sock.sendall(b"Q" + len(sql).__add__(4).to_bytes(4, "big") + sql)
        time.sleep(2.0)  # stall: PostgreSQL can produce all 50 MB in this time
        grown_mib = (_rss_kib(pypool.proc.pid) - before) / 1024
        total = rows = 0
        while True:
            tag, payload = read_message(sock)
            if tag == "D":
                rows += 1
                total += int.from_bytes(payload[2:6], "big")
            elif tag == "Z":
                break
            else:
                assert tag in "TC", (tag, payload)
        assert (rows, total) == (BIG_ROWS, BIG_ROWS * BIG_WIDTH)
        assert grown_mib < 20, f"pypool grew by {grown_mib:.1f} MiB while the client was not reading"
        assert simple_query(sock, "SELECT 'still here'") == [["still here"]]


def test_psycopg_cancel_from_another_thread(pypool, pg_cluster):
    with psycopg.connect(pypool.dsn(), prepare_threshold=None, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        marker = f"cancel-me-{uuid.uuid4().hex[:8]}"
        canceller = cancel_when_running(conn, primary_dsn(pg_cluster), marker)
        # Only the cancel can end it with an error (uncancelled it returns a row after a minute).
        with pytest.raises(psycopg.errors.QueryCanceled) as excinfo:
            conn.execute(f"SELECT pg_sleep(60) /* {marker} */")
        canceller.join(30)
        assert excinfo.value.sqlstate == "57014"
        assert "canceling statement due to user request" in str(excinfo.value)
        assert conn.execute("SELECT 'alive', pg_backend_pid()").fetchone() == ("alive", pid)


# --------------------------------------------------------- psycopg (async)

async def test_psycopg_async_queries_transactions_errors_copy(pypool, table, pg_cluster):
    async with await psycopg.AsyncConnection.connect(pypool.dsn(), prepare_threshold=None) as conn:
        cur = await conn.execute("SELECT %s::int * 2", (21,))
        assert await cur.fetchone() == (42,)
        await conn.commit()
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'committed')")
        async with conn.transaction() as tx:
            await conn.execute(f"INSERT INTO {table} VALUES (2, 'rolled back')")
            raise psycopg.Rollback(tx)
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (3, 'failed')")
                await conn.execute("SELECT 1/0")
        cur = conn.cursor()
        async with cur.copy(f"COPY {table} (id, txt) FROM STDIN") as copy:
            for i in range(10, 510):
                await copy.write_row((i, f"async {i}"))
        await conn.commit()
        async with cur.copy(f"COPY (SELECT id, txt FROM {table} WHERE id >= 10 ORDER BY id) TO STDOUT") as copy:
            data = b"".join([bytes(chunk) async for chunk in copy])
        assert data.decode() == "".join(f"{i}\tasync {i}\n" for i in range(10, 510))
        await conn.commit()
    assert primary_ids(pg_cluster, table) == [1, *range(10, 510)]


# ------------------------------------------------------------------ asyncpg

async def test_asyncpg_fetch_transactions_errors_copy(pypool, table, pg_cluster):
    conn = await asyncpg.connect(pypool.dsn(), statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        rows = await conn.fetch("SELECT g, g * g AS sq FROM generate_series(1, 100) g")
        assert [(r["g"], r["sq"]) for r in rows] == [(g, g * g) for g in range(1, 101)]

        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "committed")
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 2, "rolled back")
                raise RuntimeError("application error")
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 3, "failed")
                await conn.fetchval("SELECT 1/0")
        with pytest.raises(asyncpg.UniqueViolationError) as excinfo:
            await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "duplicate")
        assert excinfo.value.sqlstate == "23505"
        assert await conn.fetchval(f"SELECT array_agg(id) FROM {table}") == [1]

        records = [(i, f"record {i}") for i in range(100, 2100)]
        assert await conn.copy_records_to_table(table, records=records, columns=["id", "txt"]) == "COPY 2000"
        out = io.BytesIO()
        await conn.copy_from_query(f"SELECT id, txt FROM {table} WHERE id >= 100 ORDER BY id", output=out,
                                   format="csv")
        assert out.getvalue().decode() == "".join(f"{i},record {i}\n" for i in range(100, 2100))
        assert await conn.fetchval("SELECT 'after copy'") == "after copy"
    finally:
        await conn.close()
    assert primary_ids(pg_cluster, table) == [1, *range(100, 2100)]


async def test_asyncpg_timeout_cancels_the_query(pypool, pg_cluster):
    marker = f"timeout-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pypool.dsn(), statement_cache_size=0)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval(f"SELECT pg_sleep(120) /* {marker} */", timeout=0.5)
        # asyncpg sent a CancelRequest: the next query is answered (not after the 2-minute sleep;
        # the 60 s bound only stops a hang) and the server no longer runs the sleep.
        assert await conn.fetchval("SELECT 7", timeout=60) == 7
        direct = await asyncpg.connect(primary_dsn(pg_cluster))
        try:
            assert await direct.fetchval("SELECT count(*) FROM pg_stat_activity WHERE strpos(query, $1) > 0 "
                                         "AND state = 'active' AND pid <> pg_backend_pid()", marker) == 0
        finally:
            await direct.close()
    finally:
        await conn.close()


async def test_a_cancel_after_a_timeout_never_hits_the_next_statement(pypool):
    """asyncpg waits for its cancel connection to close before its next statement, as libpq does.

    PostgreSQL closes it once the backend has the signal; pypool must close it no sooner, or the
    signal arrives while the client's next statement runs and cancels that one (57014).
    """
    conn = await asyncpg.connect(pypool.dsn(), statement_cache_size=0)
    try:
        for _ in range(20):
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(5)", timeout=0.05)
            assert await conn.fetchval("SELECT count(*) FROM generate_series(1, 20000)", timeout=60) == 20000
    finally:
        await conn.close()


# ------------------------------------------------------------------ pgbench

@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_short_run(pypool, pgbench_tables, mode):
    result = pgbench(pypool, "-M", mode, "-c", "8", "-j", "2", "-T", "3")
    assert_clean_pgbench(result)
    assert f"query mode: {mode}" in result.output


# ------------------------------------- COPY must not pin the server afterwards

@pytest.fixture
def single_connection_pypool(start_pypool):
    """One server connection: a connection kept by the wrong client shows up as 53300 for the next."""
    from tests.conftest import pool_overrides, user_overrides
    from tests.integration._support import merge

    return start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1), pool_overrides(checkout_timeout=1000)))


def test_failed_copy_in_does_not_keep_the_server(single_connection_pypool, table):
    pypool = single_connection_pypool
    with psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=None) as copier, \
            psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=None) as other:
        copier.execute(f"INSERT INTO {table} VALUES (0, 'first')")
        # The duplicate is in the first rows; the client keeps streaming long after the
        # server has answered the COPY with an error and gone idle.
        with pytest.raises(psycopg.errors.UniqueViolation):
            with copier.cursor().copy(f"COPY {table} (id, txt) FROM STDIN") as copy:
                for i in range(200_000):
                    copy.write_row((i, "dup"))
        # The copier now sits idle: its stray CopyData must not have checked the server out.
        assert other.execute("SELECT 'other ok'").fetchone() == ("other ok",)
        assert copier.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
        assert other.execute("SELECT 'other again'").fetchone() == ("other again",)


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "duplicate"])
def test_extended_protocol_copy_in_releases_the_server(single_connection_pypool, table, fail):
    """libpq's PQexecParams("COPY ... FROM STDIN") sends a Sync the server ignores in copy-in mode."""
    pypool = single_connection_pypool
    with psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=None) as copier, \
            psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=None) as other:
        pg = copier.pgconn
        pg.send_query_params(f"COPY {table} (id, txt) FROM STDIN".encode(), None)
        assert pg.get_result().status == psycopg.pq.ExecStatus.COPY_IN
        rows = "".join(f"{i % 3 if fail else i}\tx\n" for i in range(1000)).encode()
        pg.put_copy_data(rows)
        pg.put_copy_end()
        statuses = []
        while (result := pg.get_result()) is not None:
            statuses.append(result.status)
        expected = psycopg.pq.ExecStatus.FATAL_ERROR if fail else psycopg.pq.ExecStatus.COMMAND_OK
        assert statuses == [expected]
        assert other.execute("SELECT 'other ok'").fetchone() == ("other ok",)
        assert copier.execute(f"SELECT count(*) FROM {table}").fetchone() == (0 if fail else 1000,)
        assert other.execute("SELECT 'other again'").fetchone() == ("other again",)
