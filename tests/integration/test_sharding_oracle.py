"""pg_bigint_hash against its oracle, PostgreSQL itself (issue 14).

A table ``PARTITION BY HASH (id)`` with partitions ``MODULUS n, REMAINDER i``
stores each id in the partition pypool must pick as shard ``i``. The table
lives in a schema of its own on the local primary, dropped afterwards.
"""

from __future__ import annotations

import random

import psycopg
import pytest

from pypool.routing.sharding import INT64_MAX, INT64_MIN, pg_bigint_hash
from tests.conftest import DATABASE, PASSWORD, USER

SCHEMA = "pypool_shard_oracle"


def _keys() -> list[int]:
    rng = random.Random(14)
    keys = set(range(-2000, 8001))  # 1..10,000 of the issue, negatives and 0 among them
    keys |= {INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, -1, 1 << 31, (1 << 31) - 1,
             -(1 << 31), (1 << 32), (1 << 32) - 1, -(1 << 32)}
    keys |= {rng.randint(INT64_MIN, INT64_MAX) for _ in range(3000)}
    return sorted(keys)


@pytest.mark.parametrize("modulus", [3, 5, 7])
def test_pg_bigint_hash_picks_the_partition_postgresql_stores_the_row_in(pg_cluster, modulus: int) -> None:
    keys = _keys()
    dsn = f"host=127.0.0.1 port={pg_cluster[0].port} user={USER} password={PASSWORD} dbname={DATABASE}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA}_{modulus} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}_{modulus}")
        try:
            schema = f"{SCHEMA}_{modulus}"
            conn.execute(f"CREATE TABLE {schema}.t (id bigint) PARTITION BY HASH (id)")
            for remainder in range(modulus):
                conn.execute(f"CREATE TABLE {schema}.p{remainder} PARTITION OF {schema}.t "
                             f"FOR VALUES WITH (MODULUS {modulus}, REMAINDER {remainder})")
            with conn.cursor() as cur:
                with cur.copy(f"COPY {schema}.t (id) FROM STDIN") as copy:
                    for key in keys:
                        copy.write_row((key,))
            rows = conn.execute(f"SELECT id, tableoid::regclass::text FROM {schema}.t").fetchall()
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    stored = {key: int(table.rsplit(".p", 1)[1]) for key, table in rows}
    assert len(stored) == len(keys)
    wrong = [(key, stored[key], pg_bigint_hash(key, modulus)) for key in keys
             if pg_bigint_hash(key, modulus) != stored[key]]
    assert wrong == [], f"{len(wrong)} keys on another partition, first: {wrong[:5]}"
