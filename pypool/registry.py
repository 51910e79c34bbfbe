"""The connected clients: who is here, the cancel keys they were given, logins counted per user.

A CancelRequest arrives on a new connection carrying only a (process id, secret
key) pair; the registry finds the client it belongs to and cancels what that
client's server is running. In a multi-process instance the key names its
worker, and a key of another worker is passed there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from pypool import sqlstates
from pypool.client import new_cancel_key
from pypool.errors import LoginRefused
from pypool.limits import UserConnectionCounts
from pypool.pool.connect import send_cancel

if TYPE_CHECKING:
    from pypool.session.session import ClientSession

log = logging.getLogger("pypool")


class CancelRouter(Protocol):
    """One worker of several processes (``pypool.instance.Worker``): hands out and forwards cancel keys."""

    def cancel_key(self) -> tuple[int, int]: ...

    def forward_cancel(self, process_id: int, secret_key: int) -> bool: ...


class ClientRegistry:
    def __init__(self, worker: CancelRouter | None = None) -> None:
        self.worker = worker
        self.clients: set[ClientSession] = set()
        self.user_counts = UserConnectionCounts()
        self.accepting = True  # False once shutdown starts: new clients (admins aside) are turned away
        self._cancel_keys: dict[tuple[int, int], ClientSession] = {}

    def connected(self, client: ClientSession) -> None:
        self.clients.add(client)

    def disconnected(self, client: ClientSession, log_it: bool) -> None:
        self.clients.discard(client)
        self._cancel_keys.pop((client.process_id, client.secret_key), None)
        if log_it and client.user:
            log.info("client %s (%s@%s) disconnected", client.peer, client.user, client.database)

    def check_accepting(self, max_client_conn: int, admin: bool = False) -> None:
        """Raises LoginRefused when a client that just connected must be turned away.

        An admin login is let in during the drain, as PgCat does: the drain is
        when an operator most needs SHOW CLIENTS and SHOW POOLS.
        """
        if not self.accepting and not admin:
            raise LoginRefused(sqlstates.ADMIN_SHUTDOWN, "pypool is shutting down")
        if max_client_conn and len(self.clients) > max_client_conn:
            raise LoginRefused(sqlstates.TOO_MANY_CONNECTIONS,
                               f"too many client connections: max_client_conn is {max_client_conn}")

    # ------------------------------------------------------------------- cancel

    def register_cancel_key(self, client: ClientSession) -> tuple[int, int]:
        while True:
            key = new_cancel_key() if self.worker is None else self.worker.cancel_key()
            if key not in self._cancel_keys:
                self._cancel_keys[key] = client
                return key

    def cancel(self, process_id: int, secret_key: int) -> "asyncio.Task[None] | None":
        """Forward a CancelRequest to the server running that client's request; the delivery, if any."""
        if self.worker is not None and self.worker.forward_cancel(process_id, secret_key):
            return None  # another worker holds that client
        client = self._cancel_keys.get((process_id, secret_key))
        server = client.server if client is not None else None
        if server is None:
            return None  # unknown key or nothing running: nothing to cancel, as PostgreSQL does
        group = client.group
        task = asyncio.get_running_loop().create_task(
            send_cancel(server.address, server.backend_pid, server.backend_secret))
        if group is not None:
            group.cancel_requests += 1
            group.cancels_in_flight += 1

            def delivered(_: asyncio.Task[None]) -> None:
                group.cancels_in_flight -= 1

            task.add_done_callback(delivered)
        return task
