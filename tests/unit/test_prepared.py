"""Named prepared statements mapped onto server connections (pypool/session/prepared.py), without sockets."""

from __future__ import annotations

import struct

from pypool.session import prepared
from pypool.session.prepared import AS_PARSE_COMPLETE, PASS, SWALLOW, ClientStatements, Rewriter, ServerStatements
from pypool.protocol import messages as m
from pypool.session.schema import SchemaGeneration


def parse(name: bytes, query: bytes, types: tuple[int, ...] = ()) -> bytes:
    return name + b"\0" + query + b"\0" + struct.pack(f"!H{len(types)}I", len(types), *types)


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return portal + b"\0" + stmt + b"\0" + b"\0\0\0\0\0\0"


def split(out: list[bytes]) -> list[tuple[str, bytes]]:
    """The messages of a rewriter's output as (tag, payload)."""
    data = b"".join(out)
    msgs = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        msgs.append((chr(data[pos]), data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return msgs


def run(client: ClientStatements, server: ServerStatements, *messages: tuple[int, bytes],
        epoch: int = 0, rank: int = 0) -> tuple[list[tuple[str, bytes]], Rewriter]:
    rw = Rewriter(client, server, epoch, rank)
    for tag, payload in messages:
        rw.message(tag, payload, m.message(tag, payload))
    return split(rw.out), rw


def body(query: bytes, types: tuple[int, ...] = ()) -> bytes:
    return parse(b"", query, types)[1:]


def test_server_name_depends_on_text_and_parameter_types():
    a = prepared.server_name(body(b"SELECT $1", (23,)))
    assert a == prepared.server_name(body(b"SELECT $1", (23,)))
    assert a != prepared.server_name(body(b"SELECT $1", (25,)))
    assert a != prepared.server_name(body(b"SELECT $1 ", (23,)))
    assert a.startswith(b"pypool_")


def test_named_parse_is_renamed_and_bind_follows_it():
    client, server = ClientStatements(), ServerStatements(10)
    out, rw = run(client, server, (m.PARSE, parse(b"s1", b"SELECT 1")), (m.BIND, bind(b"s1")))
    target = prepared.server_name(body(b"SELECT 1"))
    # A precautionary Close of the server name, the renamed Parse, the renamed Bind.
    assert out == [("C", b"S" + target + b"\0"), ("P", parse(target, b"SELECT 1")), ("B", bind(target))]
    assert rw.rank == 2  # two messages that each get a ParseComplete/CloseComplete
    assert [(a.rank, a.kind) for a in server.actions] == [(1, SWALLOW), (2, PASS)]
    assert target in server.names and client.names[b"s1"][0] == target


def test_parse_of_a_statement_the_server_has_becomes_a_no_op_close():
    client_a, client_b, server = ClientStatements(), ClientStatements(), ServerStatements(10)
    run(client_a, server, (m.PARSE, parse(b"x", b"SELECT 1")))
    server.actions.clear()
    out, _ = run(client_b, server, (m.PARSE, parse(b"other_name", b"SELECT 1")), rank=3)
    assert out == [("C", b"S" + prepared.ABSENT_NAME + b"\0")]
    (action,) = server.actions
    assert (action.rank, action.kind) == (4, AS_PARSE_COMPLETE)


def test_bind_on_a_server_without_the_statement_injects_its_parse():
    client, first, second = ClientStatements(), ServerStatements(10), ServerStatements(10)
    run(client, first, (m.PARSE, parse(b"s", b"SELECT $1", (23,))))
    out, _ = run(client, second, (m.BIND, bind(b"s", b"portal")), (m.DESCRIBE, b"Ss\0"))
    target = prepared.server_name(body(b"SELECT $1", (23,)))
    assert out == [("C", b"S" + target + b"\0"), ("P", parse(target, b"SELECT $1", (23,))),
                   ("B", bind(target, b"portal")), ("D", b"S" + target + b"\0")]
    assert [a.kind for a in second.actions] == [SWALLOW, SWALLOW]  # the client never asked for these


def test_unknown_and_unnamed_statements_pass_untouched():
    client, server = ClientStatements(), ServerStatements(10)
    messages = [(m.PARSE, parse(b"", b"SELECT 1")), (m.BIND, bind(b"")), (m.BIND, bind(b"never_parsed")),
                (m.DESCRIBE, b"P\0"), (m.CLOSE, b"P\0")]
    out, rw = run(client, server, *messages)
    assert out == [(chr(t), p) for t, p in messages]
    assert rw.rank == 2 and not server.actions  # Parse and Close still count for positions


def test_close_forgets_the_clients_name_but_keeps_the_shared_copy():
    client, server = ClientStatements(), ServerStatements(10)
    run(client, server, (m.PARSE, parse(b"s", b"SELECT 1")))
    out, _ = run(client, server, (m.CLOSE, b"Ss\0"))
    assert out == [("C", b"S" + prepared.ABSENT_NAME + b"\0")]
    assert b"s" not in client.names and len(server.names) == 1


def test_lru_evicts_with_close_and_swallows_its_reply():
    client, server = ClientStatements(), ServerStatements(2)
    for i in range(2):
        run(client, server, (m.PARSE, parse(b"s%d" % i, b"SELECT %d" % i)))
    run(client, server, (m.BIND, bind(b"s0")))  # s0 becomes the most recently used
    server.actions.clear()
    out, _ = run(client, server, (m.PARSE, parse(b"s2", b"SELECT 2")))
    evicted = prepared.server_name(body(b"SELECT 1"))
    assert out[0] == ("C", b"S" + evicted + b"\0")
    assert server.actions[0].kind == SWALLOW and server.actions[0].server_name == evicted
    assert evicted not in server.names and len(server.names) == 2 and server.evictions == 1


def test_zero_cache_size_means_the_default_not_off():
    assert ServerStatements(0).capacity == prepared.DEFAULT_CACHE_SIZE


def test_replies_are_matched_by_epoch_and_rank():
    client, server = ClientStatements(), ServerStatements(10)
    # Epoch 0 already has one unnamed Parse in flight (rank 1): ours are ranks 2 and 3.
    run(client, server, (m.PARSE, parse(b"s", b"SELECT 1")), rank=1)
    assert server.on_reply(1) == PASS  # the unnamed Parse's reply: not ours
    assert server.on_reply(2) == SWALLOW  # the precautionary Close
    assert server.on_reply(3) == PASS and not server.actions


def test_error_undoes_what_the_server_skipped():
    client, server = ClientStatements(), ServerStatements(10)
    run(client, server, (m.PARSE, parse(b"s", b"SELECT broken")))
    target = client.names[b"s"][0]
    assert server.on_reply(1) == SWALLOW  # the Close ran, then the Parse failed
    server.on_error(client)
    assert not server.actions
    assert target not in server.names, "a Parse that failed must not count as prepared"
    assert b"s" not in client.names


def test_error_in_a_later_epoch_leaves_earlier_ones_alone():
    client, server = ClientStatements(), ServerStatements(10)
    run(client, server, (m.PARSE, parse(b"a", b"SELECT 1")), epoch=0)
    run(client, server, (m.PARSE, parse(b"b", b"SELECT 2")), epoch=1)
    server.on_error(client)  # epoch 0 failed before its replies
    assert [a.epoch for a in server.actions] == [1, 1]
    server.on_ready()
    assert server.on_reply(1) == SWALLOW and server.on_reply(2) == PASS
    assert prepared.server_name(body(b"SELECT 2")) in server.names
    assert prepared.server_name(body(b"SELECT 1")) not in server.names


def test_names_statement_reads_only_the_name_bytes():
    def msg(tag: int, payload: bytes) -> bytes:
        return m.message(tag, payload)

    for tag, payload, named in [(m.PARSE, parse(b"", b"SELECT 1"), False), (m.PARSE, parse(b"n", b"SELECT 1"), True),
                                (m.BIND, bind(b""), False), (m.BIND, bind(b"n"), True),
                                (m.BIND, bind(b"", b"portal"), False), (m.DESCRIBE, b"S\0", False),
                                (m.DESCRIBE, b"Sn\0", True), (m.DESCRIBE, b"Pn\0", False), (m.CLOSE, b"Sn\0", True)]:
        data = msg(tag, payload)
        assert prepared.names_statement(tag, data, 5, len(data)) is named, (chr(tag), payload)
    # A Bind cut before its statement name: cannot tell, so take the careful path.
    data = msg(m.BIND, bind(b"n", b"portal"))[:9]
    assert prepared.names_statement(m.BIND, data, 5, 100)


def test_config_accepts_pgbouncers_max_prepared_statements_as_an_alias():
    from pypool.config import parse_config

    def pool(extra: str):
        text = ('[general]\nadmin_username = "a"\nadmin_password = "b"\n[pools.app]\n' + extra +
                '[pools.app.users.0]\nusername = "u"\npassword = "p"\npool_size = 2\n'
                '[pools.app.shards.0]\ndatabase = "d"\nservers = [["h", 5432, "primary"]]\n')
        config = parse_config(text, "test.toml")
        return config.pools["app"], config.warnings

    assert pool("max_prepared_statements = 64\n")[0].prepared_statements_cache_size == 64
    # PgCat's own key wins when both are given; neither is reported as unknown.
    chosen, warnings = pool("prepared_statements_cache_size = 32\nmax_prepared_statements = 64\n")
    assert chosen.prepared_statements_cache_size == 32
    assert not [w for w in warnings if "prepared" in w]


def test_messages_sent_after_the_error_was_relayed_are_undone_too():
    """The server already failed this batch and skips to Sync: nothing sent now will run."""
    client, server = ClientStatements(), ServerStatements(10)
    run(client, server, (m.PARSE, parse(b"late", b"SELECT 5")))
    server.on_error(client)  # what the client side does when the relay saw the error first
    assert not server.names and not client.names and not server.actions


def stale_error(code: str, routine: str) -> bytes:
    fields = [b"SERROR", b"VERROR", b"C" + code.encode(), b"Mcached plan must not change result type",
              b"R" + routine.encode()]
    return b"\0".join(fields) + b"\0\0"


def test_statement_identity_includes_schema_generation_and_search_path():
    generation = SchemaGeneration()
    client = ClientStatements(generation)
    run(client, ServerStatements(10), (m.PARSE, parse(b"s", b"SELECT * FROM t")))
    before = client.names[b"s"][0]
    generation.bump()
    run(client, ServerStatements(10), (m.PARSE, parse(b"s", b"SELECT * FROM t")))
    after_ddl = client.names[b"s"][0]
    client.search_path = "other, public"
    run(client, ServerStatements(10), (m.PARSE, parse(b"s", b"SELECT * FROM t")))
    assert len({before, after_ddl, client.names[b"s"][0]}) == 3
    assert ClientStatements().context() == b"", "no schema, no search_path: the plain text identity"


def test_a_stale_statement_error_moves_the_schema_on_and_the_next_parse_parses_again():
    generation = SchemaGeneration()
    client, server = ClientStatements(generation), ServerStatements(10, generation)
    run(client, server, (m.PARSE, parse(b"s", b"SELECT * FROM t")))
    server.actions.clear()
    for code, routine in [("0A000", "exec_stmt_raise"), ("42P01", "parserOpenTable")]:
        error = stale_error(code, routine)
        server.on_error_response(error, 0, len(error), client)  # not about a stale statement
    out, _ = run(ClientStatements(generation), server, (m.PARSE, parse(b"again", b"SELECT * FROM t")))
    assert out == [("C", b"S" + prepared.ABSENT_NAME + b"\0")], "same schema: the server's copy is shared"
    for code, routine in [("0A000", "RevalidateCachedQuery"), ("XX000", "format_type_extended")]:
        server.actions.clear()
        error = stale_error(code, routine)
        server.on_error_response(error, 0, len(error), client)
        out, _ = run(ClientStatements(generation), server, (m.PARSE, parse(b"again", b"SELECT * FROM t")))
        assert [tag for tag, _ in out] == ["C", "P"], f"after {code} the Parse must reach the server"
    assert generation.value == 2
