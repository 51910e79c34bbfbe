"""Multi-worker bookkeeping without processes: pool shares, cancel keys, merging SHOW rows and metrics."""

from __future__ import annotations

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pypool.config import parse_config
from pypool.instance import Worker, cancel_key_owner, config_share, share
from pypool.instance_stats import ResultSet, decode_result_set, families_to_json, merge_families, merge_results
from pypool.protocol import messages as m

CONFIG = """
[general]
admin_username = "a"
admin_password = "b"
workers = 3

[pools.app.users.0]
username = "alice"
password = "secret"
pool_size = 10
min_pool_size = 4

[pools.app.shards.0]
database = "appdb"
servers = [["db1", 5432, "primary"]]
"""


@pytest.mark.parametrize("total, count", [(10, 3), (3, 3), (7, 2), (0, 4), (64, 64), (5, 1)])
def test_shares_add_up_and_differ_by_at_most_one(total: int, count: int) -> None:
    parts = [share(total, i, count) for i in range(count)]
    assert sum(parts) == total
    assert max(parts) - min(parts) <= 1


def test_each_worker_runs_its_share_of_pool_size_and_min_pool_size() -> None:
    config = parse_config(CONFIG)
    users = [config_share(config, i, 3).pools["app"].users["alice"] for i in range(3)]
    assert [u.pool_size for u in users] == [4, 3, 3]
    assert [u.min_pool_size for u in users] == [2, 1, 1]
    assert all(u.min_pool_size <= u.pool_size for u in users)
    assert config.pools["app"].users["alice"].pool_size == 10  # the file's config is untouched


def test_cancel_keys_name_their_worker() -> None:
    for index in (0, 1, 5):
        worker = Worker(index, 6, "/nonexistent")
        keys = {worker.cancel_key() for _ in range(200)}
        assert len(keys) == 200
        assert {cancel_key_owner(pid) for pid, _ in keys} == {index}
        assert all(0 <= pid < 2**31 for pid, _ in keys)  # BackendKeyData's process id stays a positive int32
    assert not Worker(2, 6, "/nonexistent").forward_cancel(2 | 64, 1)  # its own key: cancelled here


def _pools(cl_active: int, sv_idle: int, maxwait: int, maxwait_us: int) -> ResultSet:
    data = m.result_set([("database", 25), ("user", 25), ("pool_mode", 25), ("cl_active", 1700), ("sv_idle", 1700),
                         ("maxwait", 1700), ("maxwait_us", 1700)],
                        [["app", "alice", "transaction", cl_active, sv_idle, maxwait, maxwait_us]], tag="SHOW")
    result = decode_result_set(data)
    assert result is not None
    return result


def test_show_pools_adds_counts_and_keeps_the_longest_wait() -> None:
    merged = merge_results("POOLS", [_pools(3, 2, 0, 900_000), _pools(4, 1, 1, 200_000)])
    assert merged.rows == [["app", "alice", "transaction", 7, 3, 1, 200_000]]
    assert decode_result_set(merged.encode()).rows == merged.rows  # survives the wire both ways


def test_show_stats_averages_are_weighted_by_transactions() -> None:
    columns = [("database", 25), ("xact_count", 1700), ("query_count", 1700), ("server_assignment_count", 1700),
               ("xact_time", 1700), ("query_time", 1700), ("wait_time", 1700)]
    busy = ResultSet(columns, [["app", 300, 300, 300, 100, 0, 10]], "SHOW")
    quiet = ResultSet(columns, [["app", 100, 100, 100, 500, 0, 50]], "SHOW")
    row = merge_results("STATS_AVERAGES", [busy, quiet]).rows[0]
    assert row[1] == 400  # rates add up
    assert row[4] == 200  # (300 * 100 + 100 * 500) / 400
    assert row[6] == 20


def test_show_clients_lists_every_workers_clients_and_lists_counts_once() -> None:
    clients = [ResultSet([("client_id", 25)], [["0x01"]], "SHOW"), ResultSet([("client_id", 25)], [["0x02"]], "SHOW")]
    assert merge_results("CLIENTS", clients).rows == [["0x01"], ["0x02"]]
    lists = [ResultSet([("list", 25), ("items", 23)], [["pools", 1], ["used_clients", 2]], "SHOW"),
             ResultSet([("list", 25), ("items", 23)], [["pools", 1], ["used_clients", 5]], "SHOW")]
    assert merge_results("LISTS", lists).rows == [["pools", 1], ["used_clients", 7]]
    assert merge_results("VERSION", [ResultSet([("version", 25)], [["pypool"]], "SHOW")]).rows == [["pypool"]]


def _worker_families(xacts: int, pool_size: int, banned: int, hits: int, misses: int) -> list[dict]:
    labels = ["pool", "host"]
    fams = []
    counter = CounterMetricFamily("pypool_transactions", "t", labels=labels)
    counter.add_metric(["app", "db1"], xacts)
    size = GaugeMetricFamily("pypool_server_pool_size", "s", labels=labels)
    size.add_metric(["app", "db1"], pool_size)
    ban = GaugeMetricFamily("pypool_server_banned", "b", labels=labels)
    ban.add_metric(["app", "db1"], banned)
    for name, value in (("hits", hits), ("misses", misses)):
        family = CounterMetricFamily(f"pypool_query_classification_cache_{name}", name, labels=["pool"])
        family.add_metric(["app"], value)
        fams.append(family)
    ratio = GaugeMetricFamily("pypool_query_classification_cache_hit_ratio", "r", labels=["pool"])
    ratio.add_metric(["app"], hits / (hits + misses))
    fams.extend([counter, size, ban, ratio])
    return families_to_json(fams)


def test_metrics_add_counts_and_shares_but_not_flags() -> None:
    merged = {f["name"]: f for f in merge_families([_worker_families(10, 4, 0, 9, 1),
                                                    _worker_families(30, 3, 1, 1, 9)])}

    def value(name: str) -> float:
        (sample,) = merged[name]["samples"]
        return sample[2]

    assert value("pypool_transactions") == 40
    assert merged["pypool_transactions"]["samples"][0][0] == "pypool_transactions_total"
    assert value("pypool_server_pool_size") == 7
    assert value("pypool_server_banned") == 1
    assert value("pypool_query_classification_cache_hit_ratio") == pytest.approx(0.5)
