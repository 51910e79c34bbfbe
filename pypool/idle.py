"""``idle_client_in_transaction_timeout``: end clients that sit in an open transaction doing nothing.

Such a client pins a server connection (and its locks) that transaction
pooling would otherwise share. A sweep, not a timer per message, keeps the
relay's hot path free of clock reads: a client counts as idle in a
transaction when its server's last ReadyForQuery said 'T' or 'E', nothing is
outstanding, and the byte counters of its server connection have not moved
since the previous sweep; or when pypool answered its BEGIN itself and holds it
(no server yet, read/write splitting) and it has asked nothing since, in the
same transaction (its transaction count has not moved). Past the timeout the
client gets a FATAL 25P03 and is closed; its server connection, still in the
transaction, is closed too, so PostgreSQL rolls the transaction back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable, Protocol

from pypool import sqlstates
from pypool.pool.server import ServerConnection
from pypool.session import states

log = logging.getLogger("pypool.idle")


class ClientSession(Protocol):
    """What the reaper needs of a client (pypool.session.session.ClientSession)."""

    peer: str
    user: str
    database: str
    server: ServerConnection | None
    state: states.ClientState
    xact_count: int

    @property
    def held_begin(self) -> str | None: ...

    def close_with_error(self, sqlstate: str, text: str, severity: str = "FATAL") -> None: ...


class Application(Protocol):
    config: Any
    clients: Iterable[ClientSession]


class IdleTransactionReaper:
    def __init__(self, app: "Application") -> None:
        self.app = app
        # client -> (what moves while it works, monotonic time first seen like that)
        self._seen: dict["ClientSession", tuple[tuple[object, int, int], float]] = {}
        self.terminated = 0

    async def run(self) -> None:
        while True:
            timeout_ms = self.app.config.general.idle_client_in_transaction_timeout
            if timeout_ms:
                try:
                    self.sweep(timeout_ms / 1000, time.monotonic())
                except Exception:  # noqa: BLE001 - the sweep must keep running
                    log.exception("idle-in-transaction sweep failed")
            else:
                self._seen.clear()
            # A quarter of the timeout keeps the overshoot small; at most once a second.
            await asyncio.sleep(min(1.0, max(0.05, timeout_ms / 4000)) if timeout_ms else 1.0)

    def sweep(self, timeout: float, now: float) -> None:
        seen: dict["ClientSession", tuple[tuple[object, int, int], float]] = {}
        for client in self.app.clients:
            activity = _idle_in_transaction(client)
            if activity is None:
                continue
            previous = self._seen.get(client)
            since = previous[1] if previous is not None and previous[0] == activity else now
            if now - since >= timeout:
                self.terminate(client, timeout)
                continue
            seen[client] = (activity, since)
        self._seen = seen

    def terminate(self, client: "ClientSession", timeout: float) -> None:
        self.terminated += 1
        log.info("client %s (%s@%s) idle in transaction for more than %.0f ms; closing it", client.peer,
                 client.user, client.database, timeout * 1000)
        client.close_with_error(
            sqlstates.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            "terminating connection due to idle-in-transaction timeout: idle in a transaction for more than "
            f"idle_client_in_transaction_timeout ({timeout * 1000:.0f} ms); the transaction was rolled back")


def _idle_in_transaction(client: "ClientSession") -> tuple[object, int, int] | None:
    """What moves while ``client`` works, if it sits inside a transaction asking nothing now; else None."""
    server = client.server
    if server is None:
        # Its BEGIN answered by pypool and held, and no request since (one would wait for a server).
        if client.held_begin is None or client.state is not states.IDLE:
            return None
        return None, client.xact_count, 0  # an empty transaction ended and a new BEGIN held: it moves
    if not server.requests.idle_in_transaction:
        return None
    return server, server.bytes_sent, server.bytes_received
