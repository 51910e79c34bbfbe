"""Session pinning and pool resets in transaction mode, with real drivers.

A client whose transaction leaves state on its server connection (temporary
tables, WITH HOLD cursors, SQL PREPARE, session advisory locks) keeps that
connection until the state is gone, then shares the pool again; the pool
resets of asyncpg, psycopg_pool and SQLAlchemy answer as PostgreSQL does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request

import asyncpg
import psycopg
import psycopg_pool
import pytest
import sqlalchemy

from tests.conftest import DATABASE, PASSWORD, USER, user_overrides
from tests.integration._ops import admin, show, wait_for_log
from tests.integration._support import PRIMARY_ONLY, merge, psql, wait_for

pytestmark = pytest.mark.integration


def pinning(pool_size: int = 4, **pool: object) -> dict:
    return merge(PRIMARY_ONLY, user_overrides(pool_size=pool_size), {"pools": {DATABASE: pool}})


@pytest.fixture
def pooler(start_pypool):
    return start_pypool(pinning())


def connect(pypool) -> psycopg.Connection:
    return psycopg.connect(pypool.dsn(), autocommit=True)


def backend(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def pinned_counts(pypool) -> tuple[int, list[str]]:
    """SHOW POOLS cl_pinned, and the pinned column of SHOW CLIENTS."""
    with admin(pypool) as console:
        pools = show(console, "POOLS")
        clients = show(console, "CLIENTS")
    return int(pools[0]["cl_pinned"]), sorted(c["pinned"] for c in clients if c["pinned"])


def busy_elsewhere(pypool, times: int = 4) -> set[int]:
    """Backends another client's transactions run on meanwhile."""
    with connect(pypool) as other:
        return {backend(other) for _ in range(times)}


# ------------------------------------------------------------ what pins, what unpins


def test_a_temporary_table_pins_its_client_until_it_is_dropped(pooler):
    with connect(pooler) as conn:
        conn.execute("CREATE TEMP TABLE scratch (id int)")
        pid = backend(conn)
        assert pinned_counts(pooler) == (1, ["a temporary object that outlives its transaction"])
        assert pid not in busy_elsewhere(pooler), "a pinned connection is not shared"
        for i in range(3):  # separate transactions, each on the connection holding the table
            conn.execute("INSERT INTO scratch VALUES (%s)", (i,))
            assert backend(conn) == pid
        assert conn.execute("SELECT count(*) FROM scratch").fetchone() == (3,)
        log = wait_for_log(pooler, "pinned to server connection")
        assert "temporary" in log
        conn.execute("DROP TABLE scratch")
        assert pinned_counts(pooler) == (0, [])
        wait_for_log(pooler, "unpinned from server connection")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM scratch")


@pytest.mark.parametrize("statement, reason", [
    ("SELECT 1 AS id INTO TEMP made", "a temporary table made by SELECT ... INTO"),
    ("select 1 as id into temporary table made", "a temporary table made by SELECT ... INTO"),
    ("WITH one AS (SELECT 1 AS id) SELECT id INTO LOCAL TEMP made FROM one",
     "a temporary table made by SELECT ... INTO"),
    ("CREATE TEMP TABLE made AS SELECT 1 AS id", "a temporary object that outlives its transaction"),
])
def test_temporary_tables_made_from_a_query_pin_like_create_temp_table(pooler, statement, reason):
    with connect(pooler) as conn:
        conn.execute(statement)
        pid = backend(conn)
        assert pinned_counts(pooler) == (1, [reason])
        assert pid not in busy_elsewhere(pooler), "a pinned connection is not shared"
        for _ in range(3):
            assert conn.execute("SELECT count(*) FROM made").fetchone() == (1,)
            assert backend(conn) == pid
        conn.execute("DROP TABLE made")
        assert pinned_counts(pooler) == (0, [])


