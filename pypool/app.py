"""The running pooler: listener, pools, client registry, cancel keys, signals, shutdown.

(The design notes called this module ``server.py``; it is ``app.py`` because
"server" already means a PostgreSQL backend in ``pool/server.py``.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import time
from typing import TYPE_CHECKING

from pypool import idle, limits, metrics, snapshot, sqlstates, tls
from pypool.client import ClientConnection, Phase, new_cancel_key
from pypool.config import ConfigError, load_config
from pypool.errors import LoginRefused
from pypool.pool.group import PoolGroup
from pypool.pool.server import send_cancel
from pypool.protocol import auth
from pypool.routing.router import Decision, Router

if TYPE_CHECKING:
    from pypool.config import Config, General, Pool, User
    from pypool.instance import Worker

log = logging.getLogger("pypool")


class Application:
    def __init__(self, config: "Config", worker: "Worker | None" = None) -> None:
        # One of several worker processes (pypool.instance): it runs its share of every pool.
        self.worker = worker
        self.file_config = config  # as configured: what SHOW CONFIG reports for the instance
        if worker is not None:
            config = worker.share(config)
        self.config = config
        self.groups: dict[tuple[str, str], PoolGroup] = {}
        self.routers: dict[str, Router] = {}
        self.clients: set[ClientConnection] = set()
        self._cancel_keys: dict[tuple[int, int], ClientConnection] = {}
        self._verifiers: dict[tuple[str, str], auth.ScramVerifier] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self.accepting = True
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._drain_deadline = 0.0
        # Groups a config reload replaced or removed, until their last connection closes.
        self.draining: list[PoolGroup] = []
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.averager = snapshot.Averager()
        self.metrics_server: metrics.MetricsServer | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.client_tls = tls.client_tls(config)  # certificates are read once, at start
        self.user_clients = limits.UserConnectionCounts()
        self.idle_reaper = idle.IdleTransactionReaper(self)
        self._build_pools(config)

    def _build_pools(self, config: "Config") -> None:
        for pool in config.pools.values():
            self.routers[pool.name] = Router(pool)
            for user in pool.users.values():
                self.groups[(pool.name, user.username)] = PoolGroup(pool, user, config.general)

    # ---------------------------------------------------------------- lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        general = self.config.general
        if sock is not None:
            server = await loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=1024)
        else:
            server = await loop.create_server(lambda: ClientConnection(self), general.host, general.port,
                                              reuse_address=True, reuse_port=self.worker is not None,
                                              backlog=1024)
        self._servers.append(server)
        for group in self.groups.values():
            group.start()
        where = ", ".join(str(s.getsockname()) for s in server.sockets)
        log.info("pypool listening on %s with %d pool(s)", where, len(self.groups))
        if general.enable_prometheus_exporter and self.worker is None:  # else the supervisor serves it
            try:
                self.metrics_server = metrics.MetricsServer(self, general.host, general.prometheus_exporter_port)
            except OSError as exc:
                log.error("cannot serve Prometheus metrics on %s:%s: %s", general.host,
                          general.prometheus_exporter_port, exc)
            else:
                log.info("Prometheus metrics on http://%s:%s/metrics", general.host, general.prometheus_exporter_port)
        self._housekeeping = loop.create_task(self._housekeep())
        self._idle_reaping = loop.create_task(self.idle_reaper.run())

    async def _housekeep(self) -> None:
        """Once a second: forget drained pools; every stats period: roll the SHOW STATS averages."""
        next_roll = 0.0
        while True:
            try:
                self.draining = [g for g in self.draining if any(sp.size > 0 for sp in g.all_pools)]
                now = time.monotonic()
                if now >= next_roll:
                    self.averager.roll(await self.stats_snapshot())
                    next_roll = now + self.averager.period
            except Exception:  # noqa: BLE001 - housekeeping must never die
                log.exception("housekeeping failed")
            await asyncio.sleep(1.0)

    async def stats_snapshot(self) -> snapshot.Snapshot:
        """Statistics of this process as plain data: what SHOW and /metrics render.

        The one place to gather and ``snapshot.merge`` the snapshots of
        several worker processes.
        """
        if self.worker is not None:
            return await self.worker.instance_snapshot()
        return snapshot.take(self)

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for srv in self._servers for s in srv.sockets]

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM drain (a second one stops at once), SIGHUP reloads the config.

        SIGTERM drains like SIGINT rather than stopping at once as PgCat does:
        it is what Docker, Kubernetes and systemd send on a routine stop, and a
        routine stop should not abort committed-to-be work (README, "Operations").
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda s=sig: self.request_shutdown(s.name))
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)

    def _reload_on_signal(self) -> None:
        try:
            self.reload(reason="SIGHUP")
        except ConfigError:
            pass  # logged by reload(); the running config stays

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def request_shutdown(self, reason: str) -> None:
        """Start the graceful shutdown; asked again while draining, stop waiting for transactions."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.shutdown(reason=reason))
        elif not self._stopped.is_set():
            log.warning("%s while draining: closing every connection now", reason)
            self._drain_deadline = 0.0

    @staticmethod
    def _in_transaction(client: ClientConnection) -> bool:
        server = client.server
        return server is not None and (server.status != _IDLE_STATUS or server.pending_syncs > 0
                                       or server.batch_open)

    async def shutdown(self, reason: str = "shutdown", timeout: float | None = None) -> None:
        """Stop taking clients and transactions, let transactions in flight finish, then close everything.

        During the drain the listener stays open so that a new client is told
        why (57P01) instead of finding the port closed; clients between
        transactions are closed with 57P01 at once, clients inside one get up
        to ``shutdown_timeout`` to commit.
        """
        if not self.accepting:
            return
        self.accepting = False
        loop = asyncio.get_running_loop()
        if timeout is None:
            timeout = self.config.general.shutdown_timeout / 1000
        self._drain_deadline = loop.time() + timeout
        busy = [c for c in self.clients if self._in_transaction(c)]
        log.info("shutting down (%s): no new clients or transactions; waiting up to %.1f s for %d "
                 "transaction(s) in flight", reason, timeout, len(busy))
        # No more checkouts: waiting clients get 57P01, connections in use close when their transaction ends.
        for group in list(self.groups.values()) + self.draining:
            await group.close()
        while True:
            busy = []
            for client in list(self.clients):
                if self._in_transaction(client):
                    busy.append(client)
                elif client.phase is Phase.RELAY:
                    client.terminate_for_shutdown()
            if not busy or loop.time() >= self._drain_deadline:
                break
            await asyncio.sleep(0.05)
        if busy:
            log.warning("shutdown: %d client(s) still in a transaction; cancelling and closing them (rolled back)",
                        len(busy))
            # A closed socket alone leaves the backend running its query, and holding its locks,
            # until it next writes to us: cancel the query first.
            await asyncio.gather(*(send_cancel(c.server.address, c.server.backend_pid, c.server.backend_secret,
                                               timeout=1.0) for c in busy if c.server is not None),
                                 return_exceptions=True)
        else:
            log.info("shutdown: no transaction in flight")
        for client in list(self.clients):
            client.terminate_for_shutdown()
        for server in self._servers:
            server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._idle_reaping.cancel()
        log.info("pypool stopped")
        self._stopped.set()

    # ------------------------------------------------------------------ reload

    def reload(self, reason: str = "reload") -> None:
        """Re-read the config file and apply it without dropping anyone.

        Pools whose settings, servers and user are unchanged keep their
        connections. A changed pool is rebuilt: new transactions go to the new
        one, a transaction in progress finishes on its old connection, and the
        old pool closes its connections as they come back. An invalid file
        raises ConfigError (logged, naming the file and the key) and changes
        nothing.
        """
        path = self.config.path
        try:
            new = load_config(path)
            file_config = new
            if self.worker is not None:
                new = self.worker.share(new)
        except ConfigError as exc:
            self.reloads_failed += 1
            log.error("config reload (%s) rejected, the running config stays: %s", reason, exc)
            raise
        for warning in new.warnings:
            log.warning("%s", warning)
        old_general = self.config.general
        for name in ("host", "port", "workers", "enable_prometheus_exporter", "prometheus_exporter_port",
                     "tls_certificate", "tls_private_key", "client_tls_mode", "server_tls",
                     "verify_server_certificate", "server_tls_ca_file"):
            if getattr(old_general, name) != getattr(new.general, name):
                log.warning("config reload: %s changed; it takes effect only when pypool restarts", name)
        groups: dict[tuple[str, str], PoolGroup] = {}
        kept = rebuilt = added = 0
        for pool in new.pools.values():
            router = self.routers.get(pool.name)
            if router is None or _without_users(router.pool) != _without_users(pool):
                new_router = Router(pool)
                if router is not None:  # keep the counters running
                    new_router.decisions = router.decisions
                    new_router.cache.hits, new_router.cache.misses = router.cache.hits, router.cache.misses
                self.routers[pool.name] = new_router
            for user in pool.users.values():
                key = (pool.name, user.username)
                old = self.groups.get(key)
                if old is not None and _group_signature(old.config, old.user, old.general) \
                        == _group_signature(pool, user, new.general):
                    old.general = new.general
                    groups[key] = old
                    kept += 1
                    continue
                group = PoolGroup(pool, user, new.general)
                if old is not None:
                    _inherit(old, group)
                    rebuilt += 1
                else:
                    added += 1
                groups[key] = group
        replaced = [(key, g) for key, g in self.groups.items() if groups.get(key) is not g]
        self.config = new
        self.file_config = file_config
        self.groups = groups
        for key, group in groups.items():
            if not group.monitors:
                group.start()
        loop = asyncio.get_running_loop()
        for key, old in replaced:
            old.successor = groups.get(key)
            for server_pool in old.all_pools:
                server_pool.retired = True
            self.draining.append(old)
            # Keep a reference: the loop holds only weak ones, and a collected task stops draining.
            task = loop.create_task(old.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self.reloads_ok += 1
        log.info("config reloaded from %s (%s): %d pool(s) kept, %d rebuilt, %d added, %d removed",
                 path, reason, kept, rebuilt, added, len(replaced) - rebuilt)

    # ------------------------------------------------------------------ clients

    def client_connected(self, client: ClientConnection) -> None:
        self.clients.add(client)

    def client_disconnected(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        self._cancel_keys.pop((client.process_id, client.secret_key), None)
        if self.config.general.log_client_disconnections and client.user:
            log.info("client %s (%s@%s) disconnected", client.peer, client.user, client.database)

    def check_accepting(self, client: ClientConnection) -> None:
        if not self.accepting:
            raise LoginRefused(sqlstates.ADMIN_SHUTDOWN, "pypool is shutting down")
        limit = self.config.general.max_client_conn
        if limit and len(self.clients) > limit:
            raise LoginRefused(sqlstates.TOO_MANY_CONNECTIONS,
                               f"too many client connections: max_client_conn is {limit}")

    def has_database(self, database: str) -> bool:
        return database in self.config.pools

    def find_group(self, database: str, user: str) -> PoolGroup | None:
        return self.groups.get((database, user))

    def scram_verifier(self, group: PoolGroup) -> auth.ScramVerifier:
        # PBKDF2 runs once per user, not once per login.
        key = (group.user.username, group.user.password)
        verifier = self._verifiers.get(key)
        if verifier is None:
            verifier = self._verifiers[key] = auth.ScramVerifier.from_password(group.user.password)
        return verifier

    def route(self, client: ClientConnection, tag: int, payload: bytes) -> "Decision":
        return self.routers[client.database].route(client.routing, tag, payload,
                                                    held_begin=client.held_begin is not None)

    # ------------------------------------------------------------------- cancel

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        while True:
            key = new_cancel_key() if self.worker is None else self.worker.cancel_key()
            if key not in self._cancel_keys:
                self._cancel_keys[key] = client
                return key

    def cancel(self, process_id: int, secret_key: int) -> None:
        if self.worker is not None and self.worker.forward_cancel(process_id, secret_key):
            return  # another worker holds that client
        client = self._cancel_keys.get((process_id, secret_key))
        server = client.server if client is not None else None
        if server is None:
            return  # unknown key or nothing running: nothing to cancel, as PostgreSQL does
        group = client.group
        task = asyncio.get_running_loop().create_task(
            send_cancel(server.address, server.backend_pid, server.backend_secret))
        if group is not None:
            group.cancel_requests += 1
            group.cancels_in_flight += 1

            def delivered(_: asyncio.Task[None]) -> None:
                group.cancels_in_flight -= 1

            task.add_done_callback(delivered)


_IDLE_STATUS = ord("I")


def _without_users(pool: "Pool") -> "Pool":
    return dataclasses.replace(pool, users={})


def _group_signature(pool: "Pool", user: "User", general: "General") -> tuple:
    """What a PoolGroup is built from; equal signatures mean the running group can stay."""
    return (_without_users(pool), user, general.healthcheck_timeout)


def _inherit(old: PoolGroup, new: PoolGroup) -> None:
    """Carry counters, bans, health and PAUSE from a group a reload replaces to its successor."""
    new.cancel_requests = old.cancel_requests
    new.server_parameters = old.server_parameters
    previous = {(sp.address.host, sp.address.port): sp for sp in old.all_pools}
    for sp in new.all_pools:
        before = previous.get((sp.address.host, sp.address.port))
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
