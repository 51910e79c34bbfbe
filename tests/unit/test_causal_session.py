"""Causal reads in the session, without sockets: when a write's ticket is taken, where its position is
learnt, and how a read that must see it waits (WAITING_FOR_REPLICA) or goes straight to a replica.

A real ClientSession (its IO recorded), real ServerConnection/PoolGroup objects with recording
transports; replica positions are fed to the group's position table the way
its health monitors feed it.
"""

from __future__ import annotations

import asyncio
import time

from pypool.app import Application
from pypool.causal.lsn import Position
from pypool.causal.requirement import COMMIT_POSITION_QUERY, parse_commit_row
from pypool.config import default_config_dict, dump_config, parse_config
from pypool.protocol import messages as m
from pypool.session.prepared import ClientStatements
from pypool.session.states import ClientState
from pypool.snapshot import take
from tests.unit._fakes import RecordingIO, idle_server, logged_in_client

INSERT = m.query("INSERT INTO t VALUES (1)")
INSERTED = m.command_complete("INSERT 0 1") + m.ready_for_query()
SELECT = m.query("SELECT x FROM t")
SELECTED = m.row_description(["x"]) + m.data_row([1]) + m.command_complete("SELECT 1") + m.ready_for_query()
# COMMIT_POSITION_QUERY's row: insert and flush positions at 0/3000100 of timeline 1's file 3.
ROW = ["0/3000100", "256", "0/3000100", "000000010000000000000003", "256", "8192", "on"]
COMMITTED = parse_commit_row(list(ROW))


def split_app(general: dict | None = None, **pool: object) -> Application:
    """Read/write splitting on (causal reads "session" by default), one primary and two replicas."""
    cfg = default_config_dict({})
    cfg["general"].update(general or {})
    cfg["pools"]["postgres"].update(pool)
    return Application(parse_config(dump_config(cfg)))


def commit_position_reply() -> bytes:
    return (m.row_description([f"c{i}" for i in range(7)]) + m.data_row(ROW) + m.command_complete("SELECT 1")
            + m.ready_for_query())


class ClientIO(RecordingIO):
    """Notes whether the client's write was pending each time bytes reach the client."""

    def __init__(self, client) -> None:
        super().__init__()
        self.client = client
        self.pending_when_written: list[int] = []

    def write(self, data) -> None:
        self.pending_when_written.append(self.client.causal.pending)
        super().write(data)


def setup(general: dict | None = None, **pool: object):
    app = split_app(general, **pool)
    group = app.groups[("postgres", "postgres", 0)]
    primary = idle_server(group.primary)
    replicas = [idle_server(sp) for sp in group.replicas]
    client = logged_in_client(app)
    client._join_causal(group)  # as login does
    client.statements = ClientStatements()  # transaction mode: statements are looked at on the way
    client.io = ClientIO(client)
    return app, group, client, primary, replicas


async def settle() -> None:
    """Let the tasks the last event started take their next steps."""
    for _ in range(5):
        await asyncio.sleep(0)


async def write(client, primary) -> None:
    """The client's INSERT runs on the primary; its lookup starts once the reply is out."""
    client.data_received(INSERT)
    assert client.server is primary and primary.track_commit
    primary.data_received(INSERTED)
    await settle()


def test_a_reads_with_no_write_before_it_goes_straight_to_a_replica():
    async def scenario() -> None:
        _, group, client, _, replicas = setup()
        client.data_received(SELECT)
        assert client.state is ClientState.ATTACHED and client.server in replicas
        assert not client.server.track_commit, "a read on a replica commits nothing to learn"
        assert group.causal.stats.at_once == 0, "a read that must see nothing is not a causal read"
    asyncio.run(scenario())


def test_a_writes_ticket_is_taken_before_its_reply_and_its_position_learnt_on_the_same_connection():
    async def scenario() -> None:
        app, group, client, primary, _ = setup()
        await write(client, primary)
        # The ReadyForQuery that tells the client its write committed went out with the lookup pending.
        assert client.io.take() == INSERTED
        assert client.io.pending_when_written == [1]
        assert client.state is ClientState.IDLE, "the client is never held for the lookup"
        assert primary.transport.take() == INSERT + m.query(COMMIT_POSITION_QUERY)
        assert primary not in group.primary.idle, "the connection is back only once it answered"
        assert [c.causal_required for c in take(app).clients] == ["pending"]
        primary.data_received(commit_position_reply())
        await settle()
        assert client.causal.pending == 0 and client.causal.required == COMMITTED
        assert primary in group.primary.idle
        assert [c.causal_required for c in take(app).clients] == [str(COMMITTED)]
    asyncio.run(scenario())


