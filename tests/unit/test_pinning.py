"""Session pinning fed bytes without sockets: which statements pin, what the catalogs decide, the cap.

A real ClientSession (its IO recorded), real ServerConnection/PoolGroup objects with recording
transports (tests/unit/_fakes.py); the server's replies, the catalog check's
included, are fed as bytes, whole and one byte at a time.
"""

from __future__ import annotations

import asyncio

import pytest

from pypool.app import Application
from pypool.session.session import ClientSession
from pypool.pool.server import ServerConnection
from pypool.protocol import messages as m
from pypool.session import session_state as session
from pypool.session import states
from pypool.session.states import ClientState, IllegalTransition
from pypool.snapshot import take
from tests.unit._fakes import feed, idle_server, logged_in, logged_in_client


def setup(pool_size: int = 4, **pool: object) -> tuple[ClientSession, ServerConnection, Application]:
    return logged_in(pool_size=pool_size, **pool)


def done(tag: str, status: bytes = b"I") -> bytes:
    return m.command_complete(tag) + m.ready_for_query(status)


def catalogs(temp: int = 0, cursors: int = 0, prepared: int = 0, locks: int = 0) -> bytes:
    """The server's answer to PINNED_STATE_QUERY."""
    return (m.row_description(["a", "b", "c", "d"]) + m.data_row([temp, cursors, prepared, locks])
            + done("SELECT 1"))


async def run_transaction(client, server, sql: str, reply: bytes, drip: bool, check: bytes | None) -> bytes:
    """``sql`` from the client, ``reply`` from the server, then (if asked) the catalog check's answer."""
    feed(client, m.query(sql), drip)
    sent = server.transport.take()
    assert sent.startswith(m.query(sql)[:1])
    feed(server, reply, drip)
    if check is not None:
        assert client.state is ClientState.CHECKING_PIN
        await asyncio.sleep(0)
        assert server.transport.take() == m.query(session.PINNED_STATE_QUERY)
        feed(server, check, drip)
        for _ in range(3):
            await asyncio.sleep(0)
    return client.io.take()


@pytest.mark.parametrize("drip", [False, True])
def test_a_temporary_table_pins_the_client_until_the_catalogs_say_it_is_gone(drip):
    async def scenario() -> None:
        client, server, app = setup()
        group = client.group
        got = await run_transaction(client, server, "CREATE TEMP TABLE t (id int)", done("CREATE TABLE"), drip,
                                    catalogs(temp=1))
        # The ReadyForQuery is relayed only once pypool knows where the next transaction runs.
        assert got == done("CREATE TABLE")
        assert client.state is ClientState.PINNED and client.server is server and server.client is client
        assert group.pinned == 1 and server not in server.pool.idle
        assert [row.pinned for row in take(app).clients] == ["a temporary object that outlives its transaction"]
        assert take(app).pools[0].pinned == 1
        # Plain transactions of a pinned client: straight to its connection, no catalog check.
        got = await run_transaction(client, server, "SELECT * FROM t", done("SELECT 0"), drip, None)
        assert got == done("SELECT 0") and client.state is ClientState.PINNED
        assert server.transport.take() == b""
        # A DROP may release it: the catalogs are asked again, and say nothing is left.
        got = await run_transaction(client, server, "DROP TABLE t", done("DROP TABLE"), drip, catalogs())
        assert got == done("DROP TABLE")
        assert client.state is ClientState.IDLE and client.server is None
        assert group.pinned == 0 and server in server.pool.idle and client.pin_reason is None

    asyncio.run(scenario())


def test_state_that_a_rollback_undid_does_not_pin():
    async def scenario() -> None:
        client, server, _ = setup()
        await run_transaction(client, server, "BEGIN", done("BEGIN", b"T"), False, None)
        await run_transaction(client, server, "CREATE TEMP TABLE t (id int)", done("CREATE TABLE", b"T"), False,
                              None)
        assert client.state is ClientState.ATTACHED, "inside its transaction: attached as always"
        await run_transaction(client, server, "ROLLBACK", done("ROLLBACK"), False, catalogs())
        assert client.state is ClientState.IDLE and client.group.pinned == 0

    asyncio.run(scenario())


def test_a_pinned_client_stays_pinned_while_something_is_left():
    async def scenario() -> None:
        client, server, _ = setup()
        await run_transaction(client, server, "SELECT pg_advisory_lock(1)", done("SELECT 1"), False,
                              catalogs(locks=1))
        await run_transaction(client, server, "SELECT pg_advisory_lock(2)", done("SELECT 1"), False, None)
        await run_transaction(client, server, "SELECT pg_advisory_unlock(1)", done("SELECT 1"), False,
                              catalogs(locks=1))
        assert client.state is ClientState.PINNED and client.server is server
        await run_transaction(client, server, "SELECT pg_advisory_unlock_all()", done("SELECT 1"), False,
                              catalogs())
        assert client.state is ClientState.IDLE

    asyncio.run(scenario())


