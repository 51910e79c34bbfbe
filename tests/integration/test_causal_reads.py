"""Read-your-writes through the read/write split (issue 13), against the real local cluster.

One replica is made to lag on purpose (``recovery_min_apply_delay``, set with
ALTER SYSTEM on that replica and always reset afterwards: other tests share the
cluster), so a read that reaches it right after a write cannot see that write
unless pypool waits for it. Every test counts stale reads over many
write-then-read pairs: with ``causal_reads = "off"`` there are some (so the
count can fail), with ``"session"``/``"global"`` there must be none.

The clients commit with ``synchronous_commit = on`` (PostgreSQL's default; the
local cluster runs with ``off``): under ``off`` a commit reaches the replicas
only when the WAL writer flushes it (``wal_writer_delay``, 200 ms), so every
read after a write would wait that long; one short test covers that case.

The tests of the modes themselves need the session to call ``pypool.causal``
(see that package's docstring); until it does they are skipped, while the
``off`` test and the position tests run now.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
import uuid

import asyncpg
import psycopg
import pytest

from pypool import causal, cluster
from pypool.causal.lsn import Position
from pypool.causal.positions import ReplicaPositions
from pypool.causal.requirement import COMMIT_POSITION_QUERY, parse_commit_row
from pypool.config import ServerAddress
from pypool.pool.health import ServerMonitor
from pypool.pool.pool import PoolSettings, ServerPool
from pypool.pool.server import Credentials
from tests.conftest import DATABASE, PASSWORD, USER, pool_overrides, wait_replicas_caught_up
from tests.integration._ops import admin_rows
from tests.integration._support import merge, metric_sum, scrape, wait_for

pytestmark = pytest.mark.integration

PAIRS = 1000
APPLY_DELAY_MS = 200
SYNC_COMMIT = "-c synchronous_commit=on"  # startup options every client sends
needs_wiring = pytest.mark.skipif(
    not causal.WIRED, reason="causal reads are not wired into the client session yet (issue 13 lands after "
                             "the session state machine); pypool.causal.WIRED turns these on")


def split(mode: str, **extra: object) -> dict:
    # round_robin: every other read reaches the lagging replica, whatever the random seed. A long
    # causal_reads_timeout: these tests count stale reads; on a loaded machine even the replica
    # that is not delayed can fall a second behind.
    return pool_overrides(**{"query_parser_enabled": True, "query_parser_read_write_splitting": True,
                             "primary_reads_enabled": False, "load_balancing_mode": "round_robin",
                             "causal_reads": mode, "causal_reads_timeout": 10_000, **extra})


def primary_dsn(nodes: list[cluster.Node]) -> str:
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{nodes[0].port}/{DATABASE}?sslmode=disable"


@contextlib.contextmanager
def apply_delay(replica: cluster.Node, delay_ms: int = APPLY_DELAY_MS):
    """``replica`` replays every commit ``delay_ms`` late, until the block ends (reset even on failure)."""
    assert cluster.run_sql(replica, "SELECT pg_is_in_recovery()") == "t", f"{replica.name} is not a replica"
    try:
        cluster.run_sql(replica, f"ALTER SYSTEM SET recovery_min_apply_delay = '{delay_ms}ms'")
        cluster.run_sql(replica, "SELECT pg_reload_conf()")
        yield
    finally:
        cluster.run_sql(replica, "ALTER SYSTEM RESET recovery_min_apply_delay")
        cluster.run_sql(replica, "SELECT pg_reload_conf()")


@pytest.fixture
def pairs_table(pg_cluster):
    """A fresh table on the primary, replayed by both replicas before any delay starts."""
    table = f"causal_{uuid.uuid4().hex[:10]}"
    leftover = cluster.run_sql(pg_cluster[2], "SHOW recovery_min_apply_delay")
    if leftover not in ("0", "0ms"):  # a run killed inside apply_delay: undo it before anything else
        with apply_delay(pg_cluster[2], 0):
            pass
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    wait_replicas_caught_up(pg_cluster)
    yield table
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture
def lagging(pg_cluster, pairs_table):
    """The pairs table, with the second replica applying commits APPLY_DELAY_MS late while the test runs."""
    with apply_delay(pg_cluster[2]):
        wait_until_delayed(pg_cluster, pairs_table)
        yield pairs_table


SHARD_DATABASES = ("causal_shard0", "causal_shard1")


def shard_dsn(nodes: list[cluster.Node], shard: int) -> str:
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{nodes[0].port}/{SHARD_DATABASES[shard]}?sslmode=disable"


@pytest.fixture(scope="module")
def shard_databases(pg_cluster):
    """Two shard databases on the local primary (the replicas replicate them), each with a ``data`` table."""
    for name in SHARD_DATABASES:
        cluster.run_sql(pg_cluster[0], f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cluster.run_sql(pg_cluster[0], f"CREATE DATABASE {name}")
    for shard in range(len(SHARD_DATABASES)):
        with psycopg.connect(shard_dsn(pg_cluster, shard), autocommit=True) as conn:
            conn.execute("CREATE TABLE data (id bigint PRIMARY KEY)")
    yield
    for name in SHARD_DATABASES:
        cluster.run_sql(pg_cluster[0], f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def lagging_shards(pg_cluster, shard_databases, pairs_table):
    """Empty ``data`` tables on both shards, replayed everywhere, then the second replica lagging."""
    for shard in range(len(SHARD_DATABASES)):
        with psycopg.connect(shard_dsn(pg_cluster, shard), autocommit=True) as conn:
            conn.execute("TRUNCATE data")
    wait_replicas_caught_up(pg_cluster)
    with apply_delay(pg_cluster[2]):
        wait_until_delayed(pg_cluster, pairs_table)
        yield


def wait_until_delayed(nodes: list[cluster.Node], table: str, attempts: int = 50) -> None:
    """The reload reached the replica's startup process: a fresh commit is not visible there at once."""
    replica = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{nodes[2].port}/{DATABASE}?sslmode=disable"
    with psycopg.connect(primary_dsn(nodes), autocommit=True) as primary, \
            psycopg.connect(replica, autocommit=True) as standby:
        for n in range(-attempts, 0):
            primary.execute(f"INSERT INTO {table} VALUES ({n})")
            if standby.execute(f"SELECT count(*) FROM {table} WHERE id = {n}").fetchone()[0] == 0:
                return
            time.sleep(0.05)
    raise AssertionError(f"{nodes[2].name} still replays at once after recovery_min_apply_delay was set")