def test_a_temporary_table_through_psql_lives_for_the_session(pooler):
    script = ("CREATE TEMP TABLE notes (n text);\n"
              "INSERT INTO notes VALUES ('one');\n"
              "INSERT INTO notes VALUES ('two');\n"
              "SELECT string_agg(n, ',' ORDER BY n) FROM notes;\n")
    result = psql(pooler, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", input=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "one,two"
    # psql left: the pin went with it, and the connection was reset before anyone else got it.
    assert pinned_counts(pooler) == (0, [])
    with connect(pooler) as conn:
        for _ in range(4):
            assert conn.execute("SELECT to_regclass('pg_temp.notes')").fetchone() == (None,)


def test_a_rolled_back_temporary_table_does_not_pin(pooler):
    with connect(pooler) as conn:
        conn.execute("BEGIN")
        conn.execute("CREATE TEMP TABLE gone (id int)")
        conn.execute("ROLLBACK")
        assert pinned_counts(pooler) == (0, [])


def test_a_with_hold_cursor_pins_until_closed(pooler):
    with connect(pooler) as conn:
        conn.execute("DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 5)")
        assert pinned_counts(pooler)[0] == 1
        assert conn.execute("FETCH 2 FROM c").fetchall() == [(1,), (2,)]
        busy_elsewhere(pooler)
        assert conn.execute("FETCH 2 FROM c").fetchall() == [(3,), (4,)]
        conn.execute("CLOSE c")
        assert pinned_counts(pooler)[0] == 0


def test_sql_prepare_and_execute_pin_until_deallocated(pooler):
    with connect(pooler) as conn:
        conn.execute("PREPARE twice(int) AS SELECT $1 * 2")
        busy_elsewhere(pooler)
        assert conn.execute("EXECUTE twice(21)").fetchone() == (42,)
        assert pinned_counts(pooler)[0] == 1
        conn.execute("DEALLOCATE twice")
        assert pinned_counts(pooler)[0] == 0
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):  # as PostgreSQL says it
            conn.execute("EXECUTE twice(1)")
        assert pinned_counts(pooler)[0] == 0


def test_a_session_advisory_lock_pins_until_unlocked(pooler):
    with connect(pooler) as holder, connect(pooler) as other:
        holder.execute("SELECT pg_advisory_lock(4242)")
        assert pinned_counts(pooler)[0] == 1
        assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (False,)
        assert holder.execute("SELECT pg_advisory_unlock(4242)").fetchone() == (True,)
        assert pinned_counts(pooler)[0] == 0
        assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
        other.execute("SELECT pg_advisory_unlock_all()")
        assert pinned_counts(pooler)[0] == 0


@pytest.mark.parametrize("reset", ["DISCARD ALL", "DISCARD TEMP"])
def test_discard_unpins_a_temporary_table(pooler, reset):
    with connect(pooler) as conn:
        conn.execute("CREATE TEMP TABLE scratch (id int)")
        conn.execute("SET statement_timeout = '7s'")
        assert pinned_counts(pooler)[0] == 1
        conn.execute(reset)
        assert pinned_counts(pooler)[0] == 0
        expected = "0" if reset == "DISCARD ALL" else "7s"
        for _ in range(3):
            assert conn.execute("SHOW statement_timeout").fetchone() == (expected,)


def test_pinned_connections_are_capped_then_refused_as_before(start_pypool):
    pooler = start_pypool(pinning(pool_size=4, max_pinned_connections=2))
    with connect(pooler) as a, connect(pooler) as b, connect(pooler) as c:
        a.execute("CREATE TEMP TABLE t (id int)")
        b.execute("SELECT pg_advisory_lock(77)")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            c.execute("CREATE TEMP TABLE t (id int)")
        assert "temporary object" in info.value.diag.message_primary
        assert "max_pinned_connections (2)" in info.value.diag.message_hint
        assert c.execute("SELECT 1").fetchone() == (1,)  # the others keep sharing the rest
        a.execute("DROP TABLE t")
        c.execute("CREATE TEMP TABLE t (id int)")
        assert pinned_counts(pooler)[0] == 2


