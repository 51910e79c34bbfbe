"""The running pooler: listener, pools, client registry, cancel keys, signals, shutdown.

(The design notes called this module ``server.py``; it is ``app.py`` because
"server" already means a PostgreSQL backend in ``pool/server.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import TYPE_CHECKING

from pypool.client import ClientConnection, ClientError, new_cancel_key
from pypool.pool.group import PoolGroup
from pypool.pool.server import send_cancel
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.routing.router import Decision, Router

if TYPE_CHECKING:
    from pypool.config import Config

log = logging.getLogger("pypool")


class Application:
    def __init__(self, config: "Config") -> None:
        self.config = config
        self.groups: dict[tuple[str, str], PoolGroup] = {}
        self.routers: dict[str, Router] = {}
        self.clients: set[ClientConnection] = set()
        self._cancel_keys: dict[tuple[int, int], ClientConnection] = {}
        self._verifiers: dict[tuple[str, str], auth.ScramVerifier] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self.accepting = True
        self._stopped = asyncio.Event()
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
                                              reuse_address=True, backlog=1024)
        self._servers.append(server)
        for group in self.groups.values():
            group.start()
        where = ", ".join(str(s.getsockname()) for s in server.sockets)
        log.info("pypool listening on %s with %d pool(s)", where, len(self.groups))

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for srv in self._servers for s in srv.sockets]

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(self.shutdown(reason=s.name)))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def shutdown(self, reason: str = "shutdown", timeout: float | None = None) -> None:
        """Stop accepting, let transactions in flight finish, then close everything."""
        if not self.accepting:
            return
        self.accepting = False
        log.info("shutting down (%s)", reason)
        for server in self._servers:
            server.close()
        if timeout is None:
            timeout = self.config.general.shutdown_timeout / 1000
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.server is not None for c in self.clients) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.terminate_for_shutdown()
        for group in self.groups.values():
            await group.close()
        self._stopped.set()

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
            raise ClientError(m.SQLSTATE_ADMIN_SHUTDOWN, "pypool is shutting down")
        limit = self.config.general.max_client_conn
        if limit and len(self.clients) > limit:
            raise ClientError(m.SQLSTATE_TOO_MANY_CONNECTIONS,
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
            key = new_cancel_key()
            if key not in self._cancel_keys:
                self._cancel_keys[key] = client
                return key

    def cancel(self, process_id: int, secret_key: int) -> None:
        client = self._cancel_keys.get((process_id, secret_key))
        server = client.server if client is not None else None
        if server is None:
            return  # unknown key or nothing running: nothing to cancel, as PostgreSQL does
        asyncio.get_running_loop().create_task(
            send_cancel(server.address, server.backend_pid, server.backend_secret))
