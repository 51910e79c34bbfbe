"""automatic_sharding_key: the shards a statement's keys land on (issue 14), without a server.

Expected shards come from pg_bigint_hash, itself checked against PostgreSQL
(tests/integration/test_sharding_oracle.py). The first cases are PgCat's own
(query_router.rs, test_automatic_sharding_key, three shards).
"""

from __future__ import annotations

import struct

import pytest

from pypool.protocol import messages as m
from pypool.routing.shard_key import ShardKeyError, bind_parameters
from pypool.routing.shard_plan import ShardKeyFinder
from pypool.routing.sharding import pg_bigint_hash


def shard(key: int) -> int:
    return pg_bigint_hash(key, 3)


def finder(key: str = "data.id") -> ShardKeyFinder:
    return ShardKeyFinder(key, shard)


def one(key: int) -> frozenset[int]:
    return frozenset({shard(key)})


def test_pgcat_cases() -> None:
    f = finder()
    assert f.shards("SELECT * FROM data WHERE id = 5") == frozenset({2})
    assert f.shards("SELECT one, two, three FROM public.data WHERE id = 6") == frozenset({0})
    assert f.shards("SELECT * FROM data INNER JOIN t2 ON data.id = 5 AND t2.data_id = data.id "
                    "WHERE data.id = 5") == frozenset({2})
    # Ambiguous: an unqualified id with two tables names no key.
    assert f.shards("SELECT * FROM t2 INNER JOIN data ON id = 6 AND data.id = t2.data_id") is None
    assert f.shards('SELECT * FROM "public"."data" WHERE "id" = 6') == frozenset({0})
    assert f.shards('SELECT * FROM "public"."data" WHERE "data"."id" = 5') == frozenset({2})
    star = finder("*.unique_enough_column_name")
    assert star.shards("SELECT * FROM table_x WHERE unique_enough_column_name = 6") == frozenset({0})
    assert star.shards("SELECT * FROM table_y WHERE another_key = 5") is None


@pytest.mark.parametrize("sql,keys", [
    ("SELECT * FROM data WHERE id = -5", [-5]),
    ("SELECT * FROM data WHERE 7 = id", [7]),
    ("SELECT * FROM data WHERE id = '9'", [9]),
    ("SELECT * FROM data WHERE id = '9'::bigint", [9]),
    ("select * from DATA d where D.ID = 11", [11]),
    ("SELECT * FROM data WHERE id = 9223372036854775807", [9223372036854775807]),
    ("SELECT * FROM data WHERE id IN (1, 2, 3)", [1, 2, 3]),
    ("SELECT * FROM data WHERE id = 1 OR id = 4", [1, 4]),
    ("SELECT * FROM data WHERE (id = 1 OR id = 4) AND v > 2", [1, 4]),
    ("SELECT * FROM data WHERE v > 2 AND id = 8", [8]),
    ("(SELECT * FROM data WHERE id = 12)", [12]),
    ("UPDATE data SET v = v + 1 WHERE id = 13", [13]),
    ("DELETE FROM data WHERE id = 14", [14]),
    ("INSERT INTO data (v, id) VALUES ('a', 15)", [15]),
    ("INSERT INTO data (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')", [1, 2, 3]),
    ("BEGIN; SELECT * FROM data WHERE id = 16; COMMIT", [16]),
])
def test_keys_found(sql: str, keys: list[int]) -> None:
    assert finder().shards(sql) == frozenset(shard(k) for k in keys)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM data",
    "SELECT 1",
    "SELECT * FROM data WHERE id = 1 OR v = 2",  # rows with v = 2 may be on any shard
    "SELECT * FROM data WHERE id > 5",
    "SELECT * FROM data WHERE id = 1.5",
    "SELECT * FROM data WHERE id = 99999999999999999999",
    "SELECT * FROM data WHERE id IN (SELECT id FROM other)",
    "SELECT * FROM data WHERE id = v",
    "SELECT * FROM other WHERE id = 5",
    "SELECT * FROM (SELECT * FROM data WHERE id = 5) s",  # only the outermost statement, as PgCat
    "SELECT * FROM data LEFT JOIN t2 ON data.id = 5",
    "INSERT INTO data VALUES (5, 'a')",  # no column list: the key's position is unknown
    "INSERT INTO data (id) SELECT 5",
    "INSERT INTO data (id, v) VALUES (1, 'a'), (nextval('s'), 'b')",
    "INSERT INTO other (id) VALUES (5)",
    "not sql at all (",
])
def test_no_key(sql: str) -> None:
    assert finder().shards(sql) is None


def test_updating_the_key_is_refused() -> None:
    with pytest.raises(ShardKeyError, match="data.id"):
        finder().shards("UPDATE data SET id = 3 WHERE id = 5")


def bind(values: list[bytes | None], formats: list[int]) -> bytes:
    body = b"\x00\x00" + struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return m.message(m.BIND, body + b"\x00\x00")[5:]


def test_parameters_from_bind_text_and_binary() -> None:
    f = finder()
    sql = "SELECT * FROM data WHERE id = $2 AND v = $1"
    assert f.shards(sql, bind_parameters(bind([b"x", b"5"], []))) == one(5)
    assert f.shards(sql, bind_parameters(bind([b"x", struct.pack("!q", -77)], [0, 1]))) == one(-77)
    assert f.shards(sql, bind_parameters(bind([b"x", struct.pack("!i", 40)], [1]))) == one(40)
    assert f.shards(sql, bind_parameters(bind([b"x", None], []))) is None
    assert f.shards(sql, bind_parameters(bind([b"x", b"abc"], []))) is None
    assert f.shards(sql) is None  # no Bind values yet
    assert f.shards("INSERT INTO data (id, v) VALUES ($1, $2), (-$3, 'c')",
                    bind_parameters(bind([b"1", b"a", b"8"], []))) == frozenset({shard(1), shard(-8)})


def test_sqlglot_runs_once_per_statement_shape() -> None:
    f = finder()
    for key in range(50):
        assert f.shards(f"SELECT * FROM data WHERE id = {key} AND v = 'x{key}'") == one(key)
        assert f.shards(f"select *\n  from data where id = '{key}'") == one(key)
        assert f.shards("SELECT * FROM data WHERE id = $1", [(0, str(key).encode())]) == one(key)
    assert f.parses == 3
