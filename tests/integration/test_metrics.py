"""/metrics and SHOW STATS under a running pgbench, checked against what the servers themselves count.

The pool serves a database of this test run's own (``PRIVATE_DB`` in ``tests/integration/_ops.py``) so that the
servers' ``pg_stat_database`` counters for it move only with this test's
traffic (and pypool's health checks, about one a second per server), not with
other tests sharing the cluster.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pypool import cluster
from tests.conftest import USER
from tests.integration._ops import PRIVATE_DB, admin_rows, on_private_db, private_db  # noqa: F401 - fixture
from tests.integration._support import merge, wait_for

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
