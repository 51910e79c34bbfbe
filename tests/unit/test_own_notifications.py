"""A listening client's own NOTIFY, without sockets: its notification comes before the ReadyForQuery
that ends the transaction, with the process ID pypool gave the client (pypool/session/effects.py)."""

from __future__ import annotations

import asyncio

from pypool import listen
from pypool.protocol import messages as m
from pypool.session.prepared import ClientStatements
from pypool.session.states import ClientState
from tests.unit._fakes import idle_server, logged_in_client, primary_only_app

CLIENT_PID = 4242
BACKEND_PID = 777


class FakeListenerConnection:
    """The pool's listener connection: a round trip (the barrier) hands out what it has received."""

    closed = False

    def __init__(self, hub: listen.ListenHub, address) -> None:
        self.hub = hub
        self.address = address
        self.arrived: list[tuple[str, bytes]] = []
        self.round_trips = 0

    async def query(self, sql: str) -> list:
        self.round_trips += 1
        await asyncio.sleep(0)
        for channel, message in self.arrived:
            self.hub.deliver(channel, message)
        self.arrived.clear()
        return []


def notification(pid: int, channel: bytes, payload: bytes) -> bytes:
    return m.message(m.NOTIFICATION_RESPONSE, pid.to_bytes(4, "big") + channel + b"\0" + payload + b"\0")


async def settle() -> None:
    """Let the tasks run until they wait for nothing but each other (a bounded number of turns)."""
    for _ in range(50):
        await asyncio.sleep(0)


def setup():
    app = primary_only_app(pool_size=2)
    group = app.groups[("postgres", "postgres", 0)]
    server = idle_server(group.primary)
    server.backend_pid = BACKEND_PID
    client = logged_in_client(app)
    client.statements = ClientStatements()
    client.process_id = CLIENT_PID
    # The pool's real hub, its listener connection faked; the client listens on "own".
    hub = listen.hub_for(group)
    listener = hub._conn = FakeListenerConnection(hub, group.primary.address)
    hub.channels["own"] = {client}
    client._hub = hub
    return client, server, listener


def test_own_notify_comes_before_the_ready_for_query_with_the_clients_pid():
    async def scenario() -> None:
        client, server, listener = setup()
        client.data_received(m.query("NOTIFY own, 'x'"))
        assert client.server is server and client.own_notify_pid == BACKEND_PID
        server.transport.take()
        # The server answers before the listener connection has the notification.
        server.data_received(m.command_complete("NOTIFY") + m.ready_for_query())
        assert client.io.take() == m.command_complete("NOTIFY"), "ReadyForQuery waits for the listener"
        assert client.state is ClientState.WAITING_FOR_LISTENER
        listener.arrived.append(("own", notification(BACKEND_PID, b"own", b"x")))
        await settle()
        assert client.io.take() == notification(CLIENT_PID, b"own", b"x") + m.ready_for_query()
        assert client.state is ClientState.IDLE and client.own_notify_pid == 0
        assert server in server.pool.idle, "the server connection went back to its pool"

    asyncio.run(scenario())


def test_inside_a_transaction_only_its_end_waits():
    async def scenario() -> None:
        client, server, listener = setup()
        client.data_received(m.query("BEGIN; SELECT pg_notify('own', 'y')"))
        server.data_received(m.command_complete("SELECT 1") + m.ready_for_query(b"T"))
        assert client.io.take().endswith(m.ready_for_query(b"T"))
        assert listener.round_trips == 0
        client.data_received(m.query("COMMIT"))
        server.data_received(m.command_complete("COMMIT") + m.ready_for_query())
        listener.arrived.append(("own", notification(BACKEND_PID, b"own", b"y")))
        await settle()
        # One round trip before its ReadyForQuery, one before its server connection goes back.
        assert listener.round_trips == 2 and server in server.pool.idle
        assert client.io.take() == (m.command_complete("COMMIT") + notification(CLIENT_PID, b"own", b"y")
                                           + m.ready_for_query())

    asyncio.run(scenario())


def test_a_client_that_does_not_notify_is_answered_at_once():
    client, server, listener = setup()
    client.data_received(m.query("SELECT 1"))
    server.data_received(m.command_complete("SELECT 1") + m.ready_for_query())
    assert client.io.take() == m.command_complete("SELECT 1") + m.ready_for_query()
    assert client.state is ClientState.IDLE and listener.round_trips == 0
    # Someone else's notification keeps its sender's PID.
    client.deliver_notification(notification(BACKEND_PID, b"own", b"z"))
    assert client.io.take() == notification(BACKEND_PID, b"own", b"z")


def test_another_clients_notify_carries_the_pid_pypool_gave_it():
    async def scenario() -> None:
        listening, server, listener = setup()
        sender = logged_in_client(listening.app)
        sender.process_id = 5151
        sender.data_received(m.query("NOTIFY own, 'from the sender'"))
        assert sender.server is server
        server.data_received(m.command_complete("NOTIFY") + m.ready_for_query())
        # The sender is answered at once; its server connection waits for the listener first.
        assert sender.io.take() == m.command_complete("NOTIFY") + m.ready_for_query()
        assert sender.state is ClientState.IDLE and server not in server.pool.idle
        listener.arrived.append(("own", notification(BACKEND_PID, b"own", b"from the sender")))
        await settle()
        assert listening.io.take() == notification(5151, b"own", b"from the sender")
        assert server in server.pool.idle and listener.round_trips == 1
        # Back in the pool, the backend is nobody's: a notification from it keeps the server's PID.
        listener.arrived.append(("own", notification(BACKEND_PID, b"own", b"trigger")))
        await listen.hub_for(listening.group).barrier()
        assert listening.io.take() == notification(BACKEND_PID, b"own", b"trigger")

    asyncio.run(scenario())
