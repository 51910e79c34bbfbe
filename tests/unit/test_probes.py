"""Readiness and liveness verdicts (pypool.probes), the autoreload key and the file watcher: no sockets."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest

from pypool import probes
from pypool.autoreload import ConfigWatcher
from pypool.config import ConfigError, parse_config
from pypool.probes import ServerView, Verdict, combine_workers, readiness
from tests.unit._minimal_config import MINIMAL

PRIMARY = ServerView("app", "u", "primary", "10.0.0.1", 5432, True)
REPLICA = ServerView("app", "u", "replica", "10.0.0.2", 5432, True)


def down(view: ServerView) -> ServerView:
    return ServerView(view.pool, view.user, view.role, view.host, view.port, False)


def test_ready_when_accepting_and_every_primary_answers() -> None:
    assert readiness(True, [PRIMARY, REPLICA]) == Verdict(True, "ready")


def test_draining_is_not_ready_whatever_the_servers() -> None:
    verdict = readiness(False, [PRIMARY, REPLICA])
    assert verdict == Verdict(False, "shutting down: send new clients elsewhere")


def test_primary_down_with_a_replica_is_ready_for_reads_and_says_so() -> None:
    verdict = readiness(True, [down(PRIMARY), REPLICA])
    assert verdict.ok
    assert verdict.reason == "ready; pool app (user u): primary 10.0.0.1:5432 unreachable, reads only"


def test_nothing_reachable_in_one_pool_is_not_ready_and_names_it() -> None:
    other = ServerView("other", "u", "primary", "10.0.0.9", 5432, True)
    verdict = readiness(True, [down(PRIMARY), down(REPLICA), other])
    assert not verdict.ok
    assert verdict.reason == "pool app (user u): primary 10.0.0.1:5432 unreachable and no replica reachable"


def test_each_shard_of_a_sharded_pool_needs_a_reachable_server() -> None:
    # The same servers serve shard 0 and shard 1 (databases); shard 1's are down.
    shard1 = [ServerView(v.pool, v.user, v.role, v.host, v.port, False, shard=1) for v in (PRIMARY, REPLICA)]
    verdict = readiness(True, [PRIMARY, REPLICA, *shard1])
    assert verdict == Verdict(False, "pool app shard 1 (user u): primary 10.0.0.1:5432 unreachable and no "
                                     "replica reachable")
    assert readiness(True, [PRIMARY, REPLICA, shard1[0], ServerView("app", "u", "replica", "10.0.0.2", 5432, True,
                                                                    shard=1)]).ok


def test_replica_only_pool_needs_a_replica() -> None:
    assert readiness(True, [REPLICA]).ok
    verdict = readiness(True, [down(REPLICA)])
    assert not verdict.ok and "no primary and no replica reachable" in verdict.reason


def test_no_pools_is_ready() -> None:
    assert readiness(True, []).ok


def test_instance_is_ready_with_one_ready_worker_and_not_while_stopping() -> None:
    ok, bad = Verdict(True, "ready"), Verdict(False, "pool app (user u): primary x:1 unreachable and no replica")
    assert combine_workers(False, [ok, None, bad]) == Verdict(True, "ready (1/3 workers ready)")
    assert combine_workers(False, [bad, bad]) == Verdict(False, bad.reason)
    assert combine_workers(False, [None, None]) == Verdict(False, "no worker answered")
    assert not combine_workers(True, [ok, ok]).ok


GENERAL = MINIMAL.replace("{general}", "{}")


@pytest.mark.parametrize("line, expected", [("", None), ("autoreload = 2500", 2500),
                                            ("autoreload = true", 15000), ("autoreload = false", None)])
def test_autoreload_is_milliseconds_or_pgcats_old_boolean(line: str, expected: int | None) -> None:
    config = parse_config(GENERAL.format(line), "f.toml")
    assert config.general.autoreload == expected
    assert not [w for w in config.warnings if "autoreload" in w]


@pytest.mark.parametrize("value, shown", [("0", "0"), ('"15s"', '"15s" (a string)'), ("-5", "-5")])
def test_autoreload_rejects_other_values_naming_file_and_key(value: str, shown: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GENERAL.format(f"autoreload = {value}"), "f.toml")
    assert str(err.value) == f"f.toml: general.autoreload: expected milliseconds (a positive integer), " \
                             f"or true/false, got {shown}"


def test_watcher_reports_each_change_of_content_once(tmp_path) -> None:
    path = tmp_path / "pgcat.toml"
    path.write_text("a = 1\n")
    watcher = ConfigWatcher(str(path))
    assert not watcher.changed()
    path.write_text("a = 2\n")
    assert watcher.changed()
    assert not watcher.changed()
    path.unlink()  # mid-replacement: no change reported, the running config stays
    assert not watcher.changed()
    path.write_text("a = 2\n")
    assert not watcher.changed()


def test_watcher_follows_a_configmap_style_symlink_swap(tmp_path) -> None:
    """The kubelet updates a ConfigMap volume by pointing a symlink at a new directory."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "pgcat.toml").write_text("a = 1\n")
    (tmp_path / "v2" / "pgcat.toml").write_text("a = 2\n")
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "pgcat.toml").symlink_to("..data/pgcat.toml")
    watcher = ConfigWatcher(str(tmp_path / "pgcat.toml"))
    (tmp_path / "..data_tmp").symlink_to("v2")
    (tmp_path / "..data_tmp").rename(tmp_path / "..data")
    assert watcher.changed()


def test_shutdown_delay_is_milliseconds_and_off_by_default() -> None:
    assert parse_config(GENERAL.format(""), "f.toml").general.shutdown_delay == 0
    assert parse_config(GENERAL.format("shutdown_delay = 5000"), "f.toml").general.shutdown_delay == 5000
    with pytest.raises(ConfigError, match="f.toml: general.shutdown_delay: expected a non-negative integer"):
        parse_config(GENERAL.format("shutdown_delay = -1"), "f.toml")


def test_liveness_and_readiness_fail_while_the_event_loop_is_stuck(monkeypatch) -> None:
    monkeypatch.setattr(probes, "LOOP_ANSWER_TIMEOUT", 0.2)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = types.SimpleNamespace(accepting=True, leaving=False, groups={})

    async def make() -> probes.AppProbes:
        return probes.AppProbes(app)

    app_probes = asyncio.run_coroutine_threadsafe(make(), loop).result(5)
    try:
        assert app_probes.liveness() == Verdict(True, "alive")
        assert app_probes.readiness() == Verdict(True, "ready")
        release = threading.Event()
        loop.call_soon_threadsafe(release.wait)  # a callback that never returns: the loop is stuck
        assert app_probes.liveness().reason.startswith("the event loop did not answer")
        assert not app_probes.readiness().ok
        app.leaving = True  # a drain is answered from the flag, without the loop
        assert app_probes.readiness() == Verdict(False, "shutting down: send new clients elsewhere")
        release.set()
        assert app_probes.liveness().ok
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
