"""The session machine fed bytes without sockets: states, the frame walker, request tracking, the relay.

A real ClientSession whose outside world is a RecordingIO (tests/unit/_fakes.py),
real ServerConnection/PoolGroup objects with recording transports; every
stream is also fed one byte at a time, the worst split a TCP read can
produce. Tests not marked otherwise run no event loop: the session's relay,
checkout and check-in need none.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypool.app import Application
from pypool import sqlstates
from pypool.pool.server import ACTIVE, IDLE
from pypool.protocol import messages as m
from pypool.protocol.frames import ALL_TAGS, FrameWalker, ProtocolViolation, tag_table
from pypool.session import session_state
from pypool.session.prepared import ClientStatements
from pypool.session.states import ClientState, IllegalTransition
from pypool.session.tracker import RequestTracker
from pypool.snapshot import take
from tests.unit._fakes import feed, logged_in, logged_in_client


SELECT = m.query("SELECT 1")
REPLY = m.row_description(["x"]) + m.data_row([1]) + m.command_complete("SELECT 1") + m.ready_for_query()
PARSE = m.message(m.PARSE, b"\0SELECT 1\0\0\0")
BIND = m.message(m.BIND, b"\0\0\0\0\0\0\0\0")
EXECUTE = m.message(m.EXECUTE, b"\0\0\0\0\0")
SYNC = m.message(m.SYNC)


def shown_state(app: Application) -> str:
    (row,) = [c for c in take(app).clients]
    return row.state


# ------------------------------------------------------------------ the relay


@pytest.mark.parametrize("drip", [False, True])
def test_a_query_goes_out_and_its_reply_back_then_the_server_returns_to_the_pool(drip):
    client, server, app = logged_in()
    feed(client, SELECT, drip)
    assert client.state is ClientState.ATTACHED and client.server is server
    assert server.state == ACTIVE and shown_state(app) == "active"
    assert server.transport.take() == SELECT
    feed(server, REPLY, drip)
    assert client.io.take() == REPLY
    assert client.state is ClientState.IDLE and client.server is None
    assert server.state == IDLE and server in server.pool.idle
    assert shown_state(app) == "idle"
    assert (client.query_count, client.xact_count) == (1, 1)


@pytest.mark.parametrize("drip", [False, True])
def test_an_extended_batch_stays_attached_until_its_last_sync_is_answered(drip):
    client, server, _ = logged_in()
    batch = PARSE + BIND + EXECUTE + SYNC + BIND + EXECUTE + SYNC
    feed(client, batch, drip)
    assert server.transport.take() == batch
    assert server.requests.owed == 2
    first = m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + m.command_complete("SELECT 1") \
        + m.ready_for_query()
    feed(server, first, drip)
    assert client.server is server, "one Sync is still unanswered"
    second = m.message(m.BIND_COMPLETE) + m.command_complete("SELECT 1") + m.ready_for_query()
    feed(server, second, drip)
    assert client.io.take() == first + second
    assert client.server is None and client.state is ClientState.IDLE


@pytest.mark.parametrize("drip", [False, True])
def test_an_open_transaction_keeps_the_server_and_counts_as_in_transaction(drip):
    client, server, _ = logged_in()
    feed(client, m.query("BEGIN"), drip)
    feed(server, m.command_complete("BEGIN") + m.ready_for_query(b"T"), drip)
    assert client.server is server and client.in_transaction
    assert server.requests.idle_in_transaction, "the idle-in-transaction reaper's question"
    feed(client, m.query("COMMIT"), drip)
    assert client.in_transaction and not server.requests.idle_in_transaction
    feed(server, m.command_complete("COMMIT") + m.ready_for_query(), drip)
    assert client.server is None and not client.in_transaction


@pytest.mark.parametrize("drip", [False, True])
def test_a_second_request_arriving_with_the_reply_waits_for_the_next_checkout(drip):
    client, server, _ = logged_in()
    feed(client, SELECT, drip)
    server.transport.take()
    feed(server, REPLY, drip)
    # The next request after the connection went back: checked out again, forwarded whole.
    feed(client, SELECT + SELECT, drip)
    assert server.transport.take() == SELECT + SELECT
    assert server.requests.owed == 2


def test_terminate_closes_the_client_and_returns_a_clean_server():
    client, server, app = logged_in()
    feed(client, SELECT, False)
    feed(server, REPLY, False)
    client.data_received(m.terminate())
    assert client.state is ClientState.CLOSED and client.io.closed
    assert server.state == IDLE and not server.closed


def test_leaving_mid_transaction_closes_the_server_connection():
    client, server, app = logged_in()
    feed(client, m.query("BEGIN"), False)
    feed(server, m.command_complete("BEGIN") + m.ready_for_query(b"T"), False)
    pool = server.pool
    client.close()
    assert client.state is ClientState.CLOSED and client.io.closed
    assert server.closed and server.pool is None, "checked in dirty: its transaction cannot be trusted"
    assert server not in pool.idle and client not in app.clients


@pytest.mark.parametrize("drip", [False, True])
def test_leaving_in_the_middle_of_a_batch_checks_the_server_in_dirty(drip):
    client, server, _ = logged_in()
    feed(client, PARSE + BIND + EXECUTE, drip)  # no Sync yet: the server owes the batch its replies
    assert client.in_transaction
    pool = server.pool
    client.close()
    assert server.closed and server not in pool.idle


def test_leaving_between_transactions_returns_the_server_clean():
    client, server, app = logged_in()
    feed(client, SELECT, False)
    feed(server, REPLY, False)
    client.close()
    assert client.io.closed and client not in app.clients
    assert not server.closed and server in server.pool.idle


@pytest.mark.parametrize("drip", [False, True])
def test_an_error_pypool_answers_discards_the_rest_of_the_batch_until_its_sync(drip, monkeypatch):
    client, server, _ = logged_in()
    monkeypatch.setattr(client.group, "primary", None)  # no primary known: the checkout fails at once
    feed(client, PARSE + BIND, drip)
    error = client.io.take()
    assert error == m.error_response(sqlstates.CONNECTION_FAILURE, f"pool {client.group.label} has no primary server")
    assert client.error_count == 1 and client.state is ClientState.IDLE
    feed(client, EXECUTE + SYNC, drip)  # the rest of the failed batch: dropped, its Sync answered
    assert client.io.take() == m.ready_for_query()
    assert server.transport.take() == b"" and client.state is ClientState.IDLE
    monkeypatch.undo()
    feed(client, SELECT, drip)  # the next request runs as usual
    assert server.transport.take() == SELECT and client.server is server


def test_an_impossible_length_is_a_protocol_violation_and_closes_the_client():
    client, server, _ = logged_in()
    client.data_received(b"Q\x00\x00\x00\x02")
    assert client.state is ClientState.CLOSED
    assert b"08P01" in client.io.take()


def test_a_full_pool_queues_the_client_as_waiting_until_the_connection_comes_back():
    async def scenario() -> None:
        first, server, app = logged_in()
        second = logged_in_client(app)
        first.data_received(SELECT)
        second.data_received(SELECT)
        assert second.state is ClientState.WAITING and second.server is None
        states = {row.state for row in take(app).clients}
        assert states == {"active", "waiting"}
        await asyncio.sleep(0.02)
        server.data_received(REPLY)
        await asyncio.sleep(0)  # the pool calls the waiter back from the event loop
        assert second.state is ClientState.ATTACHED and second.server is server
        assert server.transport.take() == SELECT + SELECT
        # SHOW CLIENTS' maxwait: the longest wait, and no wait going on any more
        assert second.max_wait >= 0.02 and second.wait_started == 0.0
        assert first.max_wait == 0.0

    asyncio.run(scenario())


def test_reading_back_settings_shows_the_client_active_and_its_server_tested():
    async def scenario() -> None:
        client, server, app = logged_in()
        client.statements = ClientStatements()  # transaction mode: SET is noted
        client.data_received(m.query("SET application_name = 'reader'"))
        server.transport.take()
        server.data_received(m.command_complete("SET") + m.ready_for_query())
        assert client.state is ClientState.READING_BACK and client.server is None
        snap = take(app)
        assert [c.state for c in snap.clients] == ["active"], "not 'waiting': nothing waits for a server"
        assert [s.state for s in snap.servers] == ["tested"], "pypool itself holds the server"
        await asyncio.sleep(0)
        assert server.transport.take() == m.query(session_state.SETTINGS_QUERY)
        server.data_received(m.row_description(["name", "setting"]) + m.data_row(["application_name", "reader"])
                             + m.command_complete("SELECT 1") + m.ready_for_query())
        for _ in range(5):
            await asyncio.sleep(0)
        assert client.state is ClientState.IDLE and server.state == IDLE and server in server.pool.idle
        assert server.applied_parameters == {"application_name": "reader"}

    asyncio.run(scenario())


# ------------------------------------------------------------------ states


def test_states_change_only_along_the_transition_table():
    client, _, _ = logged_in()
    with pytest.raises(IllegalTransition):
        client.set_state(ClientState.READING_BACK)  # only a transaction that ran can be read back
    client.set_state(ClientState.CLOSED)
    with pytest.raises(IllegalTransition):
        client.set_state(ClientState.IDLE)


def test_every_state_has_a_pgbouncer_name_and_can_be_closed():
    for state in ClientState:
        assert state.shown in ("login", "active", "idle", "waiting", "closed")
        assert state is ClientState.CLOSED or ClientState.CLOSED in state.may_become


# ------------------------------------------------------------- frame walker

messages = st.lists(st.tuples(st.integers(65, 90), st.binary(max_size=40)), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(msgs=messages, data=st.data())
def test_the_walker_finds_every_message_whatever_the_chunking(msgs, data):
    stream = b"".join(m.message(tag, body) for tag, body in msgs)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=10))))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    walker = FrameWalker()
    seen = []
    for chunk in chunks:
        chunk, pos = walker.start(chunk)
        while True:
            pos, end = walker.next(chunk, pos, len(chunk), ALL_TAGS)
            if end < 0:
                break
            seen.append(chunk[pos])
            pos = end
    assert seen == [tag for tag, _ in msgs]
    assert not walker.mid_message


@settings(max_examples=100, deadline=None)
@given(msgs=messages)
def test_a_tag_wanted_whole_is_only_returned_whole(msgs):
    stream = b"".join(m.message(tag, body) for tag, body in msgs)
    walker = FrameWalker()
    whole = tag_table(range(65, 91))
    bodies = []
    for i in range(len(stream)):
        chunk, pos = walker.start(stream[i:i + 1])
        while True:
            pos, end = walker.next(chunk, pos, len(chunk), ALL_TAGS, whole)
            if end < 0:
                break
            assert end <= len(chunk)
            bodies.append(chunk[pos + 5:end])
            pos = end
    assert bodies == [body for _, body in msgs]


def test_the_walker_rejects_an_impossible_length():
    with pytest.raises(ProtocolViolation):
        FrameWalker(max_size=100).next(b"D\x00\x00\x01\x00", 0, 5, ALL_TAGS)


# ----------------------------------------------------------- request tracker


def test_the_tracker_counts_what_is_owed_and_answers_in_transaction():
    requests = RequestTracker()
    for tag in (m.PARSE, m.BIND, m.EXECUTE):
        requests.sent(tag)
    assert requests.batch_open and requests.in_transaction and requests.parse_rank == 1
    requests.sent(m.SYNC)
    assert requests.owed == 1 and not requests.batch_open
    assert requests.ready(ord("I")) and not requests.in_transaction


def test_syncs_sent_into_a_copy_from_stdin_get_no_ready_for_query():
    requests = RequestTracker()
    for tag in (m.PARSE, m.BIND, m.EXECUTE, m.SYNC):  # libpq: Sync right after Execute of COPY FROM STDIN
        requests.sent(tag)
    requests.sent(m.COPY_DATA)
    requests.sent(m.COPY_DONE)
    requests.sent(m.SYNC)
    assert requests.owed == 1
    assert requests.ready(ord("I"))


# ------------------------------------------------------------------ timing


class FakeClock:
    """Stands in for the server connection's clock: each read returns the time the test set."""

    def __init__(self, monkeypatch) -> None:
        self.now = 100.0
        monkeypatch.setattr("pypool.pool.server._monotonic", lambda: self.now)


