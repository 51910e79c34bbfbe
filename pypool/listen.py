"""LISTEN/NOTIFY for transaction-mode clients: one listener connection per pool, fanned out.

A pooled server connection cannot listen for a client: it serves others
between the client's transactions, and a notification arriving then would
reach the wrong client or nobody. So a client's ``LISTEN`` is executed on a
dedicated connection to the pool's primary (opened on first use), and each
NotificationResponse it receives is copied to every client listening on
that channel. A client gets it between its transactions, as PostgreSQL
delivers them (one that is inside a transaction gets it when the current
request is answered).

The listener's ``LISTEN`` completes before the client's own statement is
answered, so a ``NOTIFY`` committed after that reaches the client. A
client's own ``NOTIFY`` on a channel it listens on reaches it before the
ReadyForQuery that ends its transaction, as PostgreSQL delivers it, with
the process ID pypool gave that client (``ListenHub.barrier``).
Notifications sent while the listener connection is being re-opened after
a loss are missed (logged).

A notification carries the sending backend's process ID; PostgreSQL gives
the one the sender was told at login (BackendKeyData). A pooled backend
serves many clients, so when a client's statement that may notify runs on
it (``note_sender``), its notifications are attributed to that client
until every listener connection has received what it committed: the
server connection goes back to its pool only after one round trip on each
of them (``ServerConnection.settle``). A notification from outside pypool,
or from a function or trigger of a statement that does not name NOTIFY or
pg_notify, keeps the server's process ID.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Callable, Protocol

from pypool import sqlstates
from pypool.pool.connect import open_connection
from pypool.pool.server import ServerConnection, ServerError
from pypool.protocol import messages as m
from pypool.protocol.frames import ProtocolViolation
from pypool.session.session_state import quote_ident

if TYPE_CHECKING:
    from pypool.pool.group import PoolGroup

log = logging.getLogger("pypool.listen")


class Listener(Protocol):
    def deliver_notification(self, message: bytes) -> None: ...


class ListenHub:
    """The channels a pool's clients listen on, and the one connection that listens for them."""

    def __init__(self, group: "PoolGroup") -> None:
        self.group = group
        self.channels: dict[str, set[Listener]] = {}
        self._conn: ServerConnection | None = None  # the listener connection: never relays, only listens
        self._lock = asyncio.Lock()
        self.delivered = 0

    def is_listening(self, client: Listener, channel: str) -> bool:
        clients = self.channels.get(channel)
        return clients is not None and client in clients and self._alive()

    def _alive(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def listen(self, client: Listener, channel: str) -> None:
        """Start delivering ``channel`` to ``client``; raises ServerError if the listener cannot."""
        async with self._lock:
            conn = await self._connection()
            if channel not in self.channels:
                await conn.query(f"LISTEN {quote_ident(channel)}")
                self.channels[channel] = set()
            self.channels[channel].add(client)

    def unlisten(self, client: Listener, channel: str) -> None:
        """Stop delivering ``channel`` ("*": every channel) to ``client``."""
        names = list(self.channels) if channel == "*" else [channel]
        emptied = []
        for name in names:
            clients = self.channels.get(name)
            if clients is None:
                continue
            clients.discard(client)
            if not clients:
                del self.channels[name]
                emptied.append(name)
        if emptied and self._alive():
            asyncio.get_running_loop().create_task(self._unlisten(emptied))

    async def _unlisten(self, names: list[str]) -> None:
        async with self._lock:
            names = [n for n in names if n not in self.channels]  # someone listened again meanwhile
            if not names or not self._alive():
                return
            try:
                await self._conn.query("; ".join(f"UNLISTEN {quote_ident(n)}" for n in names))  # type: ignore[union-attr]
            except ServerError as exc:
                log.warning("listener: UNLISTEN failed: %s", exc)

    async def _connection(self) -> ServerConnection:
        if self._alive():
            return self._conn  # type: ignore[return-value]
        primary = self.group.primary
        if primary is None:
            raise ServerError(f"pool {self.group.name} has no primary server to listen on",
                              {"C": sqlstates.CONNECTION_FAILURE})
        if self._conn is not None:
            log.warning("listener connection to %s was lost; re-listening on %d channel(s), notifications "
                        "sent meanwhile were missed", primary.label, len(self.channels))
        conn = await open_connection(primary.address, primary.credentials,
                                     {"application_name": "pypool listener"},
                                     primary.settings.connect_timeout)
        conn.on_notification = self._notification
        if self.channels:
            await conn.query("; ".join(f"LISTEN {quote_ident(n)}" for n in self.channels))
        self._conn = conn
        return conn

    async def barrier(self) -> None:
        """Return once every notification committed before the call has been handed out.

        A round trip on the listener connection: PostgreSQL sends a listening
        session the notifications it was signalled about before the
        ReadyForQuery of its next query.
        """
        async with self._lock:
            if self._alive():
                await self._conn.query("")  # type: ignore[union-attr]

    def hears(self, host: str, port: int) -> bool:
        """Its listener connection receives what is committed on the server at ``host:port``."""
        conn = self._conn
        return conn is not None and not conn.closed and bool(self.channels) \
            and conn.address.host == host and conn.address.port == port

    def _notification(self, payload: bytes) -> None:
        """A NotificationResponse's payload, from the listener connection."""
        try:
            channel, _ = m.read_cstring(payload, 4)
        except ProtocolViolation:
            return
        self.deliver(channel, m.message(m.NOTIFICATION_RESPONSE, payload))

    def deliver(self, channel: str, message: bytes) -> None:
        conn = self._conn
        if _senders and conn is not None:
            sender = _senders.get((conn.address.host, conn.address.port, int.from_bytes(message[5:9], "big")))
            if sender is not None:
                message = message[:5] + sender.to_bytes(4, "big") + message[9:]
        for client in list(self.channels.get(channel, ())):
            self.delivered += 1
            client.deliver_notification(message)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.channels.clear()


# Every pool's hub, each held by its PoolGroup (``listen_hub``): a hub goes with its pool.
_hubs: "weakref.WeakSet[ListenHub]" = weakref.WeakSet()


# (host, port, backend PID) of a pooled server connection -> the process ID pypool gave the client
# whose statements on it may have notified, until every listener has received what they committed.
_senders: dict[tuple[str, int, int], int] = {}
# How long a settling server connection waits for a listener before going back to its pool anyway.
SETTLE_WAIT = 5.0


def note_sender(server: ServerConnection, process_id: int) -> None:
    """A client's statement that may NOTIFY runs on ``server``: its notifications carry ``process_id``.

    Costs nothing while no listener hears that server. Otherwise the
    connection's next check-in waits for every such listener (``_settle``).
    """
    host, port = server.address.host, server.address.port
    if not any(hub.hears(host, port) for hub in list(_hubs)):
        return
    _senders[(host, port, server.backend_pid)] = process_id
    server.settle = _settle


def _settle(server: ServerConnection, checkin: Callable[[], None]) -> None:
    server.detach()  # relays nothing meanwhile; nobody else's statements run on it
    task = asyncio.get_running_loop().create_task(_settle_then(server, checkin))
    _SETTLING.add(task)
    task.add_done_callback(_SETTLING.discard)


_SETTLING: set[asyncio.Task[None]] = set()  # the loop keeps only weak references


def _report_barrier(server: ServerConnection, barrier: asyncio.Future[None]) -> None:
    if not barrier.cancelled() and barrier.exception() is not None:
        log.warning("a listener did not confirm the notifications of %s: %s", server.label, barrier.exception())


async def _settle_then(server: ServerConnection, checkin: Callable[[], None]) -> None:
    host, port = server.address.host, server.address.port
    try:
        # Never cancelled, not even past SETTLE_WAIT: a listener's conversation must not stop half-way.
        barriers = [asyncio.ensure_future(hub.barrier()) for hub in list(_hubs) if hub.hears(host, port)]
        for barrier in barriers:
            barrier.add_done_callback(lambda done: _report_barrier(server, done))
        if barriers:
            await asyncio.wait(barriers, timeout=SETTLE_WAIT)
    finally:
        _senders.pop((host, port, server.backend_pid), None)
        checkin()


def hub_for(group: "PoolGroup") -> ListenHub:
    hub = group.listen_hub
    if hub is None:
        hub = group.listen_hub = ListenHub(group)
        _hubs.add(hub)
    return hub
