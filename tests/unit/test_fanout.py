"""Fan-out planning and merging without a server (issue 14); the oracle test against one
database holding every row is tests/integration/test_fanout_merge.py."""

from __future__ import annotations

import pytest

from pypool.protocol import messages as m
from pypool.routing.fanout import FanoutError, merge
from pypool.routing.fanout_plan import plan_fanout

INT8, TEXT = 20, 25


def reply(columns, rows) -> bytes:
    return m.result_set(columns, rows) + m.ready_for_query()


@pytest.mark.parametrize("sql,fragment", [
    ("SELECT DISTINCT a FROM t", "DISTINCT"),
    ("SELECT count(DISTINCT a) FROM t", "COUNT(DISTINCT a)"),
    ("SELECT count(*) + 1 FROM t", "only count, sum, min, max and avg"),
    ("SELECT a, count(*) FROM t", "mix aggregates"),
    ("SELECT a, count(*) FROM t GROUP BY a, b", "GROUP BY b"),
    ("SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1", "HAVING"),
    ("SELECT a FROM t ORDER BY b", "ORDER BY b"),
    ("SELECT * FROM t LIMIT $1", "LIMIT $1"),
    ("SELECT 1 UNION SELECT 2", "one SELECT"),
    ("SELECT a, row_number() OVER () FROM t", "window"),
    ("UPDATE t SET a = 1", "one SELECT"),
])
def test_what_cannot_be_merged_is_refused_naming_the_key(sql: str, fragment: str) -> None:
    with pytest.raises(FanoutError) as info:
        plan_fanout(sql, "t.id")
    assert fragment in str(info.value)
    assert "sharding key t.id" in str(info.value)


def test_shard_text_widens_limit_and_splits_avg() -> None:
    assert plan_fanout("SELECT * FROM t", "t.id").shard_sql == "SELECT * FROM t"
    assert plan_fanout("SELECT a FROM t ORDER BY a LIMIT 5 OFFSET 2", "t.id").shard_sql.endswith("LIMIT 7")
    plan = plan_fanout("SELECT g, avg(v) FROM t GROUP BY g LIMIT 1", "t.id")
    assert plan.shard_sql == "SELECT g, SUM(v), COUNT(v) FROM t GROUP BY g"
    assert plan.columns == ("group", "avg_sum", "avg_count") and plan.limit == 1


def test_rows_are_concatenated_and_counted() -> None:
    plan = plan_fanout("SELECT id FROM t", "t.id")
    out = merge(plan, [reply([("id", INT8)], [[1], [2]]), reply([("id", INT8)], []),
                       reply([("id", INT8)], [[3]])])
    assert out == m.result_set([("id", INT8)], [[1], [2], [3]])


def test_order_limit_offset_merge_in_order() -> None:
    plan = plan_fanout("SELECT id FROM t ORDER BY id DESC LIMIT 3 OFFSET 1", "t.id")
    out = merge(plan, [reply([("id", INT8)], [[9], [4], [1]]), reply([("id", INT8)], [[8], [7], [None]])])
    assert out == m.result_set([("id", INT8)], [[9], [8], [7]])  # NULLS FIRST for DESC; offset 1 skips it


def test_count_sum_min_max_combine() -> None:
    plan = plan_fanout("SELECT count(*), sum(v), min(v), max(v) FROM t", "t.id")
    cols = [("count", INT8), ("sum", INT8), ("min", INT8), ("max", INT8)]
    out = merge(plan, [reply(cols, [[2, 10, 3, 7]]), reply(cols, [[0, None, None, None]]),
                       reply(cols, [[1, -4, -4, -4]])])
    assert out == m.result_set(cols, [[3, 6, -4, 7]])


def test_columns_must_be_alike_and_text() -> None:
    plan = plan_fanout("SELECT id FROM t", "t.id")
    with pytest.raises(FanoutError, match="different columns"):
        merge(plan, [reply([("id", INT8)], []), reply([("id", TEXT)], [])])
    binary = m.row_description([("id", INT8)]).replace(b"\xff\xff\xff\xff\x00\x00", b"\xff\xff\xff\xff\x00\x01")
    with pytest.raises(FanoutError, match="binary"):
        merge(plan, [binary, binary])


def test_first_error_is_the_answer() -> None:
    error = m.error_response("42703", 'column "nope" does not exist')
    plan = plan_fanout("SELECT id FROM t", "t.id")
    assert merge(plan, [reply([("id", INT8)], [[1]]), error + m.ready_for_query()]) == error


PARSE_COMPLETE, BIND_COMPLETE = m.message(m.PARSE_COMPLETE), m.message(m.BIND_COMPLETE)


def test_extended_protocol_replies_keep_their_order() -> None:
    plan = plan_fanout("SELECT id FROM t WHERE v = $1 ORDER BY id", "t.id")
    first = PARSE_COMPLETE + BIND_COMPLETE + reply([("id", INT8)], [[5], [1]])
    second = PARSE_COMPLETE + BIND_COMPLETE + reply([("id", INT8)], [[3]])
    assert merge(plan, [first, second]) == PARSE_COMPLETE + BIND_COMPLETE + m.result_set(
        [("id", INT8)], [[1], [3], [5]])


def test_without_row_description_rows_are_only_concatenated() -> None:
    rows = lambda *values: b"".join(m.data_row([v]) for v in values) + m.command_complete(f"SELECT {len(values)}")  # noqa: E731
    plan = plan_fanout("SELECT id FROM t", "t.id")
    assert merge(plan, [BIND_COMPLETE + rows(1, 2), BIND_COMPLETE + rows(3)]) == BIND_COMPLETE + rows(1, 2, 3)
    with pytest.raises(FanoutError, match="Describe"):
        merge(plan_fanout("SELECT id FROM t ORDER BY id", "t.id"), [rows(2), rows(1)])
    with pytest.raises(FanoutError, match="row limit"):
        merge(plan, [m.data_row([1]) + m.message(ord("s")), rows(3)])


def test_collector_answers_once_every_shard_is_ready() -> None:
    from pypool.routing.fanout import FanoutCollector

    plan = plan_fanout("SELECT count(*) FROM t", "t.id")
    collector = FanoutCollector(plan, 2)
    first = reply([("count", INT8)], [[4]])
    assert not collector.feed(0, first[:7])  # a partial message
    assert not collector.feed(0, first[7:])
    assert not collector.complete
    assert collector.feed(1, reply([("count", INT8)], [[6]]))
    assert collector.result() == m.result_set([("count", INT8)], [[10]]) + m.ready_for_query()
    refused = FanoutCollector(plan_fanout("SELECT id::text AS t FROM t ORDER BY t", "t.id"), 1)
    refused.feed(0, reply([("t", TEXT)], [["b"], ["a"]]))
    assert refused.result().startswith(bytes([m.ERROR_RESPONSE])) and b"0A000" in refused.result()