# ------------------------------------------------------------------------ resets

ASYNCPG_RESET = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"


async def _asyncpg_pool_round(port: int) -> tuple[int, str]:
    pool = await asyncpg.create_pool(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                     database=DATABASE, min_size=1, max_size=1)
    try:
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        async with pool.acquire() as con:  # the same connection, reset by asyncpg on release
            await con.execute("SET search_path = elsewhere")
            await con.execute("LISTEN chan")  # the reset UNLISTENs it
        async with pool.acquire() as con:
            value = await con.fetchval("SELECT 41 + 1")
            path = await con.fetchval("SHOW search_path")
        return value, path
    finally:
        await pool.close()


def test_asyncpg_pool_acquire_and_release(pooler, pg_cluster):
    direct = asyncio.run(_asyncpg_pool_round(pg_cluster[0].port))
    assert asyncio.run(_asyncpg_pool_round(pooler.port)) == direct == (42, '"$user", public')


async def _reset_reply(port: int, pinned=lambda: None) -> tuple:
    con = await asyncpg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, database=DATABASE)
    try:
        await con.execute("CREATE TEMP TABLE r (id int)")
        await con.execute("SELECT pg_advisory_lock(99)")
        await con.execute("SET work_mem = '12MB'")
        status = await con.execute(ASYNCPG_RESET)
        held = await con.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                  "AND pid = pg_backend_pid()")
        after = pinned()
        await con.execute("DROP TABLE r")
        return status, held, await con.fetchval("SHOW work_mem"), after, pinned()
    finally:
        await con.close()


def test_asyncpgs_reset_answers_as_postgresql_and_releases_the_lock(pooler, pg_cluster):
    direct = asyncio.run(_reset_reply(pg_cluster[0].port))
    assert direct == ("RESET", 0, "4MB", None, None)
    through = asyncio.run(_reset_reply(pooler.port, lambda: pinned_counts(pooler)[0]))
    # The temporary table outlives asyncpg's reset and keeps the client pinned until dropped.
    assert through == direct[:3] + (1, 0)


def test_psycopg_pool_reset_on_return(pooler):
    with psycopg_pool.ConnectionPool(pooler.dsn(), min_size=1, max_size=1, open=True,
                                     kwargs={"autocommit": True},
                                     reset=lambda conn: conn.execute("DISCARD ALL")) as pool:
        with pool.connection() as conn:
            conn.execute("CREATE TEMP TABLE scratch (id int)")
            conn.execute("SET application_name = 'borrowed'")
        assert pinned_counts(pooler)[0] == 0, "DISCARD ALL on return dropped the table: unpinned"
        with pool.connection() as conn:
            assert conn.execute("SELECT to_regclass('pg_temp.scratch')").fetchone() == (None,)
            assert conn.execute("SHOW application_name").fetchone() != ("borrowed",)


def test_sqlalchemy_reset_on_return_recipe(pooler):
    url = f"postgresql+psycopg://{USER}:{PASSWORD}@127.0.0.1:{pooler.port}/{DATABASE}"
    engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0)

    # SQLAlchemy's documented PostgreSQL reset-on-return for temporary tables and settings.
    @sqlalchemy.event.listens_for(engine, "reset")
    def _reset(dbapi_connection, connection_record, reset_state):
        if not reset_state.terminate_only:
            dbapi_connection.autocommit = True
            dbapi_connection.execute("CLOSE ALL")
            dbapi_connection.execute("RESET ALL")
            dbapi_connection.execute("DISCARD TEMP")
            dbapi_connection.autocommit = False
        dbapi_connection.rollback()

    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TEMP TABLE scratch (id int)")
            conn.exec_driver_sql("SET work_mem = '9MB'")
            conn.commit()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT to_regclass('pg_temp.scratch')").scalar() is None
            assert conn.exec_driver_sql("SHOW work_mem").scalar() == "4MB"
        assert pinned_counts(pooler)[0] == 0
    finally:
        engine.dispose()