def exchange(client, server, clock, request: bytes, at: float, reply: bytes, answered_at: float) -> None:
    clock.now = at
    client.data_received(request)
    clock.now = answered_at
    server.data_received(reply)


def test_requests_are_timed_from_their_first_message_to_their_last_reply(monkeypatch):
    client, server, _ = logged_in()
    clock = FakeClock(monkeypatch)
    in_transaction = m.command_complete("SELECT 1") + m.ready_for_query(b"T")
    exchange(client, server, clock, m.query("BEGIN"), 100.0, m.command_complete("BEGIN") + m.ready_for_query(b"T"),
             101.0)
    # The client thinks for two seconds: idle in transaction is transaction time, not query time.
    exchange(client, server, clock, SELECT, 103.0, in_transaction, 106.0)
    # Two statements in one write: one span, until the second is answered.
    exchange(client, server, clock, SELECT + SELECT, 110.0, in_transaction * 2, 112.0)
    exchange(client, server, clock, m.query("COMMIT"), 120.0, m.command_complete("COMMIT") + m.ready_for_query(),
             120.5)
    stats = server.stats
    assert client.state is ClientState.IDLE
    assert (stats.queries_timed, stats.query_time) == (4, 1.0 + 3.0 + 2.0 + 0.5)
    assert (sum(stats.xact_hist), stats.xact_time) == (1, 20.5)


