"""Graceful shutdown: stop taking clients and transactions, let transactions in flight finish, close.

During the drain the listener stays open so that a new client is told why
(57P01) instead of finding the port closed; clients between transactions are
closed with 57P01 at once, clients inside one get up to ``shutdown_timeout``
to commit. Asked again while draining (a second SIGINT), it stops waiting.
The admin console stays open to admins throughout (SHOW CLIENTS, SHOW POOLS
watch the drain), as in PgCat; the process ends when the drain does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from pypool import shutdown_delay
from pypool.pool.connect import send_cancel

if TYPE_CHECKING:
    from pypool.session.session import ClientSession
    from pypool.config import Config
    from pypool.pool.group import PoolGroup
    from pypool.registry import ClientRegistry

log = logging.getLogger("pypool")

class Stoppable(Protocol):
    """The running pooler (``pypool.app.Application`` is one)."""

    config: Config
    groups: dict[tuple[str, str, int], PoolGroup]
    draining: list[PoolGroup]
    registry: ClientRegistry
    started: asyncio.Event  # set once the listener, pools and background tasks are up

    def stop_serving(self) -> None:
        """Close the listener, the metrics endpoint and the background tasks."""


class Shutdown:
    def __init__(self, pooler: Stoppable) -> None:
        self.pooler = pooler
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._deadline = 0.0  # loop time when clients still in a transaction are cancelled and closed
        self._hurry = asyncio.Event()  # asked again: cut shutdown_delay short, and the drain

    async def wait(self) -> None:
        await self._stopped.wait()

    def request(self, reason: str) -> None:
        """Start the graceful shutdown; asked again while draining, stop waiting for transactions."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(reason))
        elif not self._stopped.is_set():
            log.warning("%s while draining: closing every connection now", reason)
            self._deadline = 0.0
            self._hurry.set()

    @property
    def requested(self) -> bool:
        """True from the signal on, during shutdown_delay too (/readyz reads it)."""
        return self._task is not None

    async def run(self, reason: str) -> None:
        pooler = self.pooler
        await pooler.started.wait()  # asked during start-up: drain what start-up opens, once it has
        registry = pooler.registry
        if not registry.accepting:
            return
        await shutdown_delay.serve_on(pooler.config.general.shutdown_delay, reason, self._hurry)
        registry.accepting = False
        loop = asyncio.get_running_loop()
        timeout = 0.0 if self._hurry.is_set() else pooler.config.general.shutdown_timeout / 1000
        self._deadline = loop.time() + timeout
        busy = [c for c in registry.clients if c.in_transaction]
        log.info("shutting down (%s): no new clients or transactions; waiting up to %.1f s for %d "
                 "transaction(s) in flight", reason, timeout, len(busy))
        # No more checkouts: waiting clients get 57P01, connections in use close when their transaction ends.
        for group in list(pooler.groups.values()) + pooler.draining:
            await group.close()
        busy = await self._drain(loop)
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
        for client in list(registry.clients):
            client.terminate_for_shutdown()
        pooler.stop_serving()
        log.info("pypool stopped")
        self._stopped.set()

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> list[ClientSession]:
        """Close clients as they leave their transactions, until none is left or the deadline; the rest."""
        while True:
            busy = []
            for client in list(self.pooler.registry.clients):
                if client.in_transaction:
                    busy.append(client)
                elif client.state.relaying:
                    client.terminate_for_shutdown()
            if not busy or loop.time() >= self._deadline:
                return busy
            await asyncio.sleep(0.05)