def _settings_after(port: int, reset: str, pin: bool) -> tuple:
    dsn = (f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}?sslmode=disable"
           "&application_name=startup-name")
    with psycopg.connect(dsn, autocommit=True) as conn:
        if pin:
            conn.execute("CREATE TEMP TABLE keep (id int)")
        conn.execute("SET application_name = 'changed'")
        conn.execute(reset)
        told = conn.info.parameter_status("application_name")  # what the driver was told
        return told, conn.execute("SHOW application_name").fetchone()[0]


@pytest.mark.parametrize("pin", [False, True], ids=["shared", "pinned"])
@pytest.mark.parametrize("reset", ["RESET ALL", "RESET application_name", "SET application_name TO DEFAULT",
                                   "DISCARD ALL"])
def test_a_reset_goes_back_to_the_startup_settings_as_postgresql_does(pooler, pg_cluster, reset, pin):
    direct = _settings_after(pg_cluster[0].port, reset, pin)
    assert direct == ("startup-name", "startup-name")
    assert _settings_after(pooler.port, reset, pin) == direct


def test_a_pinned_clients_reads_run_where_its_temporary_table_lives(start_pypool, pg_cluster):
    routed = start_pypool()  # read/write splitting on: reads go to the replicas
    with connect(routed) as conn:
        assert {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(6)} != {pg_cluster[0].port}
        conn.execute("CREATE TEMP TABLE here (id int)")
        for _ in range(6):
            assert conn.execute("SELECT count(*), inet_server_port() FROM here").fetchone() == (0, pg_cluster[0].port)
        conn.execute("DROP TABLE here")
        assert pg_cluster[0].port not in {conn.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(6)}


def test_metrics_count_pinned_clients(start_pypool):
    pooler = start_pypool(merge(pinning(), {"general": {"enable_prometheus_exporter": True}}))
    port = pooler.config["general"]["prometheus_exporter_port"]

    def pinned_metric() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        (line,) = [l for l in text.splitlines() if l.startswith("pypool_client_pinned{")]
        return float(line.rsplit(" ", 1)[1])

    with connect(pooler) as conn:
        wait_for(lambda: pinned_metric() == 0, what="the exporter")
        conn.execute("SELECT pg_advisory_lock(5)")
        assert pinned_metric() == 1
        conn.execute("SELECT pg_advisory_unlock_all()")
        assert pinned_metric() == 0


# ---------------------------------------------------------------- node-postgres

NODE_SCRIPT = r"""
const { Client } = require('pg');
(async () => {
  const client = new Client({ host: '127.0.0.1', port: +process.argv[2], user: process.argv[3],
                              password: process.argv[4], database: process.argv[5] });
  await client.connect();
  await client.query('CREATE TEMPORARY TABLE node_items (id int, label text)');
  for (const [id, label] of [[1, 'one'], [2, 'two']]) {
    await client.query('INSERT INTO node_items VALUES ($1, $2)', [id, label]);  // extended protocol
  }
  const rows = (await client.query('SELECT id, label FROM node_items ORDER BY id')).rows;
  await client.query('DROP TABLE node_items');
  await client.end();
  console.log(JSON.stringify(rows));
})().catch((err) => { console.error(err.message); process.exit(1); });
"""