# ---------------------------------------------------------------- the clients


def psql_stale_reads(pypool, table: str, pairs: int = PAIRS, options: str = SYNC_COMMIT) -> int:
    """psql's simple protocol, autocommit: one INSERT then one SELECT per pair, all in one session."""
    script = "".join(f"INSERT INTO {table} VALUES ({n});\nSELECT {n}, count(*) FROM {table} WHERE id = {n};\n"
                     for n in range(pairs))
    proc = subprocess.run(["psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER,
                           "-d", DATABASE], input=script, env={**pypool.env(), "PGOPTIONS": options},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = {line for line in proc.stdout.splitlines()}
    return sum(1 for n in range(pairs) if f"{n}|1" not in seen)


def psycopg_stale_reads(dsn: str, table: str, pairs: int = PAIRS, offset: int = 0) -> int:
    """psycopg 3, autocommit, extended protocol with parameters (prepared after 5 uses: the default)."""
    stale = 0
    with psycopg.connect(dsn, autocommit=True, options=SYNC_COMMIT) as conn:
        for n in range(offset, offset + pairs):
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (n,))
            stale += conn.execute(f"SELECT count(*) FROM {table} WHERE id = %s", (n,)).fetchone()[0] == 0
    return stale


async def asyncpg_stale_reads(dsn: str, table: str, pairs: int = PAIRS, offset: int = 0) -> int:
    """asyncpg with its statement cache (named prepared statements reused for every pair)."""
    stale = 0
    conn = await asyncpg.connect(dsn, server_settings={"options": SYNC_COMMIT})
    try:
        for n in range(offset, offset + pairs):
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", n)
            stale += await conn.fetchval(f"SELECT count(*) FROM {table} WHERE id = $1", n) == 0
    finally:
        await conn.close()
    return stale


