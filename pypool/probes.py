"""Health probes: what ``/healthz`` (liveness) and ``/readyz`` (readiness) answer.

* Liveness: the process and its event loop answer. A kubelet restarts a pod
  whose liveness fails, so it says nothing about PostgreSQL: a primary that is
  down must not get every pooler in front of it restarted.
* Readiness: this pooler should be sent new clients. It is not when it is
  draining (SIGTERM, admin SHUTDOWN: fails at once, while the listener still
  answers stragglers with 57P01), or when a pool can serve nothing: its primary
  is unreachable and no replica is reachable either. A pool whose primary is
  down but that still has a replica is ready (reads work) and says so.

The verdict is computed from plain rows (``ServerView``), so the rule is
tested without sockets and one rule serves one process, each worker of a
multi-process instance, and the supervisor that combines their answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

LOOP_ANSWER_TIMEOUT = 2.0  # seconds the HTTP thread waits for the event loop (kubelet's default timeout is 1 s)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # one short line: the body of the HTTP answer


@dataclass(frozen=True)
class ServerView:
    """One configured server of one (pool, user), as readiness sees it."""

    pool: str
    user: str
    role: str  # "primary" | "replica", as pypool routes now
    host: str
    port: int
    reachable: bool  # the health monitor's last check succeeded (and, for a replica, not banned)
    shard: int = 0  # each shard of a sharded pool has its own primary and replicas


def readiness(accepting: bool, servers: Iterable[ServerView]) -> Verdict:
    if not accepting:
        return Verdict(False, "shutting down: send new clients elsewhere")
    groups: dict[tuple[str, str, int], list[ServerView]] = {}
    for server in servers:
        groups.setdefault((server.pool, server.user, server.shard), []).append(server)
    sharded = {pool for pool, _, shard in groups if shard > 0}
    down: list[str] = []
    reads_only: list[str] = []
    for (pool, user, shard), views in sorted(groups.items()):
        primary = [v for v in views if v.role == "primary"]
        if any(v.reachable for v in primary):
            continue
        where = f"pool {pool}{f' shard {shard}' if pool in sharded else ''} (user {user})"
        if primary:
            what = f"primary {primary[0].host}:{primary[0].port} unreachable"
        else:
            what = "no primary"
        if any(v.reachable for v in views if v.role == "replica"):
            reads_only.append(f"{where}: {what}, reads only")
        else:
            down.append(f"{where}: {what} and no replica reachable")
    if down:
        return Verdict(False, "; ".join(down))
    return Verdict(True, "; ".join(["ready", *reads_only]))


def combine_workers(stopping: bool, answers: list[Verdict | None]) -> Verdict:
    """The instance's readiness from its workers' (None: did not answer).

    One ready worker is enough: the kernel gives new connections only to the
    workers that listen, and a worker being restarted does not.
    """
    if stopping:
        return Verdict(False, "shutting down: send new clients elsewhere")
    ready = [a for a in answers if a is not None and a.ok]
    if ready:
        return Verdict(True, f"{ready[0].reason} ({len(ready)}/{len(answers)} workers ready)")
    reasons = sorted({a.reason for a in answers if a is not None}) or ["no worker answered"]
    return Verdict(False, "; ".join(reasons))


# ------------------------------------------------------------- one process

class Pooler(Protocol):
    """What readiness reads of ``pypool.app.Application`` (no import: the app imports the exporter)."""

    accepting: bool
    leaving: bool  # a shutdown was asked for (true during shutdown_delay, before the drain)
    groups: dict[tuple[str, str, int], Any]  # PoolGroup by (pool, user, shard)


def app_servers(app: Pooler) -> list[ServerView]:
    """The configured servers of the running pools. Call on the event loop thread."""
    views = []
    for (pool, user, shard), group in app.groups.items():
        for sp in group.all_pools:
            role = "primary" if sp is group.primary else "replica"
            reachable = sp.healthy and (role == "primary" or not group.is_banned(sp))
            views.append(ServerView(pool, user, role, sp.address.host, sp.address.port, reachable, shard))
    return views


def app_readiness(app: Pooler) -> Verdict:
    """Call on the event loop thread."""
    return readiness(app.accepting and not app.leaving, app_servers(app))


class AppProbes:
    """The probes of one pooler process, asked from the HTTP thread."""

    def __init__(self, app: Pooler) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()

    def _on_loop(self, fn: Callable[[], Verdict]) -> Verdict:
        """``fn()`` run on the event loop; a stuck or closed loop is the answer's reason."""
        async def call() -> Verdict:
            return fn()

        try:
            future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        except RuntimeError:
            return Verdict(False, "the event loop is closed: pypool is stopping")
        try:
            return future.result(LOOP_ANSWER_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return Verdict(False, f"the event loop did not answer within {LOOP_ANSWER_TIMEOUT:.0f} s")

    def liveness(self) -> Verdict:
        return self._on_loop(lambda: Verdict(True, "alive"))

    def readiness(self) -> Verdict:
        if not self.app.accepting or self.app.leaving:  # plain flags: answered even while the loop is busy
            return readiness(False, ())
        return self._on_loop(lambda: app_readiness(self.app))
