"""Config reload (SIGHUP, admin RELOAD): re-read the file and apply it without dropping anyone.

Pools whose settings, servers and user are unchanged keep their connections. A
changed pool is rebuilt: new transactions go to the new one, a transaction in
progress finishes on its old connection, and the old pool closes its
connections as they come back. What a reload changes is decided in one
function, ``plan_reload``; the rest carries it out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Protocol

from pypool import config_keys
from pypool.causal.pool_causal import CommitLogs
from pypool.config import ConfigError, load_config
from pypool.pool.group import PoolGroup
from pypool.routing.router import Router

if TYPE_CHECKING:
    from pypool.config import Config, Pool

log = logging.getLogger("pypool")

# (pool, user, shard): one PoolGroup per shard of each user of each pool.
GroupKey = tuple[str, str, int]


class Worker(Protocol):
    """One worker of several processes (``pypool.instance.Worker``): runs its share of every pool."""

    def share(self, config: Config) -> Config: ...


class Reloadable(Protocol):
    """The running pooler's pools, which a reload replaces (``pypool.app.Application`` is one)."""

    config: Config  # what this process runs (a worker's share of the file)
    file_config: Config  # as configured
    worker: Worker | None
    groups: dict[GroupKey, PoolGroup]
    routers: dict[str, Router]
    commit_logs: CommitLogs  # global causal reads: one log per pool name, kept across reloads
    draining: list[PoolGroup]
    reloads_ok: int
    reloads_failed: int


@dataclasses.dataclass
class ReloadPlan:
    restart_needed: list[str]  # [general] keys that changed but apply only at the next start
    new_routers: set[str]  # pools whose router is rebuilt (or new)
    new_groups: set[tuple[str, str]]  # (pool, user) whose PoolGroups (one per shard) are rebuilt (or new)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """The one place that decides what a reload changes; everything not listed keeps running.

    How each key applies is declared in ``pypool.config_keys``: a group is
    rebuilt when a key it is built from changed (its pool's and user's keys,
    the [general] timeouts); a kept group takes the new ``[general]``, except
    the restart-only keys, which keep their running values.
    """
    restart = config_keys.restart_changes(old.general, new.general)
    routers, groups = set(), set()
    for pool in new.pools.values():
        before = old.pools.get(pool.name)
        if before is None or _without_users(before) != _without_users(pool):
            routers.add(pool.name)
        for user in pool.users.values():
            old_user = before.users.get(user.username) if before is not None else None
            if old_user is None or config_keys.group_signature(before, old_user, old.general) \
                    != config_keys.group_signature(pool, user, new.general):
                groups.add((pool.name, user.username))
    return ReloadPlan(restart, routers, groups)


def build_pools(config: Config, commit_logs: CommitLogs) -> tuple[dict[GroupKey, PoolGroup], dict[str, Router]]:
    """Every (pool, user, shard) group and every pool's router, as at start."""
    groups, routers = {}, {}
    for pool in config.pools.values():
        routers[pool.name] = Router(pool)
        for user in pool.users.values():
            for shard in range(len(pool.shards)):
                groups[(pool.name, user.username, shard)] = PoolGroup(
                    pool, user, config.general, shard, commit_logs.for_shard(pool.name, shard, pool.causal_reads))
    return groups, routers


