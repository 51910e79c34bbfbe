"""Fan-out merge against its oracle: the same query on one database holding every row (issue 14).

Three shard schemas and one "all rows" schema on the local primary; rows
are placed by pg_bigint_hash. Each shard's raw reply (text format, as the
server sent it) is turned back into protocol messages and merged by
``pypool.routing.fanout.merge``; the result must equal the single database's.
No pypool process: this checks the sans-IO core the session will call.
"""

from __future__ import annotations

import struct
from decimal import Decimal

import psycopg
import pytest

from pypool.protocol import messages as m
from pypool.routing.fanout import FanoutError, merge
from pypool.routing.fanout_plan import plan_fanout
from pypool.routing.sharding import pg_bigint_hash
from tests.conftest import DATABASE, PASSWORD, USER

SCHEMAS = ["pypool_fo_s0", "pypool_fo_s1", "pypool_fo_s2"]
ALL = "pypool_fo_all"


@pytest.fixture(scope="module")
def connections(pg_cluster):
    dsn = f"host=127.0.0.1 port={pg_cluster[0].port} user={USER} password={PASSWORD} dbname={DATABASE}"
    rows = [(i, i % 4, None if i % 17 == 0 else Decimal(i * 37 % 1000) / 100, i % 9 - 2)
            for i in range(-40, 260)]
    with psycopg.connect(dsn, autocommit=True) as admin:
        for schema in SCHEMAS + [ALL]:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            admin.execute(f"CREATE SCHEMA {schema}")
            admin.execute(f"CREATE TABLE {schema}.items (id bigint, grp int, price numeric(10,2), qty int)")
        for row in rows:
            for schema in (SCHEMAS[pg_bigint_hash(row[0], 3)], ALL):
                admin.execute(f"INSERT INTO {schema}.items VALUES (%s, %s, %s, %s)", row)
        conns = {s: psycopg.connect(dsn, autocommit=True, options=f"-csearch_path={s}") for s in SCHEMAS + [ALL]}
        try:
            yield conns
        finally:
            for conn in conns.values():
                conn.close()
            for schema in SCHEMAS + [ALL]:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")


def raw_reply(conn: psycopg.Connection, sql: str) -> bytes:
    """The server's reply to ``sql`` as protocol messages (text format, as sent)."""
    res = conn.pgconn.exec_(sql.encode())
    if res.error_message:
        return m.error_response("XX000", res.error_message.decode())
    fields = [struct.pack("!h", res.nfields)]
    for i in range(res.nfields):
        fields.append(res.fname(i) + b"\x00" + struct.pack("!IhIhih", res.ftable(i), res.ftablecol(i),
                                                           res.ftype(i), res.fsize(i), res.fmod(i), 0))
    out = [m.message(m.ROW_DESCRIPTION, b"".join(fields))]
    for r in range(res.ntuples):
        values = [res.get_value(r, c) for c in range(res.nfields)]
        body = struct.pack("!h", len(values)) + b"".join(
            struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values)
        out.append(m.message(m.DATA_ROW, body))
    out.append(m.command_complete(res.command_status.decode()) + m.ready_for_query())
    return b"".join(out)


def decoded(stream: bytes):
    """(column names and types, rows, command tag); numeric values as Decimal so 2.5 == 2.50."""
    pos, columns, rows, tag = 0, [], [], None
    while pos < len(stream):
        kind, (length,) = stream[pos], struct.unpack_from("!I", stream, pos + 1)
        payload = stream[pos + 5:pos + 1 + length]
        pos += 1 + length
        if kind == m.ROW_DESCRIPTION:
            (n,) = struct.unpack_from("!h", payload)
            p = 2
            for _ in range(n):
                end = payload.index(b"\x00", p)
                columns.append((payload[p:end].decode(), struct.unpack_from("!IhIhih", payload, end + 1)[2]))
                p = end + 19
        elif kind == m.DATA_ROW:
            (n,) = struct.unpack_from("!h", payload)
            p, row = 2, []
            for i in range(n):
                (size,) = struct.unpack_from("!i", payload, p)
                p += 4
                value = None if size < 0 else payload[p:p + size].decode()
                p += max(size, 0)
                row.append(Decimal(value) if value is not None and columns[i][1] == 1700 else value)
            rows.append(tuple(row))
        elif kind == m.COMMAND_COMPLETE:
            tag = payload.rstrip(b"\x00").decode()
        elif kind == m.ERROR_RESPONSE:
            raise AssertionError(payload)
    return columns, rows, tag


QUERIES = [
    "SELECT id, grp FROM items ORDER BY id LIMIT 7 OFFSET 3",
    "SELECT * FROM items ORDER BY price DESC, id LIMIT 10",
    "SELECT * FROM items ORDER BY price NULLS FIRST, id DESC LIMIT 12 OFFSET 1",
    "SELECT id FROM items WHERE grp = 2 ORDER BY id",
    "SELECT count(*), sum(qty), min(price), max(price), avg(qty), avg(price) FROM items",
    "SELECT count(*) AS n, sum(price) AS total, min(id), max(id) FROM items WHERE qty > 3",
    "SELECT count(*), sum(qty), avg(qty), min(id) FROM items WHERE id < -1000",
    "SELECT grp, count(*), sum(price), avg(qty) FROM items GROUP BY grp ORDER BY grp",
    "SELECT grp, max(id) FROM items WHERE qty > 3 GROUP BY grp ORDER BY 2 DESC LIMIT 2",
    "SELECT qty, count(price) FROM items GROUP BY qty ORDER BY qty DESC",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_merged_result_equals_one_database_with_every_row(connections, sql: str) -> None:
    plan = plan_fanout(sql, "items.id")
    replies = [raw_reply(connections[s], plan.shard_sql) for s in SCHEMAS]
    merged = decoded(merge(plan, replies))
    expected = decoded(raw_reply(connections[ALL], sql))
    assert merged == expected


def test_rows_without_order_are_all_there(connections) -> None:
    sql = "SELECT id, price FROM items WHERE qty = 1"
    plan = plan_fanout(sql, "items.id")
    columns, rows, tag = decoded(merge(plan, [raw_reply(connections[s], plan.shard_sql) for s in SCHEMAS]))
    expected_columns, expected_rows, expected_tag = decoded(raw_reply(connections[ALL], sql))
    assert (columns, sorted(rows), tag) == (expected_columns, sorted(expected_rows), expected_tag)


def test_ordering_by_text_is_refused_not_guessed(connections) -> None:
    sql = "SELECT id::text AS t FROM items ORDER BY t LIMIT 3"
    plan = plan_fanout(sql, "items.id")
    with pytest.raises(FanoutError, match="collation"):
        merge(plan, [raw_reply(connections[s], plan.shard_sql) for s in SCHEMAS])


def test_a_shard_error_is_the_answer(connections) -> None:
    plan = plan_fanout("SELECT nope FROM items", "items.id")
    out = merge(plan, [raw_reply(connections[s], plan.shard_sql) for s in SCHEMAS])
    assert out[0] == m.ERROR_RESPONSE and out.count(bytes([m.ERROR_RESPONSE])) >= 1