def test_beyond_max_pinned_connections_the_statement_is_refused_with_0A000():
    async def scenario() -> None:
        first, server, app = setup(pool_size=4, max_pinned_connections=1)
        await run_transaction(first, server, "CREATE TEMP TABLE t (id int)", done("CREATE TABLE"), False,
                              catalogs(temp=1))
        other_server = idle_server(app.groups[("postgres", "postgres", 0)].primary)
        second = logged_in_client(app)
        second.data_received(m.query("CREATE TEMP TABLE t (id int)"))
        sent = other_server.transport.take()
        assert b"0A000" in sent and b"max_pinned_connections (1)" in sent and b"CREATE TEMP" not in sent
        assert second.pin_reason is None

    asyncio.run(scenario())


def test_session_pinning_refuse_keeps_the_refusal():
    client, server, _ = setup(session_pinning="refuse")
    client.data_received(m.query("DECLARE c CURSOR WITH HOLD FOR SELECT 1"))
    sent = server.transport.take()
    assert b"0A000" in sent and b"WITH HOLD" in sent and b"max_pinned" not in sent
    assert client.pin_reason is None and client.group.pinned == 0


def test_resets_run_as_sent():
    client, server, _ = setup()
    reset = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"
    client.data_received(m.query(reset))
    assert server.transport.take() == m.query(reset)
    assert client.pin_reason is None, "releasing statements of an unpinned client ask nothing"


def test_a_pinned_client_that_leaves_has_its_connection_reset_not_shared():
    async def scenario() -> None:
        client, server, _ = setup()
        await run_transaction(client, server, "PREPARE p AS SELECT 1", done("PREPARE"), False,
                              catalogs(prepared=1))
        client.close()
        await asyncio.sleep(0)
        assert server.transport.take() == m.query("DISCARD ALL")
        assert server not in server.pool.idle and client.group.pinned == 0

    asyncio.run(scenario())


def test_pinned_is_reached_only_through_the_catalog_check():
    client, _, _ = setup()
    with pytest.raises(IllegalTransition):
        client.set_state(ClientState.PINNED)
    assert ClientState.PINNED.shown == "active" and ClientState.CHECKING_PIN.shown == "active"
    assert set(ClientState.PINNED.may_become) == {ClientState.CHECKING_PIN, ClientState.WAITING_FOR_LISTENER,
                                                  ClientState.CLOSED}


def test_max_pinned_connections_defaults_to_half_the_pool():
    assert setup(pool_size=10)[2].groups[("postgres", "postgres", 0)].max_pinned == 5
    assert setup(pool_size=1)[2].groups[("postgres", "postgres", 0)].max_pinned == 1
    assert setup(pool_size=10, max_pinned_connections=3)[2].groups[("postgres", "postgres", 0)].max_pinned == 3


@pytest.mark.parametrize("drip", [False, True])
def test_a_reset_restores_the_startup_values_before_the_ready_for_query(drip):
    async def scenario() -> None:
        client, server, _ = setup()
        client._startup_settings = {"application_name": "startup-name"}
        client._set_settings({})
        server.applied_parameters = {"application_name": "startup-name"}  # set up for this client already
        server.applied_key = client._parameters_key
        feed(client, m.query("RESET ALL"), drip)
        assert server.transport.take() == m.query("RESET ALL")
        # The pooled server's own default comes back first (PostgreSQL would keep the startup value).
        feed(server, m.parameter_status("application_name", "") + done("RESET"), drip)
        assert client.io.take() == m.parameter_status("application_name", "") + m.command_complete("RESET")
        assert client.state is ClientState.READING_BACK
        await asyncio.sleep(0)
        assert server.transport.take() == m.query(session.SETTINGS_QUERY)
        feed(server, m.row_description(["name", "setting"]) + done("SELECT 0"), drip)
        await asyncio.sleep(0)
        assert b"set_config('application_name', 'startup-name', false)" in server.transport.take()
        feed(server, m.parameter_status("application_name", "startup-name") + m.row_description(["set_config"])
             + m.data_row(["startup-name"]) + done("SELECT 1"), drip)
        for _ in range(3):
            await asyncio.sleep(0)
        assert client.io.take() == m.parameter_status("application_name", "startup-name") \
            + m.ready_for_query()
        assert client.state is ClientState.IDLE and server in server.pool.idle
        assert server.applied_key == client._parameters_key, "the connection carries the client's settings"

    asyncio.run(scenario())


def test_a_request_sent_during_the_catalog_check_runs_on_the_pinned_connection_after_it():
    async def scenario() -> None:
        client, server, _ = setup()
        client.data_received(m.query("DECLARE c CURSOR WITH HOLD FOR SELECT 1"))
        server.transport.take()
        server.data_received(done("DECLARE CURSOR"))
        assert client.state is states.CHECKING_PIN
        client.data_received(m.query("FETCH c"))  # pipelined before the ReadyForQuery arrived
        await asyncio.sleep(0)
        assert server.transport.take() == m.query(session.PINNED_STATE_QUERY), "not mixed into the check"
        server.data_received(catalogs(cursors=1))
        for _ in range(3):
            await asyncio.sleep(0)
        assert client.state is states.PINNED
        assert server.transport.take() == m.query("FETCH c")
        assert client.io.take() == done("DECLARE CURSOR")

    asyncio.run(scenario())
