"""The router's shard decisions and PgCat's shard commands, without a server (issue 14).

Pools are built from PgCat-format TOML; expected shards come from pg_bigint_hash
(checked against PostgreSQL in tests/integration/test_sharding_oracle.py).
"""

from __future__ import annotations

import pytest

from pypool.config import parse_config
from pypool.pool.group import PRIMARY, REPLICA
from pypool.protocol import messages as m
from pypool.routing.router import Router, RoutingState
from pypool.routing.sharding import ALL_SHARDS, pg_bigint_hash

POOL = """
[general]
admin_username = "admin"
admin_password = "admin-secret"

[pools.app]
query_parser_enabled = true
query_parser_read_write_splitting = true
{extra}

[pools.app.users.0]
username = "alice"
password = "alice-secret"
pool_size = 5
"""
SHARD = '\n[pools.app.shards.{i}]\ndatabase = "shard{i}"\nservers = [["db{i}", 5432, "primary"], ["db{i}", 5433, "replica"]]\n'


def router(extra: str = "", shards: int = 3) -> Router:
    text = POOL.format(extra=extra) + "".join(SHARD.format(i=i) for i in range(shards))
    return Router(parse_config(text, "pgcat.toml").pools["app"])


KEYED = 'automatic_sharding_key = "data.id"'
COMMENTS = 'shard_id_regex = "/\\\\* shard_id: (\\\\d+) \\\\*/"\nsharding_key_regex = "/\\\\* sharding_key: (-?\\\\d+) \\\\*/"'


def route(r: Router, sql: str, state: RoutingState, **kw):
    return r.route(state, m.QUERY, m.cstr(sql), **kw)


def parse_message(sql: str) -> bytes:
    return m.cstr("") + m.cstr(sql) + b"\x00\x00"


def show(name: str, value: str) -> bytes:
    return m.result_set([name], [[value]])  # RowDescription, DataRow, CommandComplete "SELECT 1"


def sqlstate(error: bytes) -> str:
    return error.split(b"\x00C", 1)[1].split(b"\x00", 1)[0].decode()


def test_set_sharding_key_and_show_shard_reply_as_pgcat() -> None:
    r, state = router(), RoutingState()
    assert route(r, "SHOW SHARD", state).reply == show("shard", "unset")
    assert route(r, "SET SHARDING KEY TO '13'", state).reply == m.command_complete("SET SHARDING KEY")
    assert state.shard == pg_bigint_hash(13, 3)
    assert route(r, "show shard;", state).reply == show("shard", str(pg_bigint_hash(13, 3)))
    too_big = route(r, "SET SHARDING KEY TO 9223372036854775808", state).reply
    assert sqlstate(too_big) == "22003" and state.shard == pg_bigint_hash(13, 3)


def test_set_shard_replies_and_refuses_unconfigured_shards() -> None:
    r, state = router(), RoutingState()
    assert route(r, "SET SHARD TO '1'", state).reply == m.command_complete("SET SHARD")
    assert state.shard == 1 and route(r, "SELECT * FROM t", state).shard == 1
    refused = route(r, "SET SHARD TO '3'", state).reply
    assert sqlstate(refused) == "22023"
    assert b"shard 3 is not configured 3, staying on shard 1 (shard numbers start at 0)" in refused
    assert state.shard == 1
    assert route(r, "set shard to any", state).reply == m.command_complete("SET SHARD")
    assert state.shard in (0, 1, 2)


@pytest.mark.parametrize("sql", ["SET SHARDING KEY TO '1'", "set sharding key to '1'", "SET SHARDING KEY TO 11235",
                                 "  SET SHARDING KEY TO 11235  ; ", "SET SHARD TO '1'", "set shard to '1'",
                                 "SET SHARD TO 2", "  SET SHARD TO 2;   ", "SHOW SHARD", "show shard", "SHOW SHARD;"])
def test_pgcat_command_spellings(sql: str) -> None:
    reply = route(router(), sql, RoutingState()).reply
    assert reply is not None and reply[0] != m.ERROR_RESPONSE


@pytest.mark.parametrize("sql", ["SELECT * FROM t WHERE v = 'set sharding key to 5'", "SET SHARDING KEY TO 'abc'",
                                 "SET SHARD TO -1", "SHOW SHARDS", "SET shard_key TO 1"])
def test_not_pgcat_commands(sql: str) -> None:
    assert route(router(), sql, RoutingState()).reply is None


def test_show_commands_use_pgcat_tag() -> None:
    r, state = router(), RoutingState()
    assert route(r, "SHOW SERVER ROLE", state).reply == show("server role", "auto")
    assert route(r, "SHOW PRIMARY READS", state).reply == show("primary reads", "off")


def test_keyless_statement_leaves_the_shard_to_default_shard() -> None:
    r = router(KEYED)
    decision = route(r, "SELECT * FROM data", RoutingState())
    assert decision.shard is None and decision.error is None and decision.role == REPLICA
    assert r.sharding.default_shard.pick(3) == 0  # PgCat's default: shard 0


