"""Statistics snapshots: plain data that survives JSON and merges across processes.

Several worker processes each take a snapshot; SHOW and /metrics render the
merge. These tests build snapshots as two workers would report them and check
what an operator would then read.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client.core import Metric

from pypool.admin.tables import clients_table, databases_table, lists_table, pools_table, stats_table, stats_totals_table
from pypool.metrics import render_families
from pypool.snapshot import AddressStats, Averager, ClientRow, PoolStatsRow, RouterStats, ServerRow, Snapshot, merge


def address(port: int, role: str, index: int, xacts: int, states: dict[str, int]) -> AddressStats:
    a = AddressStats(pool="app", user="alice", host="10.0.0.1", port=port, database="appdb", role=role, index=index,
                     name=f"app_shard_0_{role}" if role == "primary" else f"app_shard_0_replica_{index - 1}",
                     pool_mode="transaction", pool_size=5, min_pool_size=0)
    a.counters.update(xact_count=xacts, query_count=2 * xacts, checkouts=xacts, xact_time=xacts * 0.001,
                      wait_time=0.5, bytes_sent=100 * xacts, bytes_received=200 * xacts,
                      healthchecks=3, healthcheck_failures=1)
    a.states.update(states)
    a.current_connections = sum(states.values())
    a.xact_hist[3] = xacts
    a.wait_hist[0] = xacts
    return a


def worker(pid_base: int, primary_xacts: int, replica_xacts: int, waiting: int, maxwait: float) -> Snapshot:
    return Snapshot(
        taken_at=1000.0 + pid_base,
        addresses=[address(5432, "primary", 0, primary_xacts, {"active": 1, "idle": 2}),
                   address(5433, "replica", 1, replica_xacts, {"idle": 3})],
        pools=[PoolStatsRow("app", "alice", "transaction", clients={"active": 1, "idle": 4, "waiting": waiting},
                            cancel_requests=2, maxwait=maxwait)],
        clients=[ClientRow(pid_base + i, "app", "alice", "web", "idle", False, 10, 20, 0, 5.0, 0.0, 900.0 + i)
                 for i in range(4)],
        servers=[ServerRow(pid_base + 100, "app", "alice", "app_shard_0_primary", "10.0.0.1", 5432, "web", "active",
                           7, 7, 1, 2, 3.0)],
        routers=[RouterStats("app", cache_hits=90, cache_misses=10, cache_entries=10,
                             decisions={"primary": primary_xacts, "replica": replica_xacts})],
        reloads_ok=1,
    )


def table_dicts(table) -> list[dict]:
    columns, rows = table
    names = [c for c, _ in columns]
    return [dict(zip(names, row)) for row in rows]


def sample(families: list[Metric], name: str, **labels: str) -> float:
    for family in families:
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name} {labels}")


def test_snapshot_survives_json():
    snap = worker(1000, 10, 30, 1, 0.25)
    again = Snapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert again == snap


def test_merged_workers_add_up_in_show_and_metrics():
    merged = merge([worker(1000, 10, 30, 1, 0.25), worker(2000, 5, 50, 2, 1.5)])

    stats = table_dicts(stats_table(merged, Averager()))
    assert [(r["instance"], r["total_xact_count"], r["total_query_count"]) for r in stats] == [
        ("app_shard_0_primary", 15, 30), ("app_shard_0_replica_0", 80, 160)]
    assert stats[0]["total_xact_time"] == 15_000  # microseconds
    totals = table_dicts(stats_totals_table(merged))
    assert totals == [{"database": "app", "server_assignment_count": 95, "xact_count": 95, "query_count": 190,
                       "bytes_received": 9500, "bytes_sent": 19000, "xact_time": 95_000, "query_time": 0,
                       "wait_time": 2_000_000, "client_parse_count": 0, "server_parse_count": 0, "bind_count": 0}]

    pools = table_dicts(pools_table(merged))
    assert len(pools) == 1
    p = pools[0]
    assert (p["cl_active"], p["cl_idle"], p["cl_waiting"]) == (2, 8, 3)
    assert (p["sv_active"], p["sv_idle"]) == (2, 10)
    assert (p["maxwait"], p["maxwait_us"]) == (1, 500_000)  # the longest wait of either worker

    databases = table_dicts(databases_table(merged))
    assert [d["current_connections"] for d in databases] == [6, 6]
    # Each worker runs a share of pool_size: the instance runs the sum.
    assert [d["pool_size"] for d in databases] == [10, 10]
    assert len(table_dicts(clients_table(merged))) == 8
    lists = dict(lists_table(merged)[1])
    assert (lists["free_clients"], lists["free_servers"], lists["used_servers"]) == (8, 10, 2)

    families = render_families(merged, {})
    assert sample(families, "pgcat_stats_total_xact_count", role="replica") == 80
    assert sample(families, "pgcat_servers_transaction_count", role="primary") == 15
    assert sample(families, "pypool_transactions_total", port="5433") == 80
    assert sample(families, "pypool_transaction_duration_seconds_count", port="5433") == 80
    assert sample(families, "pypool_routing_decisions_total", role="replica") == 80
    assert sample(families, "pypool_query_classification_cache_hit_ratio") == 0.9
    assert sample(families, "pypool_cancel_requests_total") == 4
    # healthcheck_delay checks of both workers add up, per server.
    assert sample(families, "pypool_server_healthchecks_total", port="5433") == 6
    assert sample(families, "pypool_server_healthcheck_failures_total", port="5433") == 2


def test_averages_follow_merged_snapshots():
    averager = Averager()
    averager.roll(merge([worker(1000, 10, 30, 0, 0), worker(2000, 5, 50, 0, 0)]), now=100.0)
    averager.roll(merge([worker(1000, 40, 30, 0, 0), worker(2000, 35, 50, 0, 0)]), now=110.0)
    primary = averager.get(("app", "alice", 0, "10.0.0.1", 5432, 0))
    assert primary["xact_count"] == 6.0  # (75 - 15) transactions in 10 s
    assert primary["xact_time"] == pytest.approx(1000.0)  # 1 ms each, in microseconds
    assert averager.get(("app", "alice", 0, "10.0.0.1", 5433, 1))["xact_count"] == 0.0