def two_connection_stale_reads(dsn: str, table: str, pairs: int = PAIRS, connections: int = 4) -> int:
    """Writes on some connections, each followed by a read of that row on another connection."""
    stale = 0
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(psycopg.connect(dsn, autocommit=True, options=SYNC_COMMIT))
                   for _ in range(connections)]
        readers = [stack.enter_context(psycopg.connect(dsn, autocommit=True, options=SYNC_COMMIT))
                   for _ in range(connections)]
        for n in range(pairs):
            writers[n % connections].execute(f"INSERT INTO {table} (id) VALUES (%s)", (n,))  # (id): a sharding key
            row = readers[(n + 1) % connections].execute(f"SELECT count(*) FROM {table} WHERE id = %s", (n,))
            stale += row.fetchone()[0] == 0
    return stale


# ------------------------------------------------------------------ the tests


def test_off_reads_stale_rows_from_the_lagging_replica(start_pypool, lagging):
    """The baseline that proves the counting can fail: without causal reads, reads miss writes."""
    pypool = start_pypool(split("off"))
    stale = psql_stale_reads(pypool, lagging)
    print(f"causal_reads = off: {stale} of {PAIRS} reads stale")
    # Every other read goes to the replica 200 ms behind.
    assert stale >= PAIRS // 4, f"only {stale} of {PAIRS} reads were stale with causal_reads = off"


@needs_wiring
def test_session_psql_simple_protocol_reads_its_writes(start_pypool, lagging):
    pypool = start_pypool(split("session"))
    assert psql_stale_reads(pypool, lagging) == 0


@needs_wiring
def test_session_waits_for_the_wal_writer_under_asynchronous_commit(start_pypool, lagging):
    """synchronous_commit = off: the commit is replicated only once flushed; the read still sees it."""
    pypool = start_pypool(split("session"))
    assert psql_stale_reads(pypool, lagging, pairs=20, options="-c synchronous_commit=off") == 0


@needs_wiring
def test_session_psycopg_reads_its_writes(start_pypool, lagging):
    pypool = start_pypool(split("session"))
    assert psycopg_stale_reads(pypool.dsn(), lagging) == 0


@needs_wiring
def test_session_asyncpg_statement_cache_reads_its_writes(start_pypool, lagging):
    pypool = start_pypool(split("session"))
    assert asyncio.run(asyncpg_stale_reads(pypool.dsn(), lagging)) == 0


@needs_wiring
def test_session_is_per_client_another_connection_may_read_stale(start_pypool, lagging):
    """``session`` promises nothing across connections (that is ``global``): the pairs show it."""
    pypool = start_pypool(split("session"))
    assert two_connection_stale_reads(pypool.dsn(), lagging) > 0


def causal_reads_by_outcome(pypool) -> dict[str, float]:
    samples = wait_for(lambda: _scrape_or_none(pypool), what="the metrics exporter")
    return {outcome: metric_sum(samples, "pypool_causal_reads_total", outcome=outcome)
            for outcome in ("replica_at_once", "replica_after_wait", "primary", "timed_out")}


def _scrape_or_none(pypool) -> dict | None:
    try:
        return scrape(pypool)
    except OSError:
        return None


@needs_wiring
@pytest.mark.parametrize("workers", [1, 2])
def test_global_reads_see_writes_of_other_connections(start_pypool, lagging, workers):
    overrides = split("global")
    overrides["general"] = {"workers": workers, "enable_prometheus_exporter": True}
    pypool = start_pypool(overrides)
    assert two_connection_stale_reads(pypool.dsn(), lagging) == 0
    # Every read followed a write: each is counted, whichever worker served it (plus the requests
    # that prepare the SELECT: psycopg prepares a statement at its fifth use).
    outcomes = causal_reads_by_outcome(pypool)
    assert PAIRS <= sum(outcomes.values()) <= PAIRS + 8 and outcomes["timed_out"] == 0, outcomes


