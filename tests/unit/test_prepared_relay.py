"""The relay rewriting named statements, with real ClientSession/ServerConnection objects and no sockets.

Every byte stream is fed one byte at a time, the worst split a TCP read can
produce, so the header walks must carry partial messages across reads in
both directions.
"""

from __future__ import annotations

import pytest

from pypool.session import prepared
from pypool.session.session import ClientSession
from pypool.pool.server import ServerConnection
from pypool.protocol import messages as m
from pypool.snapshot import take
from tests.unit._fakes import idle_server, logged_in_client, primary_only_app


def setup(clients: int = 2) -> tuple[list[ClientSession], ServerConnection]:
    app = primary_only_app()
    server = idle_server(app.groups[("postgres", "postgres", 0)].primary)
    out = []
    for _ in range(clients):
        client = logged_in_client(app)
        client.statements = prepared.ClientStatements()
        out.append(client)
    return out, server


def drip(receiver, data: bytes) -> None:
    for i in range(len(data)):
        receiver.data_received(data[i:i + 1])


def parse(name: bytes, sql: bytes) -> bytes:
    return m.message(m.PARSE, name + b"\0" + sql + b"\0\0\0")


def bind(name: bytes) -> bytes:
    return m.message(m.BIND, b"\0" + name + b"\0\0\0\0\0\0\0")


EXECUTE = m.message(m.EXECUTE, b"\0\0\0\0\0")
SYNC = m.message(m.SYNC)
PARSE_COMPLETE = m.message(m.PARSE_COMPLETE)
BIND_COMPLETE = m.message(m.BIND_COMPLETE)
CLOSE_COMPLETE = m.message(m.CLOSE_COMPLETE)
DONE = m.command_complete("SELECT 1") + m.ready_for_query()


def test_named_statement_is_renamed_prepared_and_its_extra_reply_swallowed():
    (client, _), server = setup()
    target = prepared.server_name(b"SELECT 1\0\0\0")
    client.data_received(b"")  # nothing yet
    drip(client, parse(b"s1", b"SELECT 1") + bind(b"s1") + EXECUTE + SYNC)
    assert client.server is server
    assert server.transport.take() == (m.message(m.CLOSE, b"S" + target + b"\0") + parse(target, b"SELECT 1")
                                       + bind(target) + EXECUTE + SYNC)
    drip(server, CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + DONE)
    assert client.io.take() == PARSE_COMPLETE + BIND_COMPLETE + DONE
    assert client.server is None, "the request is answered: the connection goes back to the pool"


def test_second_client_binds_the_shared_copy_and_gets_parse_complete_from_a_no_op_close():
    (first, second), server = setup()
    drip(first, parse(b"s1", b"SELECT 1") + SYNC)
    drip(server, CLOSE_COMPLETE + PARSE_COMPLETE + m.ready_for_query())
    first.io.take()
    server.transport.take()
    # Another client, same statement under another name: the server need not parse it again.
    drip(second, parse(b"mine", b"SELECT 1") + bind(b"mine") + EXECUTE + SYNC)
    target = prepared.server_name(b"SELECT 1\0\0\0")
    assert server.transport.take() == (m.message(m.CLOSE, b"S" + prepared.ABSENT_NAME + b"\0")
                                       + bind(target) + EXECUTE + SYNC)
    drip(server, CLOSE_COMPLETE + BIND_COMPLETE + DONE)
    assert second.io.take() == PARSE_COMPLETE + BIND_COMPLETE + DONE
    # PgBouncer's counts (SHOW STATS_TOTALS): two client parses, one server parse, one bind.
    ps = server.statements
    assert (ps.parses, ps.misses, ps.binds) == (2, 1, 1)
    [row] = [r for r in take(first.app).addresses if r.role == "primary"]
    assert [row.counters[k] for k in ("client_parse_count", "server_parse_count", "bind_count")] == [2, 1, 1]


def test_error_before_an_injected_parse_leaves_the_statement_unprepared():
    (client, other), server = setup()
    drip(client, parse(b"s1", b"SELECT 1") + SYNC)
    drip(server, CLOSE_COMPLETE + PARSE_COMPLETE + m.ready_for_query())
    server.statements.clear()  # as if this were another server connection that never saw it
    drip(client, m.query("SELECT 1/0") + bind(b"s1") + EXECUTE + SYNC)
    server.transport.take()
    client.io.take()
    error = m.error_response("22012", "division by zero")
    # The Query fails on its own; the extended batch after it runs and prepares s1.
    drip(server, error + m.ready_for_query() + CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + DONE)
    assert client.io.take() == error + m.ready_for_query() + BIND_COMPLETE + DONE
    assert prepared.server_name(b"SELECT 1\0\0\0") in server.statements.names
    # Now the Parse itself fails: the statement must not count as prepared, nor the client's name exist.
    server.statements.clear()
    drip(other, parse(b"x", b"SELECT 2") + SYNC)  # other's Parse of a new text, which fails
    server.transport.take()
    drip(server, CLOSE_COMPLETE + error + m.ready_for_query())
    assert other.io.take() == error + m.ready_for_query()
    assert not server.statements.names and b"x" not in other.statements.names


