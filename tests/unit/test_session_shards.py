"""What a sharded session sends the shards (sans-IO): fan-out requests and describe-only batches."""

from __future__ import annotations

import pytest

from pypool.protocol import messages as m
from pypool.routing.fanout_plan import plan_fanout
from pypool.session.prepared import server_name
from pypool.session.shards import FanoutRefused, _messages, describe_request, shard_requests

PLAN = plan_fanout("SELECT id FROM data ORDER BY id LIMIT 2 OFFSET 1", "data.id")  # shards run LIMIT 3


def _parse(name: bytes, text: str, types: bytes = b"\x00\x00") -> bytes:
    return m.message(m.PARSE, name + b"\x00" + m.cstr(text) + types)


def _bind(statement: bytes) -> bytes:
    return m.message(m.BIND, b"\x00" + statement + b"\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")


DESCRIBE_PORTAL = m.message(m.DESCRIBE, b"P\x00")
EXECUTE = m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00")
SYNC = m.message(m.SYNC)


def _tags(data: bytes) -> list[str]:
    return [chr(tag) for tag, _, _ in _messages(data)]


def test_a_simple_query_runs_the_planned_text_on_every_shard() -> None:
    requests, added = shard_requests(PLAN, m.message(m.QUERY, m.cstr("SELECT id FROM data ORDER BY id LIMIT 2 OFFSET 1")), 3)
    assert len(requests) == 3 and not added
    assert m.parse_query(requests[0][5:]) == PLAN.shard_sql
    assert "LIMIT 3" in PLAN.shard_sql and "OFFSET" not in PLAN.shard_sql


def test_an_unnamed_batch_keeps_its_messages_with_the_planned_text() -> None:
    batch = _parse(b"", "SELECT id FROM data ORDER BY id LIMIT 2 OFFSET 1", b"\x00\x01\x00\x00\x00\x14") \
        + _bind(b"") + DESCRIBE_PORTAL + EXECUTE + SYNC
    (request, *_), added = shard_requests(PLAN, batch, 2)
    assert not added
    assert _tags(request) == ["P", "B", "D", "E", "S"]
    _, start, end = next(_messages(request))
    name, text = m.parse_parse(request[start + 5:end])
    assert (name, text) == ("", PLAN.shard_sql)
    assert request.endswith(_bind(b"") + DESCRIBE_PORTAL + EXECUTE + SYNC)
    assert b"\x00\x01\x00\x00\x00\x14B" in request  # the client's parameter types stay


def test_a_bind_of_a_prepared_statement_gets_an_unnamed_parse_first() -> None:
    body = m.cstr("SELECT id FROM data ORDER BY id LIMIT 2 OFFSET 1") + b"\x00\x00"
    named = {b"stmt1": (server_name(body), body)}
    (request, *_), added = shard_requests(PLAN, _bind(b"stmt1") + DESCRIBE_PORTAL + EXECUTE + SYNC, 3, named)
    assert added  # its ParseComplete is not the client's
    assert _tags(request) == ["P", "B", "D", "E", "S"]
    assert b"stmt1" not in request
    with pytest.raises(FanoutRefused, match="does not exist"):
        shard_requests(PLAN, _bind(b"other") + EXECUTE + SYNC, 3, named)


def test_a_named_parse_in_the_fanned_out_request_is_refused() -> None:
    with pytest.raises(FanoutRefused, match="prepare it first"):
        shard_requests(PLAN, _parse(b"s", "SELECT 1") + _bind(b"s") + EXECUTE + SYNC, 3)


def test_a_describe_only_batch_becomes_an_unnamed_request_ending_in_sync() -> None:
    batch = _parse(b"__asyncpg_stmt_1__", "SELECT * FROM data WHERE id = $1") \
        + m.message(m.DESCRIBE, b"S__asyncpg_stmt_1__\x00") + m.message(m.FLUSH)
    request = describe_request(batch)
    assert request is not None
    assert _tags(request) == ["P", "D", "S"]
    assert b"asyncpg" not in request  # nothing named is left on a shared server
    assert describe_request(batch[:-5] + _bind(b"") + m.message(m.FLUSH)) is None  # it runs: not describe-only