@needs_wiring
def test_show_clients_and_metrics_tell_what_reads_waited_for(start_pypool, lagging):
    pypool = start_pypool(merge(split("session"), {"general": {"enable_prometheus_exporter": True}}))
    pairs = 50
    with psycopg.connect(pypool.dsn(), autocommit=True, options=SYNC_COMMIT, application_name="writer") as conn:
        assert [r["causal_required"] for r in admin_rows(pypool, "SHOW CLIENTS")
                if r["application_name"] == "writer"] == [""]  # no write yet: nothing to wait for
        for n in range(pairs):
            conn.execute(f"INSERT INTO {lagging} VALUES (%s)", (n,))
            assert conn.execute(f"SELECT count(*) FROM {lagging} WHERE id = %s", (n,)).fetchone()[0] == 1
        required = [r["causal_required"] for r in admin_rows(pypool, "SHOW CLIENTS")
                    if r["application_name"] == "writer"]
        committed = parse_commit_row([str(v) for v in conn.execute(COMMIT_POSITION_QUERY).fetchone()])
    assert len(required) == 1 and required[0].endswith(f"(timeline {committed.timeline})"), required
    outcomes = causal_reads_by_outcome(pypool)
    assert pairs <= sum(outcomes.values()) <= pairs + 1 and outcomes["timed_out"] == 0, outcomes
    samples = scrape(pypool)
    waited = metric_sum(samples, "pypool_causal_read_wait_seconds_count")
    assert waited >= outcomes["replica_after_wait"]


@needs_wiring
def test_read_only_transactions_role_hints_and_server_role_see_the_writes(start_pypool, lagging):
    """Reads routed to replicas however they got there: BEGIN READ ONLY, a hint, SET SERVER ROLE."""
    pypool = start_pypool(split("session"))
    stale = 0
    with psycopg.connect(pypool.dsn(), autocommit=True, options=SYNC_COMMIT) as conn:
        for n in range(0, 300, 3):
            conn.execute(f"INSERT INTO {lagging} VALUES (%s)", (n,))
            conn.execute("BEGIN READ ONLY")
            stale += conn.execute(f"SELECT count(*) FROM {lagging} WHERE id = %s", (n,)).fetchone()[0] == 0
            conn.execute("COMMIT")
            conn.execute(f"INSERT INTO {lagging} VALUES (%s)", (n + 1,))
            stale += conn.execute(f"/* pypool: role=replica */ SELECT count(*) FROM {lagging} WHERE id = %s",
                                  (n + 1,)).fetchone()[0] == 0
        conn.execute("SET SERVER ROLE TO 'replica'")
        for n in range(300, 400):
            conn.execute(f"/* pypool: role=primary */ INSERT INTO {lagging} VALUES (%s)", (n,))
            stale += conn.execute(f"SELECT count(*) FROM {lagging} WHERE id = %s", (n,)).fetchone()[0] == 0
    assert stale == 0


@needs_wiring
def test_session_pool_reads_its_writes(start_pypool, lagging):
    """A session pool keeps a client on one server: nothing to wait for, and nothing breaks."""
    pypool = start_pypool(split("session", pool_mode="session"))
    assert psycopg_stale_reads(pypool.dsn(), lagging, pairs=200) == 0


@needs_wiring
def test_timeout_without_primary_reads_fails_naming_the_lag(start_pypool, lagging, pg_cluster):
    """Only the lagging replica serves reads: past causal_reads_timeout the read fails (57014)."""
    overrides = split("session", causal_reads_timeout=50)
    overrides["pools"][DATABASE]["shards"] = {"0": {"database": DATABASE, "servers": [
        ["127.0.0.1", pg_cluster[0].port, "primary"], ["127.0.0.1", pg_cluster[2].port, "replica"]]}}
    pypool = start_pypool(overrides)
    with psycopg.connect(pypool.dsn(), autocommit=True, options=SYNC_COMMIT) as conn:
        conn.execute(f"INSERT INTO {lagging} VALUES (1)")
        with pytest.raises(psycopg.errors.QueryCanceled) as refused:
            conn.execute(f"SELECT count(*) FROM {lagging} WHERE id = 1")
        assert refused.value.sqlstate == "57014"
        # The message names the replica and how far behind it is (the monitor asked it meanwhile).
        assert re.search(rf"causal_reads_timeout = 50 ms \(127\.0\.0\.1:{pg_cluster[2].port} \S+ (?:bytes|kB|MB) "
                         rf"behind at [0-9A-F]+/[0-9A-F]+\)", str(refused.value)), str(refused.value)
        conn.execute(f"INSERT INTO {lagging} VALUES (2)")  # the session goes on


# ------------------------------------------------- positions from the monitor


