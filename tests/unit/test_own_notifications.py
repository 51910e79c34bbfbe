"""A listening client's own NOTIFY, without sockets: its notification comes before the ReadyForQuery
that ends the transaction, with the process ID pypool gave the client (pypool/session/effects.py)."""

from __future__ import annotations

import asyncio

from pypool.protocol import messages as m
from pypool.session.prepared import ClientStatements
from pypool.session.states import ClientState
from tests.unit._fakes import idle_server, logged_in_client, primary_only_app

CLIENT_PID = 4242
BACKEND_PID = 777


class FakeHub:
    """The pool's listener: the barrier hands out what the listener connection has received."""

    def __init__(self) -> None:
        self.arrived: list[bytes] = []
        self.clients = []
        self.barriers = 0

    def is_listening(self, client, channel: str) -> bool:
        return True

    async def barrier(self) -> None:
        self.barriers += 1
        await asyncio.sleep(0)
        for message in self.arrived:
            for client in self.clients:
                client.deliver_notification(message)
        self.arrived.clear()


def notification(pid: int, channel: bytes, payload: bytes) -> bytes:
    return m.message(m.NOTIFICATION_RESPONSE, pid.to_bytes(4, "big") + channel + b"\0" + payload + b"\0")


async def settle() -> None:
    """Let the tasks run until they wait for nothing but each other (a bounded number of turns)."""
    for _ in range(50):
        await asyncio.sleep(0)


def setup():
    app = primary_only_app()
    server = idle_server(app.groups[("postgres", "postgres", 0)].primary)
    server.backend_pid = BACKEND_PID
    client = logged_in_client(app)
    client.statements = ClientStatements()
    client.process_id = CLIENT_PID
    hub = FakeHub()
    hub.clients.append(client)
    client._hub = hub
    client._needs_care = client._needs_care_listening
    return client, server, hub


def test_own_notify_comes_before_the_ready_for_query_with_the_clients_pid():
    async def scenario() -> None:
        client, server, hub = setup()
        client.data_received(m.query("NOTIFY own, 'x'"))
        assert client.server is server and client.own_notify_pid == BACKEND_PID
        server.transport.take()
        # The server answers before the listener connection has the notification.
        server.data_received(m.command_complete("NOTIFY") + m.ready_for_query())
        assert client.io.take() == m.command_complete("NOTIFY"), "ReadyForQuery waits for the listener"
        assert client.state is ClientState.WAITING_FOR_LISTENER
        hub.arrived.append(notification(BACKEND_PID, b"own", b"x"))
        await settle()
        assert client.io.take() == notification(CLIENT_PID, b"own", b"x") + m.ready_for_query()
        assert client.state is ClientState.IDLE and client.own_notify_pid == 0
        assert server in server.pool.idle, "the server connection went back to its pool"

    asyncio.run(scenario())


def test_inside_a_transaction_only_its_end_waits():
    async def scenario() -> None:
        client, server, hub = setup()
        client.data_received(m.query("BEGIN; SELECT pg_notify('own', 'y')"))
        server.data_received(m.command_complete("SELECT 1") + m.ready_for_query(b"T"))
        assert client.io.take().endswith(m.ready_for_query(b"T"))
        assert hub.barriers == 0
        client.data_received(m.query("COMMIT"))
        server.data_received(m.command_complete("COMMIT") + m.ready_for_query())
        hub.arrived.append(notification(BACKEND_PID, b"own", b"y"))
        await settle()
        assert hub.barriers == 1
        assert client.io.take() == (m.command_complete("COMMIT") + notification(CLIENT_PID, b"own", b"y")
                                           + m.ready_for_query())

    asyncio.run(scenario())


def test_a_client_that_does_not_notify_is_answered_at_once():
    client, server, hub = setup()
    client.data_received(m.query("SELECT 1"))
    server.data_received(m.command_complete("SELECT 1") + m.ready_for_query())
    assert client.io.take() == m.command_complete("SELECT 1") + m.ready_for_query()
    assert client.state is ClientState.IDLE and hub.barriers == 0
    # Someone else's notification keeps its sender's PID.
    client.deliver_notification(notification(BACKEND_PID, b"own", b"z"))
    assert client.io.take() == notification(BACKEND_PID, b"own", b"z")
