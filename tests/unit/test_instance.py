"""Multi-worker bookkeeping without processes: pool shares and cancel keys (merging: test_snapshot.py)."""

from __future__ import annotations

import pytest

from pypool.config import parse_config
from pypool.instance import Worker, cancel_key_owner, config_share, share

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


def test_workers_share_commit_positions_through_the_supervisors_table(tmp_path) -> None:
    from pypool.causal import shared
    from pypool.causal.lsn import Position
    from pypool.causal.requirement import CommitLog

    shared.create_table(shared.table_path(str(tmp_path)), 2)  # what the supervisor does before spawning
    first, second = Worker(0, 2, str(tmp_path)), Worker(1, 2, str(tmp_path))
    writes, reads = CommitLog(first.commit_slots("app")), CommitLog(second.commit_slots("app"))
    writes.end_lookup(writes.begin_lookup(), Position(1, 77))
    assert reads.read_barrier() == (Position(1, 77), ())
    first.close()
    second.close()
    assert Worker(0, 1, str(tmp_path / "missing")).commit_slots("app") is None  # logged, per-worker positions