def test_monitor_reports_positions_and_a_delayed_replica_is_seen_behind(pg_cluster, lagging):
    """The health query feeds the position table: the primary's timeline, each replica's replay."""
    async def go() -> tuple[ReplicaPositions, list[ServerPool], Position | None, Position | None]:
        credentials = Credentials(USER, PASSWORD, DATABASE)
        settings = PoolSettings(pool_size=1, min_pool_size=0, connect_timeout=5.0, checkout_timeout=5.0,
                                idle_timeout=0, server_lifetime=0)
        pools = [ServerPool(ServerAddress("127.0.0.1", node.port, role), credentials, settings)
                 for node, role in zip(pg_cluster, ("primary", "replica", "replica"))]
        positions: ReplicaPositions[ServerPool] = ReplicaPositions()
        monitors = [ServerMonitor(sp, 5.0, lambda *_: None, positions=positions) for sp in pools]
        try:
            for monitor in monitors:
                assert (await monitor.check()).ok
            with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
                conn.execute(f"INSERT INTO {lagging} VALUES (424242)")
                row = conn.execute(COMMIT_POSITION_QUERY).fetchone()
            committed = parse_commit_row([str(value) for value in row])
            behind = await monitors[2].check_position()  # 200 ms from replaying that commit
            for monitor in monitors:
                await monitor.check()
            return positions, pools, committed, behind
        finally:
            for monitor in monitors:
                await monitor.stop()

    positions, pools, committed, behind = asyncio.run(go())
    assert positions.primary_timeline == committed.timeline
    assert positions.position(pools[0]) is None  # the primary is not a replica to wait for
    assert behind is not None and behind.timeline == committed.timeline and behind.lsn < committed.lsn
    assert all(positions.position(sp).timeline == committed.timeline for sp in pools[1:])


# ------------------------------------------------------------- sharded pools
# Each shard has its own primary, hence its own WAL: a client's write on one shard makes only
# its later reads on that shard wait. Here both shards are databases of the local cluster, so
# every shard has both replicas, one of them lagging.

SHARD_PAIRS = 200


def sharded_split(nodes: list[cluster.Node], mode: str, **extra: object) -> dict:
    overrides = split(mode, **extra)
    servers = [["127.0.0.1", nodes[0].port, "primary"], ["127.0.0.1", nodes[1].port, "replica"],
               ["127.0.0.1", nodes[2].port, "replica"]]
    overrides["pools"][DATABASE]["shards"] = {str(shard): {"database": name, "servers": servers}
                                              for shard, name in enumerate(SHARD_DATABASES)}
    return overrides


def shard_rows(nodes: list[cluster.Node]) -> list[int]:
    """How many rows each shard database holds (on the primary)."""
    counts = []
    for shard in range(len(SHARD_DATABASES)):
        with psycopg.connect(shard_dsn(nodes, shard), autocommit=True) as conn:
            counts.append(conn.execute("SELECT count(*) FROM data").fetchone()[0])
    return counts


def assert_stale_reads(mode: str, stale: int, pairs: int) -> None:
    """``off`` reads stale rows (so the count can fail); the other modes never do."""
    if mode == "off":
        assert stale >= pairs // 4, f"only {stale} of {pairs} reads were stale with causal_reads = off"
    else:
        assert stale == 0, f"{stale} of {pairs} reads were stale with causal_reads = {mode}"