def test_automatic_key_decides_the_statement_and_overrides_set_shard() -> None:
    r, state = router(KEYED), RoutingState()
    assert route(r, "SELECT * FROM data WHERE id = 5", state).shard == pg_bigint_hash(5, 3)
    route(r, "SET SHARD TO '1'", state)
    insert = route(r, "INSERT INTO data (id, v) VALUES (6, 'x')", state)
    assert (insert.shard, insert.role) == (pg_bigint_hash(6, 3), PRIMARY)
    assert route(r, "SELECT * FROM data", state).shard == 1  # no key: the client's shard


def test_statements_on_several_shards_are_refused_without_fanout() -> None:
    r = router(KEYED)
    keys = [k for k in range(20) if pg_bigint_hash(k, 3) != pg_bigint_hash(1, 3)][:1] + [1]
    for sql in (f"SELECT * FROM data WHERE id IN ({keys[0]}, {keys[1]})",
                f"INSERT INTO data (id) VALUES ({keys[0]}), ({keys[1]})"):
        decision = route(r, sql, RoutingState())
        assert decision.error is not None and sqlstate(decision.error) == "0A000"
        assert b"data.id" in decision.error and b"one shard" in decision.error
    update = route(r, "UPDATE data SET id = 2 WHERE id = 1", RoutingState())
    assert sqlstate(update.error) == "0A000" and b"cannot change the sharding key" in update.error


def test_comments_set_the_clients_shard_as_in_pgcat() -> None:
    r, state = router(COMMENTS), RoutingState()
    assert route(r, "/* shard_id: 2 */ SELECT 1", state).shard == 2
    assert route(r, "SELECT 1", state).shard == 2  # it stays, as in PgCat
    assert route(r, "/* sharding_key: 7 */ SELECT 1", state).shard == pg_bigint_hash(7, 3)
    refused = route(r, "/* shard_id: 9 */ SELECT 1", state)
    assert sqlstate(refused.error) == "22023" and state.shard == pg_bigint_hash(7, 3)


def test_extended_protocol_key_waits_for_bind_values() -> None:
    r, state = router(KEYED), RoutingState()
    parse = parse_message("SELECT * FROM data WHERE id = $1")
    assert r.route(state, m.PARSE, parse).needs_params
    assert r.route(state, m.PARSE, parse, params=[(0, b"5")]).shard == pg_bigint_hash(5, 3)
    # A Bind of a statement prepared earlier: the session passes its text.
    bind = r.route(state, m.BIND, b"", sql="SELECT * FROM data WHERE id = $1", params=[(0, b"8")])
    assert bind.shard == pg_bigint_hash(8, 3)


def test_default_shard_all_fans_reads_out_and_refuses_keyless_writes() -> None:
    r, state = router(KEYED + '\ndefault_shard = "all"'), RoutingState()
    read = route(r, "SELECT count(*) FROM data", state)
    assert read.shard == ALL_SHARDS and read.fanout is not None and read.fanout.columns == ("count",)
    several = route(r, "SELECT * FROM data WHERE id IN (1, 2, 3)", state)
    assert several.shard == ALL_SHARDS
    write = route(r, "UPDATE data SET v = 1", state)
    assert sqlstate(write.error) == "0A000" and b"sharding key data.id" in write.error
    assert route(r, "SELECT now()", state).shard == 0
    unmergeable = route(r, "SELECT DISTINCT v FROM data", state)
    assert sqlstate(unmergeable.error) == "0A000" and b"data.id" in unmergeable.error
    assert route(r, "SELECT * FROM data WHERE id = 4", state).shard == pg_bigint_hash(4, 3)


def test_one_shard_pools_keep_the_fast_path() -> None:
    r, state = router(KEYED, shards=1), RoutingState()
    decision = r.route_default(m.query("SELECT * FROM data WHERE id = 5"))
    assert decision is not None and decision.shard is None
    assert route(r, "SET SHARD TO '0'", state).reply == m.command_complete("SET SHARD")
    assert sqlstate(route(r, "SET SHARD TO '1'", state).reply) == "22023"
    assert router(KEYED).route_default(m.query("SELECT 1")) is None  # sharded: full path


def test_fanout_is_refused_inside_a_transaction() -> None:
    r, state = router(KEYED + '\ndefault_shard = "all"'), RoutingState()
    held = route(r, "BEGIN", state)
    assert held.hold_begin
    first = route(r, "SELECT count(*) FROM data", state, held_begin=True)
    assert first.shard is None and first.fanout is None and sqlstate(first.error) == "0A000"
    keyed = route(r, "SELECT * FROM data WHERE id = 3", state, held_begin=True)
    assert keyed.shard == pg_bigint_hash(3, 3) and keyed.error is None