def test_every_transaction_of_a_session_mode_client_is_timed(monkeypatch):
    client, server, _ = logged_in("session")
    clock = FakeClock(monkeypatch)
    exchange(client, server, clock, SELECT, 100.0, REPLY, 102.0)
    exchange(client, server, clock, SELECT, 105.0, REPLY, 106.0)
    stats = server.stats
    assert client.server is server  # session mode: still attached
    assert (stats.queries_timed, stats.query_time) == (2, 3.0)
    assert (sum(stats.xact_hist), stats.xact_time) == (2, 3.0)


def test_a_server_that_cannot_take_more_pauses_reading_its_client_until_it_drains():
    client, server, _ = logged_in()
    client.data_received(m.query("BEGIN"))
    server.pause_writing()  # asyncio: the server's socket buffer is full
    assert client.io.paused
    server.resume_writing()
    assert not client.io.paused


def test_a_logged_in_session_keeps_its_state_in_slots_not_an_instance_dict():
    """ClientSession's __slots__ name everything its set-up assigns (a dict past 30 keys costs 1.5 KiB a client)."""
    client, _, _ = logged_in()
    # (The compiled build's classes have no instance dict either: vars() would not even accept them.)
    assert not hasattr(client, "__dict__"), f"attributes outside the slots: {sorted(vars(client))}"