def test_malformed_parse_and_bind_at_the_end_of_a_read_take_the_careful_path():
    """Found by the live-listener fuzzer: an empty Parse as the last bytes of a read raised IndexError."""
    from pypool.session.effects import needs_care

    empty_parse = b"P\x00\x00\x00\x04"
    assert needs_care(ord("P"), empty_parse, 5, 5) is True
    short_bind = b"B\x00\x00\x00\x05\x00"  # an unnamed portal and nothing after it
    assert needs_care(ord("B"), short_bind, 5, 6) is True
    plain_bind = b"B\x00\x00\x00\x0c\x00\x00" + b"\x00" * 6  # unnamed portal, unnamed statement
    assert needs_care(ord("B"), plain_bind, 5, len(plain_bind)) is False


def test_an_unnamed_parse_of_a_plain_select_stays_on_the_fast_path():
    """pgbench -M extended: a ';' or any byte in the parameter types must not look like a second statement."""
    from pypool.session.effects import needs_care

    text = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    payload = b"\x00" + text + b"\x00" + (1).to_bytes(2, "big") + (23).to_bytes(4, "big")
    parse = b"P" + (4 + len(payload)).to_bytes(4, "big") + payload
    assert needs_care(ord("P"), parse, 5, len(parse)) is False
    setting = b"\x00SET search_path TO app\x00\x00\x00"
    parse_set = b"P" + (4 + len(setting)).to_bytes(4, "big") + setting
    assert needs_care(ord("P"), parse_set, 5, len(parse_set)) is True


@pytest.mark.parametrize("target, careful", [
    (b"P\x00", False), (b"S\x00", False),  # the unnamed portal and statement pass untouched
    (b"Pcursor\x00", False),  # a named portal: only statement names are rewritten
    (b"Sstmt1\x00", True), (b"S", True),  # a named statement; a body too short to tell
])
def test_a_describe_needs_care_only_for_a_named_statement(target, careful):
    from pypool.session.effects import needs_care

    describe = b"D" + (4 + len(target)).to_bytes(4, "big") + target
    assert needs_care(ord("D"), describe, 5, len(describe)) is careful
    assert prepared.names_statement(ord("D"), describe, 5, len(describe)) is careful


def test_ddl_and_stale_statement_errors_make_the_next_parse_reach_the_server():
    (client, other), server = setup()
    schema = client.group.schema
    client.statements = prepared.ClientStatements(schema)
    other.statements = prepared.ClientStatements(schema)
    drip(client, parse(b"s1", b"SELECT * FROM t") + SYNC)
    drip(server, CLOSE_COMPLETE + PARSE_COMPLETE + m.ready_for_query())
    server.transport.take()
    start = schema.value
    # DDL through pypool: the generation moves when it is sent and again when it is committed.
    drip(other, m.query("ALTER TABLE t ADD COLUMN b int"))
    assert schema.value == start + 1
    drip(server, m.command_complete("ALTER TABLE") + m.ready_for_query())
    assert schema.value == start + 2
    server.transport.take()
    # The old statement fails as PostgreSQL fails it; that error moves the generation too.
    drip(client, bind(b"s1") + EXECUTE + SYNC)
    stale = m.error_response("0A000", "cached plan must not change result type")
    stale = stale[:-1] + b"RRevalidateCachedQuery\0\0"
    stale = stale[:1] + (len(stale) - 1).to_bytes(4, "big") + stale[5:]
    drip(server, stale + m.ready_for_query())
    assert schema.value == start + 3
    assert client.io.take().endswith(m.ready_for_query())
    server.transport.take()
    # The driver prepares again under a new name: a real Parse, not the stale shared copy.
    drip(client, parse(b"s2", b"SELECT * FROM t") + SYNC)
    sent = server.transport.take()
    assert parse(client.statements.names[b"s2"][0], b"SELECT * FROM t") in sent


def describe_statement(name: bytes) -> bytes:
    return m.message(m.DESCRIBE, b"S" + name + b"\0")


def test_unnamed_statement_bound_in_a_later_request_is_parsed_again_where_it_runs():
    (client, other), server = setup()
    drip(client, parse(b"", b"SELECT 1") + describe_statement(b"") + SYNC)
    drip(server, PARSE_COMPLETE + m.message(ord("t"), b"\0\0") + m.message(ord("n")) + m.ready_for_query())
    client.io.take()
    server.transport.take()
    # In between, another client's unnamed statement replaces it on the one server connection.
    drip(other, parse(b"", b"SELECT 2") + bind(b"") + EXECUTE + SYNC)
    assert server.transport.take() == parse(b"", b"SELECT 2") + bind(b"") + EXECUTE + SYNC
    drip(server, PARSE_COMPLETE + BIND_COMPLETE + DONE)
    other.io.take()
    drip(client, bind(b"") + EXECUTE + SYNC)
    assert server.transport.take() == parse(b"", b"SELECT 1") + bind(b"") + EXECUTE + SYNC
    drip(server, PARSE_COMPLETE + BIND_COMPLETE + DONE)
    assert client.io.take() == BIND_COMPLETE + DONE, "the Parse pypool added is not the client's"
    # Parsed and bound in one request (the usual case): sent as is.
    drip(client, parse(b"", b"SELECT 3") + bind(b"") + EXECUTE + SYNC)
    assert server.transport.take() == parse(b"", b"SELECT 3") + bind(b"") + EXECUTE + SYNC
