"""The running pooler: composes the listener, the client registry, the pools, reload and shutdown.

Each concern lives in its own module (``listener``, ``registry``, ``reload``,
``shutdown``); ``Application`` holds the state they share (the config, the pool
groups and routers) and is what the client sessions, the admin console and the
statistics snapshot talk to.

(The design notes called this module ``server.py``; it is ``app.py`` because
"server" already means a PostgreSQL backend in ``pool/server.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import TYPE_CHECKING, Sequence

from pypool import admin, autoreload, idle, keepalive, metrics, probes, process_signals, snapshot, tls
from pypool.causal.pool_causal import CommitLogs
from pypool.client import ClientConnection
from pypool.session.session import ClientSession
from pypool.config import ConfigError
from pypool.listener import Listener
from pypool.protocol import auth
from pypool.registry import ClientRegistry
from pypool.reload import Reloader, build_pools
from pypool.shutdown import Shutdown

if TYPE_CHECKING:
    from pypool.config import Config
    from pypool.instance import Worker
    from pypool.pool.group import PoolGroup
    from pypool.routing.router import Decision

log = logging.getLogger("pypool")


class Application:
    def __init__(self, config: Config, worker: Worker | None = None) -> None:
        # One of several worker processes (pypool.instance): it runs its share of every pool.
        self.worker = worker
        self.file_config = config  # as configured: what SHOW CONFIG reports for the instance
        if worker is not None:
            config = worker.share(config)
        self.config = config
        self.commit_logs = CommitLogs(worker.commit_slots if worker is not None else None)
        self.groups, self.routers = build_pools(config, self.commit_logs)
        # Groups a config reload replaced or removed, until their last connection closes.
        self.draining: list[PoolGroup] = []
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.registry = ClientRegistry(worker)
        self.clients = self.registry.clients
        self.user_clients = self.registry.user_counts
        self.listener = Listener()
        self.averager = snapshot.Averager()
        self.metrics_server: metrics.MetricsServer | None = None
        self._background: list[asyncio.Task[None]] = []
        self._verifiers: dict[tuple[str, str], auth.ScramVerifier] = {}
        self.client_tls = tls.client_tls(config)  # certificates are read once, at start
        self.idle_reaper = idle.IdleTransactionReaper(self)
        self._reloader = Reloader(self)
        self._shutdown = Shutdown(self)
        self.started = asyncio.Event()  # set when ``start`` is done (a shutdown asked earlier waits for it)

    # ---------------------------------------------------------------- lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        general = self.config.general
        keepalive.configure(general)  # before the first client or server connection
        where = await self.listener.start(lambda: ClientConnection(self), general, sock,
                                          reuse_port=self.worker is not None)
        for group in self.groups.values():
            group.start()
        log.info("pypool listening on %s with %d pool(s)", where, len(self.groups))
        if general.enable_prometheus_exporter and self.worker is None:  # else the supervisor serves it
            try:
                self.metrics_server = metrics.MetricsServer(self._scrape, general.host,
                                                            general.prometheus_exporter_port, probes.AppProbes(self))
            except OSError as exc:
                log.error("cannot serve Prometheus metrics on %s:%s: %s", general.host,
                          general.prometheus_exporter_port, exc)
            else:
                log.info("Prometheus metrics on http://%s:%s/metrics", general.host, general.prometheus_exporter_port)
        self._background = [loop.create_task(self._housekeep()), loop.create_task(self.idle_reaper.run())]
        self._background.extend(autoreload.watch(self))  # PgCat's `autoreload`, when configured
        self.started.set()

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

    async def _scrape(self) -> tuple[snapshot.Snapshot, dict[tuple, dict[str, float]]]:
        return await self.stats_snapshot(), dict(self.averager.averages)

    @property
    def accepting(self) -> bool:
        return self.registry.accepting

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
        for sig in process_signals.take_pending():  # sent while pypool imported and read its config
            if sig == signal.SIGHUP:
                self._reload_on_signal()  # logs that it is not a reload during start-up
            else:
                self.request_shutdown(sig.name)

    def _reload_on_signal(self) -> None:
        if not self.accepting or not self.started.is_set():
            log.warning("SIGHUP during %s: config not reloaded",
                        "the shutdown drain" if self.started.is_set() else "start-up (it was just read)")
            return
        try:
            self.reload(reason="SIGHUP")
        except ConfigError:
            pass  # logged by reload(); the running config stays

    def reload(self, reason: str = "reload") -> None:
        """Re-read the config file and apply it without dropping anyone (``pypool.reload``)."""
        self._reloader.reload(reason)

    def request_shutdown(self, reason: str) -> None:
        self._shutdown.request(reason)

    @property
    def leaving(self) -> bool:
        """A shutdown was asked for: /readyz fails from then on, during shutdown_delay too."""
        return self._shutdown.requested

    async def wait_stopped(self) -> None:
        await self._shutdown.wait()

    def stop_serving(self) -> None:
        """The last step of a shutdown: close the port, the metrics endpoint and the background tasks."""
        self.listener.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for task in self._background:
            task.cancel()

    # ------------------------------------------------------------------ clients

    def client_connected(self, client: ClientSession) -> None:
        self.registry.connected(client)

    def client_disconnected(self, client: ClientSession) -> None:
        self.registry.disconnected(client, log_it=self.config.general.log_client_disconnections)

    @staticmethod
    def is_admin_database(database: str) -> bool:
        return database in admin.ADMIN_DATABASES

    @staticmethod
    async def admin_login(client: ClientConnection) -> "admin.AdminConsole":
        """Hand a client that asked for an admin database to the console (it authenticates it)."""
        return await admin.login(client)

    def check_accepting(self, client: ClientSession) -> None:
        self.registry.check_accepting(self.config.general.max_client_conn,
                                      admin=self.is_admin_database(client.database))

    def register_cancel_key(self, client: ClientSession) -> tuple[int, int]:
        return self.registry.register_cancel_key(client)

    def cancel(self, process_id: int, secret_key: int) -> "asyncio.Task[None] | None":
        return self.registry.cancel(process_id, secret_key)

    def has_database(self, database: str) -> bool:
        return database in self.config.pools

    def find_group(self, database: str, user: str) -> PoolGroup | None:
        """The group of shard 0 (every pool has one): login, auth and the server parameters."""
        return self.groups.get((database, user, 0))

    def shard_groups(self, database: str, user: str) -> tuple[PoolGroup, ...]:
        """The groups of every shard of the pool, in shard order (none if the pool or user is gone)."""
        pool = self.config.pools.get(database)
        groups = tuple(self.groups.get((database, user, shard)) for shard in range(len(pool.shards) if pool else 0))
        return groups if None not in groups else ()  # type: ignore[return-value]

    def scram_verifier(self, group: PoolGroup) -> auth.ScramVerifier:
        # PBKDF2 runs once per user, not once per login.
        key = (group.user.username, group.user.password)
        verifier = self._verifiers.get(key)
        if verifier is None:
            verifier = self._verifiers[key] = auth.ScramVerifier.from_password(group.user.password)
        return verifier

    def route(self, client: ClientSession, tag: int, payload: bytes,
              params: Sequence[tuple[int, bytes | None]] | None = None) -> Decision:
        return self.routers[client.database].route(client.routing, tag, payload,
                                                    held_begin=client.held_begin is not None, params=params)