def psql_lines(pypool, script: str) -> list[str]:
    proc = subprocess.run(["psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER,
                           "-d", DATABASE], input=script, env={**pypool.env(), "PGOPTIONS": SYNC_COMMIT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ERROR" not in proc.stderr, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("mode", ["off", "session"])
def test_sharded_reads_by_key_see_the_writes_on_their_shard(start_pypool, pg_cluster, lagging_shards, mode):
    """psql, the automatic sharding key: each pair's write and read run on the row's shard."""
    pypool = start_pypool(sharded_split(pg_cluster, mode, automatic_sharding_key="data.id"))
    lines = psql_lines(pypool, "".join(f"INSERT INTO data (id) VALUES ({n});\nSELECT {n}, count(*) FROM data "
                                       f"WHERE id = {n};\n" for n in range(SHARD_PAIRS)))
    stale = sum(1 for n in range(SHARD_PAIRS) if f"{n}|1" not in lines)
    assert all(rows > SHARD_PAIRS // 4 for rows in shard_rows(pg_cluster))  # both shards took writes
    assert_stale_reads(mode, stale, SHARD_PAIRS)


@pytest.mark.parametrize("mode", ["off", "session"])
def test_sharded_asyncpg_without_statement_cache_sees_its_writes(start_pypool, pg_cluster, lagging_shards, mode):
    """asyncpg's unnamed statements (Parse/Describe/Flush, then Bind): pypool runs them aside on the
    key's shard, the write's commit position and the read's wait included."""
    pypool = start_pypool(sharded_split(pg_cluster, mode, automatic_sharding_key="data.id"))

    async def pairs() -> int:
        stale = 0
        conn = await asyncpg.connect(pypool.dsn(), statement_cache_size=0, server_settings={"options": SYNC_COMMIT})
        try:
            for n in range(SHARD_PAIRS):
                await conn.execute("INSERT INTO data (id) VALUES ($1)", n)
                stale += await conn.fetchval("SELECT count(*) FROM data WHERE id = $1", n) == 0
        finally:
            await conn.close()
        return stale

    stale = asyncio.run(pairs())
    assert_stale_reads(mode, stale, SHARD_PAIRS)


@pytest.mark.parametrize("mode", ["off", "session"])
def test_sharded_fanned_out_reads_see_the_writes_on_every_shard(start_pypool, pg_cluster, lagging_shards, mode):
    """A keyless count runs on every shard (default_shard = "all"): each shard's part waits for that shard."""
    pypool = start_pypool(sharded_split(pg_cluster, mode, automatic_sharding_key="data.id", default_shard="all"))
    pairs = SHARD_PAIRS // 2
    lines = psql_lines(pypool, "".join(f"INSERT INTO data (id) VALUES ({n});\nSELECT count(*) FROM data;\n"
                                       for n in range(pairs)))
    stale = sum(1 for n, line in enumerate(lines) if line != str(n + 1))
    assert len(lines) == pairs
    assert_stale_reads(mode, stale, pairs)


def test_sharded_a_write_on_one_shard_makes_only_that_shards_reads_wait(start_pypool, pg_cluster, lagging_shards):
    """Reads on shard 1 after writes on shard 0 have nothing to see: none is counted as a causal read."""
    overrides = sharded_split(pg_cluster, "session")
    overrides["general"] = {"enable_prometheus_exporter": True}
    pypool = start_pypool(overrides)
    with psycopg.connect(pypool.dsn(), autocommit=True, options=SYNC_COMMIT, application_name="writer") as conn:
        simple = psycopg.ClientCursor(conn)
        simple.execute("SET SHARD TO '0'")
        for n in range(20):
            conn.execute("INSERT INTO data VALUES (%s)", (n,))
        simple.execute("SET SHARD TO '1'")
        for n in range(20):
            assert conn.execute("SELECT count(*) FROM data WHERE id = %s", (n,)).fetchone() == (0,)
        on_shard_1 = causal_reads_by_outcome(pypool)
        required = [r["causal_required"] for r in admin_rows(pypool, "SHOW CLIENTS")
                    if r["application_name"] == "writer"]
        simple.execute("SET SHARD TO '0'")
        assert conn.execute("SELECT count(*) FROM data WHERE id = 19").fetchone() == (1,)
        on_shard_0 = causal_reads_by_outcome(pypool)
    assert sum(on_shard_1.values()) == 0, on_shard_1
    assert sum(on_shard_0.values()) == 1 and on_shard_0["timed_out"] == 0, on_shard_0
    assert len(required) == 1 and required[0].startswith("shard 0: ") and "shard 1" not in required[0], required


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_global_reads_see_other_connections_writes_per_shard(start_pypool, pg_cluster, lagging_shards,
                                                                      workers):
    """``global``: one commit log per shard, shared by the worker processes."""
    overrides = sharded_split(pg_cluster, "global", automatic_sharding_key="data.id")
    overrides["general"] = {"workers": workers}
    pypool = start_pypool(overrides)
    assert two_connection_stale_reads(pypool.dsn(), "data", pairs=SHARD_PAIRS) == 0
    assert all(rows > SHARD_PAIRS // 4 for rows in shard_rows(pg_cluster))