class Reloader:
    def __init__(self, pooler: Reloadable) -> None:
        self.pooler = pooler
        # Old groups closing: the loop holds only weak references, and a collected task stops draining.
        self._closing: set[asyncio.Task[None]] = set()

    def reload(self, reason: str) -> None:
        """Re-read and apply the config file; an invalid file raises ConfigError and changes nothing."""
        pooler = self.pooler
        path = pooler.config.path
        try:
            file_config = load_config(path)
            new = file_config if pooler.worker is None else pooler.worker.share(file_config)
        except ConfigError as exc:
            pooler.reloads_failed += 1
            log.error("config reload (%s) rejected, the running config stays: %s", reason, exc)
            raise
        for warning in new.warnings:
            log.warning("%s", warning)
        plan = plan_reload(pooler.config, new)
        for key in plan.restart_needed:
            log.warning("config reload: %s changed; it takes effect only when pypool restarts", key)
        new = dataclasses.replace(new, general=config_keys.keep_restart_values(pooler.config.general, new.general))
        groups, kept, rebuilt = self._apply(new, plan)
        replaced = [(key, g) for key, g in pooler.groups.items() if groups.get(key) is not g]
        pooler.config = new
        pooler.file_config = file_config
        pooler.groups = groups
        for group in groups.values():
            if not group.monitors:
                group.start()
        for key, old in replaced:
            self._retire(old, groups.get(key))
        pooler.reloads_ok += 1
        log.info("config reloaded from %s (%s): %d pool(s) kept, %d rebuilt, %d added, %d removed",
                 path, reason, kept, rebuilt, len(groups) - kept - rebuilt, len(replaced) - rebuilt)

    def _apply(self, new: Config, plan: ReloadPlan) -> tuple[dict[GroupKey, PoolGroup], int, int]:
        """The groups (and routers) of the new config: kept ones, rebuilt ones, new ones."""
        pooler = self.pooler
        for name in plan.new_routers:
            router = Router(new.pools[name])
            before = pooler.routers.get(name)
            if before is not None:  # keep the counters running
                router.decisions = before.decisions
                router.cache.hits, router.cache.misses = before.cache.hits, before.cache.misses
            pooler.routers[name] = router
        groups: dict[GroupKey, PoolGroup] = {}
        kept = rebuilt = 0
        for pool in new.pools.values():
            for user in pool.users.values():
                for shard in range(len(pool.shards)):
                    key = (pool.name, user.username, shard)
                    old = pooler.groups.get(key)
                    if old is not None and (pool.name, user.username) not in plan.new_groups:
                        old.general = new.general
                        groups[key] = old
                        kept += 1
                        continue
                    group = groups[key] = PoolGroup(
                        pool, user, new.general, shard,
                        pooler.commit_logs.for_shard(pool.name, shard, pool.causal_reads))
                    if old is not None:
                        _inherit(old, group)
                        rebuilt += 1
        return groups, kept, rebuilt

    def _retire(self, old: PoolGroup, successor: PoolGroup | None) -> None:
        """A replaced or removed group: no new checkouts; it closes as its connections come back."""
        old.successor = successor
        for server_pool in old.all_pools:
            server_pool.retired = True
        self.pooler.draining.append(old)
        task = asyncio.get_running_loop().create_task(old.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _without_users(pool: Pool) -> Pool:
    return dataclasses.replace(pool, users={})


def _inherit(old: PoolGroup, new: PoolGroup) -> None:
    """Carry counters, bans, health and PAUSE from a group a reload replaces to its successor."""
    new.cancel_requests = old.cancel_requests
    new.causal.reads.stats = old.causal.reads.stats  # /metrics counters keep counting
    new.server_parameters = old.server_parameters
    # One server may be listed as primary and as replica: the role tells the two apart.
    previous = {(sp.address.host, sp.address.port, sp.address.role): sp for sp in old.all_pools}
    for sp in new.all_pools:
        before = previous.get((sp.address.host, sp.address.port, sp.address.role))
        if before is None:
            continue
        sp.stats = before.stats  # totals keep counting across the reload
        sp.bans = before.bans
        sp.healthy, sp.in_recovery, sp.lag_ms = before.healthy, before.in_recovery, before.lag_ms
        if before.banned_until > time.monotonic():
            sp.banned_until, sp.banned_at = before.banned_until, before.banned_at
            sp.ban_duration, sp.ban_reason = before.ban_duration, before.ban_reason
        if before.paused:
            sp.pause()
    new.refresh_candidates()