def test_a_transaction_that_commits_asynchronously_must_be_waited_for_up_to_its_insert_position():
    async def scenario() -> None:
        _, _, client, primary, _ = setup()
        client.data_received(m.query("BEGIN; SET LOCAL synchronous_commit = off; INSERT INTO t VALUES (1); COMMIT"))
        primary.data_received(INSERTED)
        await settle()
        ahead = ["0/3000200", "512", *ROW[2:]]  # the insert position is past the flush position
        primary.data_received(m.row_description([f"c{i}" for i in range(7)]) + m.data_row(ahead)
                              + m.command_complete("SELECT 1") + m.ready_for_query())
        await settle()
        assert client.causal.required == parse_commit_row(list(ahead), asynchronous=True) > COMMITTED
    asyncio.run(scenario())


def test_a_lookup_the_server_never_answers_closes_that_connection_and_sends_reads_to_the_primary():
    async def scenario() -> None:
        _, group, client, primary, _ = setup({"healthcheck_timeout": 20})
        await write(client, primary)
        await asyncio.sleep(0.1)  # the server hangs: no answer to the lookup
        assert primary.closed and primary not in group.primary.idle
        assert client.causal.unknown and str(client.causal) == "unknown (primary)"
        fresh = idle_server(group.primary)
        client.data_received(SELECT)
        await settle()
        assert client.server is fresh, "its write's position is unknown: the primary has it"
        assert group.causal.stats.to_primary == 1
    asyncio.run(scenario())


def test_a_read_after_a_write_waits_for_a_replica_that_replayed_it():
    async def scenario() -> None:
        _, group, client, primary, replicas = setup()
        await write(client, primary)
        client.data_received(SELECT)  # before the lookup answered: the position is not known yet
        assert client.state is ClientState.WAITING_FOR_REPLICA and client.server is None
        assert [c.state for c in take(client.app).clients] == ["waiting"]
        primary.data_received(commit_position_reply())
        await asyncio.sleep(0.01)
        assert client.state is ClientState.WAITING_FOR_REPLICA, "no replica is known to have replayed it"
        behind = Position(COMMITTED.timeline, COMMITTED.lsn - 1)
        group.causal.positions.observe(group.replicas[0], behind, time.monotonic())
        group.causal.positions.observe(group.replicas[1], COMMITTED, time.monotonic())
        group.causal.reads.notify()  # as a health result does
        await asyncio.sleep(0.01)
        assert client.state is ClientState.ATTACHED and client.server is replicas[1]
        assert replicas[1].transport.take() == SELECT
        replicas[1].data_received(SELECTED)
        assert client.io.take().endswith(SELECTED)
        assert group.causal.stats.after_wait == 1
        # Both replicas replayed it now: the next read takes the fast path again.
        group.causal.positions.observe(group.replicas[0], COMMITTED, time.monotonic())
        client.data_received(SELECT)
        assert client.state is ClientState.ATTACHED and group.causal.stats.at_once == 1
    asyncio.run(scenario())


def test_a_read_no_replica_catches_up_for_fails_with_57014_naming_the_lag_and_the_session_goes_on():
    async def scenario() -> None:
        _, group, client, primary, _ = setup(causal_reads_timeout=20)
        await write(client, primary)
        primary.data_received(commit_position_reply())
        await settle()
        client.io.take()
        client.data_received(SELECT)
        assert client.state is ClientState.WAITING_FOR_REPLICA
        await asyncio.sleep(0.1)
        reply = client.io.take()
        assert b"C57014\x00" in reply and b"causal_reads_timeout = 20 ms" in reply
        assert reply.endswith(m.ready_for_query())
        assert client.state is ClientState.IDLE and group.causal.stats.timed_out == 1
        client.data_received(INSERT)  # a write goes ahead as ever
        assert client.server is primary
    asyncio.run(scenario())


def test_primary_reads_allowed_a_read_after_a_write_runs_on_the_primary_without_waiting():
    async def scenario() -> None:
        _, group, client, primary, _ = setup(primary_reads_enabled=True)
        await write(client, primary)
        primary.data_received(commit_position_reply())
        await settle()
        client.data_received(SELECT)
        await settle()
        assert client.state is ClientState.ATTACHED and client.server is primary
        assert not primary.track_commit, "a read the router sent to any server writes nothing"
        assert group.causal.stats.to_primary == 1
    asyncio.run(scenario())


def test_causal_state_session_mode_from_the_first_write_global_from_login_off_and_session_pools_never():
    for pool, tracked, at_login in (({}, True, False), ({"causal_reads": "global"}, True, True),
                                    ({"causal_reads": "off"}, False, False), ({"pool_mode": "session"}, False, False)):
        app = split_app(**pool)
        client = logged_in_client(app)
        client._join_causal(app.groups[("postgres", "postgres", 0)])
        assert (client._causal_writes, client.causal is not None) == (tracked, at_login), pool
