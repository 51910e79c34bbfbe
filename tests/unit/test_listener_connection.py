"""The pool's listener connection, without sockets: every notification it receives is handed out,
also one that arrives in the same read as the ReadyForQuery ending one of its own round trips."""

from __future__ import annotations

import asyncio

from pypool.pool.server import Credentials, ServerConnection
from pypool.protocol import messages as m
from tests.unit._fakes import Recorder, primary_only_app


class RecordingHub:
    """What a LISTEN hub is handed (``ServerConnection.on_notification``): each NotificationResponse."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []

    def notification(self, payload: bytes) -> None:
        channel, _ = m.read_cstring(payload, 4)
        self.delivered.append((channel, m.message(m.NOTIFICATION_RESPONSE, payload)))


def notification(pid: int, channel: bytes, payload: bytes) -> bytes:
    return m.message(m.NOTIFICATION_RESPONSE, pid.to_bytes(4, "big") + channel + b"\0" + payload + b"\0")


def listener_connection() -> tuple[ServerConnection, RecordingHub]:
    group = primary_only_app().groups[("postgres", "postgres", 0)]
    conn = ServerConnection(group.primary.address, Credentials("postgres", "x", "postgres"))
    conn.transport = Recorder()
    hub = RecordingHub()
    conn.on_notification = hub.notification  # as ListenHub sets it on its listener connection
    return conn, hub


def test_a_notification_read_with_the_ready_for_query_is_handed_out():
    async def scenario() -> None:
        conn, hub = listener_connection()
        barrier = asyncio.ensure_future(conn.query(""))
        await asyncio.sleep(0)
        assert bytes(conn.transport.data) == m.query("")
        # Another backend's NOTIFY lands right after the round trip's reply, in one read.
        outside = notification(4321, b"ipc", b"outside")
        conn.data_received(m.empty_query_response() + m.ready_for_query() + outside)
        assert await barrier == []
        assert hub.delivered == [("ipc", outside)]

    asyncio.run(scenario())


def test_notifications_before_and_after_a_round_trip_are_handed_out_in_order():
    async def scenario() -> None:
        conn, hub = listener_connection()
        first, second, third = (notification(1, b"c", str(i).encode()) for i in range(3))
        conn.data_received(first)  # idle: handed out at once
        barrier = asyncio.ensure_future(conn.query(""))
        await asyncio.sleep(0)
        conn.data_received(second + m.empty_query_response() + m.ready_for_query() + third)
        await barrier
        assert [message for _, message in hub.delivered] == [first, second, third]

    asyncio.run(scenario())
