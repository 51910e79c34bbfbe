"""/metrics and SHOW STATS under a running pgbench, checked against what the servers themselves count.

The pool serves a database of this test run's own (``PRIVATE_DB`` in ``tests/integration/_ops.py``) so that the
servers' ``pg_stat_database`` counters for it move only with this test's
traffic (and pypool's health checks, about one a second per server), not with
other tests sharing the cluster.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pypool import cluster
from tests.conftest import DATABASE, PASSWORD, USER
from tests.integration._ops import PRIVATE_DB, admin_rows, on_private_db, private_db  # noqa: F401 - fixture
from tests.integration._private_pg import server_env, start_for_server, start_private_server
from tests.integration._support import assert_clean_pgbench, merge, pgbench, wait_for

pytestmark = pytest.mark.integration

CLIENTS = 4
# PgCat's exporter's labels, and the "user" its Grafana dashboard filters these series on.
PGCAT_ADDRESS_LABELS = {"host", "shard", "role", "pool", "index", "database", "username", "user"}


def server_xacts(pg_cluster) -> int:
    """Transactions the three servers have counted in the test database."""
    total = 0
    for node in pg_cluster:
        out = cluster.run_sql(node, "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                    f"WHERE datname = '{PRIVATE_DB}'")
        total += int(out or 0)
    return total


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict, name: str, suffix: str = "") -> list:
    family = families[name]
    return [s for s in family.samples if s.name == name + suffix]


def total(families: dict, name: str, suffix: str = "") -> float:
    return sum(s.value for s in samples(families, name, suffix))




def show_stats_xacts(pypool) -> int:
    return sum(int(r["total_xact_count"]) for r in admin_rows(pypool, "SHOW STATS"))


@pytest.fixture
def pypool(start_pypool, private_db, pg_cluster):
    metrics_port = None
    proc = start_pypool(merge(
        {"general": {"enable_prometheus_exporter": True}},
        on_private_db(),
        # Causal reads off: the servers count only what clients sent (no commit-position lookups or
        # replay-position checks of pypool's own; those are tested in test_causal_reads.py).
        {"pools": {"postgres": {"primary_reads_enabled": False, "causal_reads": "off",
                                "query_parser_enabled": True, "query_parser_read_write_splitting": True}}}))
    metrics_port = proc.config["general"]["prometheus_exporter_port"]
    deadline = time.monotonic() + 15
    while True:
        try:
            scrape(metrics_port)
            break
        except OSError:
            assert time.monotonic() < deadline, "the exporter did not answer"
            time.sleep(0.2)
    proc.metrics_port = metrics_port
    return proc


def test_counts_agree_with_the_servers_under_pgbench(pypool, pg_cluster):
    before_servers = server_xacts(pg_cluster)
    before_show = show_stats_xacts(pypool)
    assert before_show == 0
    bench = subprocess.Popen(
        ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER, "-c", str(CLIENTS), "-j", "2",
         "-T", "6", "-b", "select-only@4", "-b", "simple-update@1", "postgres"],
        env=pypool.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # While pgbench runs: every pgbench client is a logged-in client of the pool, and
        # the exporter and SHOW STATS both see the count rise.
        def clients() -> int:
            pools = admin_rows(pypool, "SHOW POOLS")
            return sum(int(pools[0][k]) for k in ("cl_idle", "cl_active", "cl_waiting"))
        wait_for(lambda: clients() == CLIENTS and show_stats_xacts(pypool) > 0, timeout=30,
                 what=f"{CLIENTS} pgbench clients at work", interval=0.2)
        first = scrape(pypool.metrics_port)
        mid_show = show_stats_xacts(pypool)
        second = scrape(pypool.metrics_port)
        assert 0 < total(first, "pgcat_stats_total_xact_count") <= mid_show \
            <= total(second, "pgcat_stats_total_xact_count")
        out, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 0, out
    assert "number of failed transactions: 0" in out, out
    processed = int(out.split("number of transactions actually processed: ")[1].split()[0])

    # pypool's counts: SHOW STATS, SHOW STATS_TOTALS, pgcat_* and pypool_* all say the same.
    show_total = show_stats_xacts(pypool)
    families = scrape(pypool.metrics_port)
    assert total(families, "pgcat_stats_total_xact_count") == show_total
    assert total(families, "pypool_transactions", "_total") == show_total
    assert sum(int(r["xact_count"]) for r in admin_rows(pypool, "SHOW STATS_TOTALS")) == show_total
    assert abs(show_total - processed) <= 0.01 * processed, (show_total, processed)

    # The servers' own count converges on pypool's once they flush their statistics
    # (PostgreSQL 15 defers that up to ~10 s for an idle backend).
    deadline = time.monotonic() + 30
    while True:
        server_delta = server_xacts(pg_cluster) - before_servers
        if abs(server_delta - show_total) <= 0.01 * show_total or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"transactions: pgbench {processed}, pypool {show_total}, servers {server_delta}")
    assert abs(server_delta - show_total) <= 0.01 * show_total, (server_delta, show_total, processed)


def test_metric_names_labels_and_histograms(pypool, pg_cluster):
    subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER, "-c", "2", "-t", "300",
                    "-b", "select-only@4", "-b", "simple-update@1", "postgres"],
                   env=pypool.env(), check=True, capture_output=True, timeout=120)
    families = scrape(pypool.metrics_port)

    # PgCat's exporter: names and label sets as PgCat emits them.
    for name in ("pgcat_stats_total_xact_count", "pgcat_stats_total_query_count", "pgcat_stats_total_xact_time",
                 "pgcat_stats_avg_xact_count", "pgcat_servers_transaction_count", "pgcat_servers_is_banned",
                 "pgcat_databases_pool_size", "pgcat_databases_current_connections"):
        series = samples(families, name)
        assert len(series) == 3, name  # one per server
        assert all(set(s.labels) == PGCAT_ADDRESS_LABELS for s in series), name
        assert {s.labels["role"] for s in series} == {"primary", "replica"}
    for name in ("pgcat_pools_cl_idle", "pgcat_pools_sv_idle", "pgcat_pools_maxwait_us"):
        assert [s.labels for s in samples(families, name)] == [{"pool": "postgres", "user": USER}]
    by_role = {}
    for s in samples(families, "pgcat_servers_transaction_count"):
        by_role[s.labels["role"]] = by_role.get(s.labels["role"], 0) + s.value
    assert by_role["primary"] > 0 and by_role["replica"] > 0  # updates on the primary, reads on replicas
    assert {s.value for s in samples(families, "pgcat_databases_pool_size")} == {10}

    # pypool's own: histograms whose counts match the counters.
    xacts = {s.labels["port"]: s.value for s in samples(families, "pypool_transactions", "_total")}
    timed = {s.labels["port"]: s.value for s in samples(families, "pypool_transaction_duration_seconds", "_count")}
    # pgbench's 600 plus its own start-up queries (scale and partitioning of pgbench_accounts).
    assert 600 <= sum(xacts.values()) <= 605
    for port, count in xacts.items():
        assert 0 < timed[port] <= count or count == 0
    inf = [s for s in samples(families, "pypool_transaction_duration_seconds", "_bucket") if s.labels["le"] == "+Inf"]
    assert sum(s.value for s in inf) == sum(timed.values())
    assert total(families, "pypool_transaction_duration_seconds", "_sum") > 0
    checkouts = total(families, "pypool_checkouts", "_total")
    assert checkouts >= 600
    assert total(families, "pypool_checkout_wait_seconds", "_count") == checkouts

    # Routing: decisions by role, and the classification cache absorbing pgbench's repeated shapes.
    decisions = {s.labels["role"]: s.value for s in samples(families, "pypool_routing_decisions", "_total")}
    assert decisions["replica"] > 0 and decisions["primary"] > 0
    ratio = samples(families, "pypool_query_classification_cache_hit_ratio")[0].value
    hits = total(families, "pypool_query_classification_cache_hits", "_total")
    misses = total(families, "pypool_query_classification_cache_misses", "_total")
    assert misses > 0 and ratio == pytest.approx(hits / (hits + misses)) and ratio > 0.5
    assert samples(families, "pypool_server_connections")[0].labels.keys() == {
        "pool", "user", "host", "port", "role", "state"}
    assert [s.value for s in samples(families, "pypool_info")] == [1]


def test_exporter_answers_404_elsewhere(pypool):
    with pytest.raises(urllib.error.HTTPError) as not_found:
        urllib.request.urlopen(f"http://127.0.0.1:{pypool.metrics_port}/", timeout=10)
    assert not_found.value.code == 404


# A statement whose time is the server's work (300 000 rows, tens of milliseconds), so that what
# pypool adds around it (a loopback round trip and two wake-ups on a busy machine, about a
# millisecond each) stays far below the 20 % compared.
SCAN = "SELECT count(*) FROM pgbench_accounts, generate_series(1, 3) WHERE abalance + :aid > 0;"
AUTOCOMMIT_TXS, IN_TRANSACTION_TXS = 30, 10  # per pgbench client (2)


@pytest.fixture(scope="module")
def statements_server():
    """A private server with pg_stat_statements: preloading it needs a restart the shared cluster must not get."""
    server = start_private_server(settings=("shared_preload_libraries = 'pg_stat_statements'",
                                            "pg_stat_statements.track_planning = on"))
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(server.port), "-U", USER,
                    DATABASE], env=server_env(), check=True, capture_output=True, timeout=120)
    yield server
    server.stop()


def test_query_time_agrees_with_pg_stat_statements_under_pgbench(statements_server, tmp_path):
    pypool = start_for_server(tmp_path, statements_server.port, {})
    direct = psycopg.connect(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{statements_server.port}/{DATABASE}"
                             "?sslmode=disable", autocommit=True)
    try:
        direct.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        direct.execute("SELECT pg_stat_statements_reset()")
        autocommit, in_transaction = tmp_path / "scan.sql", tmp_path / "scan_in_transaction.sql"
        autocommit.write_text(f"\\set aid random(1, 100000)\n{SCAN}\n")
        # BEGIN / scan / END: the scan is a request of an open transaction, timed from its own start.
        in_transaction.write_text(f"\\set aid random(1, 100000)\nBEGIN;\n{SCAN}\nEND;\n")
        latencies = []
        # The autocommit scans as named prepared statements (Parse once per client, then Bind/Execute).
        for script, transactions, mode in ((autocommit, AUTOCOMMIT_TXS, "prepared"),
                                           (in_transaction, IN_TRANSACTION_TXS, "simple")):
            result = pgbench(pypool, "-f", str(script), "-c", "2", "-t", str(transactions), "-M", mode,
                             timeout=120)
            assert_clean_pgbench(result)
            latencies.append(float(re.search(r"latency average = ([0-9.]+) ms", result.output).group(1)))
        pg_ms, scans = direct.execute(
            "SELECT sum(total_exec_time + total_plan_time), sum(calls) FILTER (WHERE query LIKE "
            "'SELECT count(*) FROM pgbench_accounts%') FROM pg_stat_statements "
            "WHERE query NOT LIKE '%pg_stat_statements%'").fetchone()
        assert scans == 2 * (AUTOCOMMIT_TXS + IN_TRANSACTION_TXS)
        [stats] = admin_rows(pypool, "SHOW STATS")
        [totals] = admin_rows(pypool, "SHOW STATS_TOTALS")
    finally:
        direct.close()
        pypool.stop()
    pypool_us = int(stats["total_query_time"])
    server_us = float(pg_ms) * 1000
    requests = int(stats["total_query_count"])
    print(f"query time: pypool {pypool_us} us over {requests} requests, pg_stat_statements {server_us:.0f} us, "
          f"pgbench latency averages {latencies} ms")
    # Per client: its Parse (pgbench prepares with a Sync of its own), the scans, BEGIN/scan/END.
    assert requests == 2 * (1 + AUTOCOMMIT_TXS + 3 * IN_TRANSACTION_TXS), stats
    # What the servers spent on the statements is what pypool timed them at, within 20 %.
    assert abs(pypool_us - server_us) <= 0.2 * server_us, (pypool_us, server_us)
    # ... and no more than the clients waited for them (pgbench's latency includes the client's side).
    client_us = 2 * (AUTOCOMMIT_TXS * latencies[0] + IN_TRANSACTION_TXS * latencies[1]) * 1000
    assert pypool_us <= client_us, (pypool_us, client_us)
    assert int(totals["query_time"]) == pypool_us
    # PgBouncer's prepared-statement counts: a Parse per client, shared on the server, a Bind per scan.
    assert (totals["client_parse_count"], totals["bind_count"]) == (2, 2 * AUTOCOMMIT_TXS), totals
    assert 1 <= totals["server_parse_count"] <= 2, totals
    # A transaction spans its requests: BEGIN to END takes longer than the scan inside.
    assert int(stats["total_xact_time"]) >= pypool_us
