"""A client's SCRAM login through ClientConnection, without sockets: what it sends, in how many writes.

The harness plays the client's side of SCRAM-SHA-256 (pypool.protocol.auth's
client session, as pypool uses it towards PostgreSQL) and records each
``transport.write`` separately, so the tests see how the replies are cut.
"""

from __future__ import annotations

import asyncio

from pypool import sqlstates
from pypool.client import ClientConnection
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.session.states import ClientState
from tests.unit._fakes import Recorder, primary_only_app

PASSWORD = "mysecretpassword"  # the default config's user "postgres"


class Writes(Recorder):
    """A client socket that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data) -> None:
        super().write(data)
        self.writes.append(bytes(data))


def messages(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, payload) of each backend message in ``data``."""
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        out.append((data[pos], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


async def settle(transport: Writes, count: int) -> None:
    """Run the login coroutine until the transport has ``count`` writes or is closed."""
    for _ in range(100):
        if len(transport.writes) >= count or transport.closed:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"pypool did not write {count} times: {transport.writes!r}")


async def scram_login(app, params: dict[str, str]) -> tuple[ClientConnection, Writes]:
    """Log in as "postgres" with SCRAM; returns the connection and its transport once the last reply is in."""
    conn, transport = ClientConnection(app), Writes()
    conn.connection_made(transport)
    conn.data_received(m.startup_message({"user": "postgres", "database": "postgres", **params}))
    await settle(transport, 1)
    scram = auth.ScramClientSession("postgres", PASSWORD)
    conn.data_received(m.sasl_initial_response(auth.SCRAM_SHA_256, scram.client_first()))
    await settle(transport, 2)
    (tag, payload), = messages(transport.writes[1])
    assert tag == m.AUTHENTICATION and int.from_bytes(payload[:4], "big") == m.AUTH_SASL_CONTINUE
    conn.data_received(m.sasl_response(scram.handle_server_first(payload[4:])))
    await settle(transport, 3)
    for _ in range(10):  # a refusal closes the connection right behind its last write
        await asyncio.sleep(0)
    return conn, transport


def statuses(greeting: bytes) -> dict[str, str]:
    return dict(m.parse_parameter_status(payload) for tag, payload in messages(greeting) if tag == m.PARAMETER_STATUS)


def greeting(transport: Writes) -> dict[str, str]:
    """The ParameterStatus set of the greeting, however the replies after the SASL exchange were cut."""
    return statuses(b"".join(transport.writes[2:]))


def test_scram_login_answers_each_client_message_with_one_write():
    """SASLFinal, AuthenticationOk, the ParameterStatus set, BackendKeyData and ReadyForQuery: one write."""
    async def scenario() -> None:
        app = primary_only_app()
        app.groups[("postgres", "postgres", 0)].server_parameters = {"server_version": "15.0", "TimeZone": "UTC"}
        conn, transport = await scram_login(app, {"application_name": "psql"})
        assert conn.session.state is ClientState.IDLE
        assert len(transport.writes) == 3, "one write per round trip"
        tags = [(tag, payload[:4]) for tag, payload in messages(transport.writes[2])]
        assert tags[0] == (m.AUTHENTICATION, m.AUTH_SASL_FINAL.to_bytes(4, "big"))
        assert tags[1] == (m.AUTHENTICATION, m.AUTH_OK.to_bytes(4, "big"))
        assert [tag for tag, _ in tags[2:]] == [m.PARAMETER_STATUS] * 3 + [m.BACKEND_KEY_DATA, m.READY_FOR_QUERY]
        assert statuses(transport.writes[2]) == {"server_version": "15.0", "TimeZone": "UTC",
                                                 "application_name": "psql"}

    asyncio.run(scenario())


def test_a_refusal_after_the_password_comes_after_the_sasl_final():
    """Authenticated, then refused (max_client_connections): SASLFinal first, then the FATAL, as PostgreSQL."""
    async def scenario() -> None:
        app = primary_only_app(user_keys={"max_client_connections": 1})
        app.groups[("postgres", "postgres", 0)].server_parameters = {"server_version": "15.0"}
        first, _ = await scram_login(app, {})
        assert first.session.state is ClientState.IDLE
        second, transport = await scram_login(app, {})
        replies = messages(b"".join(transport.writes[2:]))
        assert [tag for tag, _ in replies] == [m.AUTHENTICATION, m.ERROR_RESPONSE]
        assert int.from_bytes(replies[0][1][:4], "big") == m.AUTH_SASL_FINAL
        assert m.parse_error_fields(replies[1][1])["C"] == sqlstates.TOO_MANY_CONNECTIONS
        assert second.session.state is ClientState.CLOSED and transport.closed

    asyncio.run(scenario())


def test_the_greeting_follows_each_clients_settings_and_the_servers_parameters():
    """The encoded ParameterStatus set is kept per pool and client settings: never another client's or stale."""
    async def scenario() -> None:
        app = primary_only_app()
        group = app.groups[("postgres", "postgres", 0)]
        group.server_parameters = {"server_version": "15.0"}
        _, a = await scram_login(app, {"application_name": "a"})
        _, b = await scram_login(app, {"application_name": "b"})
        _, a_again = await scram_login(app, {"application_name": "a"})
        assert greeting(a) == greeting(a_again) == {"server_version": "15.0", "application_name": "a"}
        assert greeting(b)["application_name"] == "b"
        group.server_parameters = {"server_version": "15.1"}  # as a reload that learnt them again would
        _, after = await scram_login(app, {"application_name": "a"})
        assert greeting(after)["server_version"] == "15.1"

    asyncio.run(scenario())


def test_a_wrong_password_is_refused_with_28P01_and_nothing_held_back():
    async def scenario() -> None:
        app = primary_only_app()
        conn, transport = ClientConnection(app), Writes()
        conn.connection_made(transport)
        conn.data_received(m.startup_message({"user": "postgres", "database": "postgres"}))
        await settle(transport, 1)
        scram = auth.ScramClientSession("postgres", "not the password")
        conn.data_received(m.sasl_initial_response(auth.SCRAM_SHA_256, scram.client_first()))
        await settle(transport, 2)
        (_, payload), = messages(transport.writes[1])
        conn.data_received(m.sasl_response(scram.handle_server_first(payload[4:])))
        await settle(transport, 3)
        (tag, error), = messages(transport.writes[2])
        assert tag == m.ERROR_RESPONSE and m.parse_error_fields(error)["C"] == sqlstates.INVALID_PASSWORD
        assert len(transport.writes) == 3 and conn.session.state is ClientState.CLOSED

    asyncio.run(scenario())
