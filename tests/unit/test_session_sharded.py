"""A sharded pool's session fed bytes without sockets: each request reaches the server of its shard."""

from __future__ import annotations

import struct

import pytest

from pypool.app import Application
from pypool.config import default_config_dict, dump_config, parse_config
from pypool.protocol import messages as m
from pypool.routing.sharding import pg_bigint_hash
from pypool.session.states import ClientState
from tests.unit._fakes import idle_server, logged_in_client

SHARDS = 3


def sharded_app() -> Application:
    cfg = default_config_dict({})
    pool = cfg["pools"]["postgres"]
    pool["default_role"] = "primary"
    pool["query_parser_read_write_splitting"] = False
    pool["automatic_sharding_key"] = "data.id"
    servers = pool["shards"]["0"]["servers"][:1]
    pool["shards"] = {str(s): {"database": f"shard{s}", "servers": servers} for s in range(SHARDS)}
    return Application(parse_config(dump_config(cfg)))


@pytest.fixture
def session():
    app = sharded_app()
    servers = [idle_server(app.groups[("postgres", "postgres", s)].primary) for s in range(SHARDS)]
    client = logged_in_client(app)
    client.shard_groups = app.shard_groups("postgres", "postgres")
    return client, servers


def feed(client, data: bytes, drip: bool) -> None:
    for i in range(len(data)) if drip else [None]:
        client.data_received(data[i:i + 1] if drip else data)


def sent_to(servers) -> list[int]:
    return [s for s, server in enumerate(servers) if server.transport.data]


@pytest.mark.parametrize("drip", [False, True])
def test_set_shard_and_keys_in_the_simple_protocol(session, drip: bool) -> None:
    client, servers = session
    feed(client, m.query("SET SHARD TO '1'"), drip)
    assert m.command_complete("SET SHARD") in client.io.take() and sent_to(servers) == []
    feed(client, m.query("SELECT 1"), drip)
    assert sent_to(servers) == [1]
    servers[1].data_received(m.command_complete("SELECT 1") + m.ready_for_query())
    assert client.state is ClientState.IDLE
    servers[1].transport.take()
    key = 7
    feed(client, m.query(f"SELECT * FROM data WHERE id = {key}"), drip)
    assert sent_to(servers) == [pg_bigint_hash(key, SHARDS)]  # the key beats SET SHARD for its statement


@pytest.mark.parametrize("drip", [False, True])
def test_a_parameter_key_waits_for_the_bind_of_its_batch(session, drip: bool) -> None:
    client, servers = session
    key = 11
    parse = m.message(m.PARSE, b"\x00" + m.cstr("SELECT * FROM data WHERE id = $1") + b"\x00\x00")
    bind = m.message(m.BIND, b"\x00\x00" + b"\x00\x01\x00\x01" + b"\x00\x01" + struct.pack("!iq", 8, key)
                     + b"\x00\x00")
    batch = parse + bind + m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00") + m.message(m.SYNC)
    feed(client, parse, drip)
    assert sent_to(servers) == []  # the value is in the Bind
    feed(client, batch[len(parse):], drip)
    assert sent_to(servers) == [pg_bigint_hash(key, SHARDS)]
    assert bytes(servers[pg_bigint_hash(key, SHARDS)].transport.data) == batch


def test_keys_on_several_shards_are_refused_and_the_client_goes_on(session) -> None:
    client, servers = session
    keys = next((a, b) for a in range(1, 50) for b in range(a + 1, 50)
                if pg_bigint_hash(a, SHARDS) != pg_bigint_hash(b, SHARDS))
    feed(client, m.query(f"SELECT * FROM data WHERE id IN ({keys[0]}, {keys[1]})"), False)
    reply = client.io.take()
    assert reply.startswith(b"E") and b"0A000" in reply and reply.endswith(m.ready_for_query())
    assert sent_to(servers) == [] and client.state is ClientState.IDLE
    feed(client, m.query("SELECT 1"), False)
    assert sent_to(servers) == [0]  # no key, no SET SHARD: default_shard, shard 0
