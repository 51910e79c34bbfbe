"""ClientConnection, the asyncio adapter around a ClientSession, without sockets.

A Recorder (or one end of a socketpair) stands in for the client; the login
runs as a coroutine on the event loop (trust authentication), then the
client's bytes reach the session with no layer of the adapter in between.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from pypool.client import ClientConnection
from pypool.protocol import messages as m
from pypool.session.states import ClientState
from tests.unit._fakes import Recorder, idle_server, primary_only_app

SELECT = m.query("SELECT 1")
REPLY = m.row_description(["x"]) + m.data_row([1]) + m.command_complete("SELECT 1") + m.ready_for_query()


def test_after_login_the_clients_bytes_go_straight_to_its_session_and_replies_to_the_transport():
    async def scenario() -> None:
        app = primary_only_app(user_keys={"auth_type": "trust"})
        group = app.groups[("postgres", "postgres", 0)]
        group.server_parameters = {"server_version": "15.0"}  # as learnt from a first server connection
        server = idle_server(group.primary)
        conn = ClientConnection(app)
        transport = Recorder()
        conn.connection_made(transport)
        # A request sent right behind the startup packet waits for the login, then runs.
        conn.data_received(m.startup_message({"user": "postgres", "database": "postgres"}) + SELECT)
        session = conn.session
        for _ in range(100):  # the login coroutine's steps
            if session.state is ClientState.ATTACHED:
                break
            await asyncio.sleep(0)
        greeting = transport.take()
        assert greeting.startswith(m.authentication_ok()) and greeting.endswith(m.ready_for_query())
        assert session.state is ClientState.ATTACHED and session in app.clients
        assert conn.data_received == session.data_received, "no adapter call per read once logged in"
        assert server.transport.take() == SELECT
        server.data_received(REPLY)
        assert transport.take() == REPLY and session.state is ClientState.IDLE
        conn.connection_lost(None)
        assert session.state is ClientState.CLOSED and transport.closed and session not in app.clients
        assert server in server.pool.idle

    asyncio.run(scenario())


class CountingConnection(ClientConnection):
    """Counts the reads that go through the adapter's own ``data_received``."""

    adapter_reads = 0

    def data_received(self, data: bytes) -> None:
        self.adapter_reads += 1
        super().data_received(data)


async def until(condition) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the client did not get there")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_once_logged_in_the_event_loop_calls_the_session_for_each_read(loop):
    """The relay's hot path has no adapter layer, also under uvloop (it keeps the method it was given)."""
    async def scenario() -> None:
        app = primary_only_app(user_keys={"auth_type": "trust"})
        group = app.groups[("postgres", "postgres", 0)]
        group.server_parameters = {"server_version": "15.0"}
        server = idle_server(group.primary)
        ours, theirs = socket.socketpair()
        conn = CountingConnection(app)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, ours)
        with theirs:
            theirs.sendall(m.startup_message({"user": "postgres", "database": "postgres"}))
            await until(lambda: conn.session.state is ClientState.IDLE)
            logged_in_after = conn.adapter_reads
            for _ in range(3):
                theirs.sendall(SELECT)
                await until(lambda: conn.session.server is server)
                assert server.transport.take() == SELECT
                server.data_received(REPLY)
            assert conn.session.query_count == 3
            assert conn.adapter_reads == logged_in_after, "each read went through the adapter"
            conn.transport.close()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())