@pytest.fixture(scope="module")
def node_pg(tmp_path_factory):
    """A directory with node-postgres installed from the npm registry."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for node-postgres")
    directory = tmp_path_factory.mktemp("node-pg")
    (directory / "package.json").write_text('{"private": true}')
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "pg@8"], cwd=directory,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return directory


def test_node_postgres_temporary_table(pooler, node_pg):
    script = node_pg / "temp_table.js"
    script.write_text(NODE_SCRIPT)
    done = subprocess.run(["node", str(script), str(pooler.port), USER, PASSWORD, DATABASE], cwd=node_pg,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"id": 1, "label": "one"}, {"id": 2, "label": "two"}]
    assert pinned_counts(pooler)[0] == 0


# ------------------------------------------------------------------ under load

async def _temp_table_client(port: int, n: int, seen_pins: list[int]) -> int:
    """Create a temp table (retrying while every pinnable connection is taken), use it, drop it."""
    con = await asyncpg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, database=DATABASE)
    refused = 0
    try:
        while True:
            try:
                await con.execute(f"CREATE TEMP TABLE mine_{n} (v int)")
                break
            except asyncpg.FeatureNotSupportedError:
                refused += 1
                await asyncio.sleep(0.05)
        for i in range(5):
            await con.execute(f"INSERT INTO mine_{n} VALUES ($1)", n * 100 + i)
        assert await con.fetchval(f"SELECT sum(v) FROM mine_{n}") == 5 * n * 100 + 10
        others = [f"pg_temp.mine_{k}" for k in range(10) if k != n]
        assert await con.fetchval("SELECT count(to_regclass(x)) FROM unnest($1::text[]) x", others) == 0
        seen_pins.append(await con.fetchval("SELECT pg_backend_pid()"))
        await con.execute(f"DROP TABLE mine_{n}")
        return refused
    finally:
        await con.close()


async def _sharing_client(port: int) -> int:
    con = await asyncpg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, database=DATABASE)
    try:
        total = 0
        for i in range(20):
            total += await con.fetchval("SELECT $1::int", i)
        return total
    finally:
        await con.close()


async def _load(port: int) -> tuple[list[int], list[int]]:
    pins: list[int] = []
    temp = [_temp_table_client(port, n, pins) for n in range(10)]
    sharing = [_sharing_client(port) for _ in range(40)]
    results = await asyncio.gather(*temp, *sharing)
    return results[10:], pins


def test_fifty_clients_on_five_connections_ten_of_them_with_temporary_tables(start_pypool):
    pooler = start_pypool(merge(pinning(pool_size=5), {"pools": {DATABASE: {"checkout_timeout": 30000}}}))
    sums, pins = asyncio.run(_load(pooler.port))
    assert sums == [sum(range(20))] * 40, "every sharing client ran all its transactions"
    assert len(pins) == 10, "every temp-table client worked on its own table"
    assert pinned_counts(pooler) == (0, [])


def test_pinned_client_gets_its_own_notify_before_its_next_statement(pooler):
    """One held ReadyForQuery: the pin check and the own-NOTIFY delivery both come before it."""
    with connect(pooler) as conn:
        seen: list[tuple[str, str]] = []
        conn.add_notify_handler(lambda n: seen.append((n.channel, n.payload)))
        conn.execute("LISTEN own")
        conn.execute("CREATE TEMP TABLE keep (a int)")  # pins the client
        pid = backend(conn)
        conn.execute("NOTIFY own, 'pinned'")
        assert seen == [("own", "pinned")]  # delivered before NOTIFY's ReadyForQuery
        assert backend(conn) == pid and pinned_counts(pooler)[0] == 1  # still pinned after the pin check
        conn.execute("DROP TABLE keep; NOTIFY own, 'unpinned'")
        assert seen == [("own", "pinned"), ("own", "unpinned")]
        assert pinned_counts(pooler)[0] == 0


def test_reset_with_own_notify_reports_startup_value_before_ready(start_pypool):
    pypool = start_pypool(pinning())
    with psycopg.connect(pypool.dsn(), autocommit=True, options="-c DateStyle=German") as conn:
        seen: list[str] = []
        conn.add_notify_handler(lambda n: seen.append(n.payload))
        conn.execute("LISTEN own")
        conn.execute("SET DateStyle = ISO")
        conn.execute("RESET DateStyle; NOTIFY own, 'reset'")
        assert seen == ["reset"]
        assert conn.info.parameter_status("DateStyle") == "German, DMY"
        assert conn.execute("SHOW DateStyle").fetchone()[0] == "German, DMY"
