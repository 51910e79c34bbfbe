"""Sharding functions, default_shard and comment routing without a server (issue 14).

The oracle for pg_bigint_hash is PostgreSQL itself
(tests/integration/test_sharding_oracle.py); here the vectors PgCat's own
tests use, and sha1 against a reference computed from its definition.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from pypool.routing.sharding import (
    ALL_SHARDS,
    INT64_MAX,
    INT64_MIN,
    DefaultShard,
    Sharding,
    parse_default_shard,
    parse_sharding_key,
    pg_bigint_hash,
    sha1,
)

# PgCat's test_pg_bigint_hash (5 shards), taken from PostgreSQL's partitions.
PGCAT_BIGINT_VECTORS = {
    0: [1, 4, 5, 14, 19, 39, 40, 46, 47, 53],
    1: [2, 3, 11, 17, 21, 23, 30, 49, 51, 54],
    2: [6, 7, 15, 16, 18, 20, 25, 28, 34, 35],
    3: [8, 12, 13, 22, 29, 31, 33, 36, 41, 43],
    4: [9, 10, 24, 26, 27, 32, 37, 38, 42, 45],
}


def test_pg_bigint_hash_matches_pgcat_vectors() -> None:
    for shard, keys in PGCAT_BIGINT_VECTORS.items():
        assert [pg_bigint_hash(k, 5) for k in keys] == [shard] * len(keys)


def test_pg_bigint_hash_spreads_keys_over_every_shard() -> None:
    counts = [0, 0, 0]
    for key in range(1, 3001):
        counts[pg_bigint_hash(key, 3)] += 1
    assert all(800 < c < 1200 for c in counts), counts


def test_sha1_matches_its_definition_and_pgcat_vectors() -> None:
    assert [sha1(k, 12) for k in range(20)] == [4, 7, 8, 3, 6, 0, 0, 10, 3, 11, 1, 7, 4, 4, 11, 2, 5, 0, 8, 3]
    for key in [0, 1, -1, 12345, INT64_MIN, INT64_MAX]:
        reference = int(hashlib.sha1(str(key).encode()).hexdigest()[-8:], 16) % 3
        assert sha1(key, 3) == reference


@pytest.mark.parametrize("text,key", [("5", 5), (" -7 ", -7), ("9223372036854775807", INT64_MAX),
                                      ("9223372036854775808", None), ("abc", None), ("1.5", None), ("", None)])
def test_parse_sharding_key_accepts_64_bit_integers_only(text: str, key: int | None) -> None:
    assert parse_sharding_key(text) == key


def test_default_shard_values() -> None:
    assert parse_default_shard("shard_2", 3) == DefaultShard("shard", 2)
    assert str(parse_default_shard("shard_0", 1)) == "shard_0"
    for value in ("random", "random_healthy", "all"):
        assert str(parse_default_shard(value, 3)) == value
    with pytest.raises(ValueError, match="shard_0..shard_2"):
        parse_default_shard("shard_3", 3)
    with pytest.raises(ValueError, match='"shard_<n>", "random"'):
        parse_default_shard("first", 3)


def test_default_shard_pick() -> None:
    assert DefaultShard("shard", 1).pick(3) == 1
    assert DefaultShard("all").pick(3) == ALL_SHARDS
    assert {DefaultShard("random").pick(3) for _ in range(200)} == {0, 1, 2}
    # random_healthy only picks healthy shards; none healthy: any shard rather than none.
    assert {DefaultShard("random_healthy").pick(3, healthy={2}) for _ in range(50)} == {2}
    assert DefaultShard("random_healthy").pick(3, healthy=set(), choice=min) == 0


COMMENTS = Sharding(shards=5, sharding_key_regex=re.compile(r"/\* sharding_key: (\d+) \*/"),
                    shard_id_regex=re.compile(r"/\* shard_id: (\d+) \*/"), regex_search_limit=40)


def test_comment_routing_follows_pgcat() -> None:
    assert COMMENTS.shard_from_comment("/* shard_id: 1 */ select 1 from foo;") == 1
    assert COMMENTS.shard_from_comment("/* shard_id: 0 */ select 1 from foo;") == 0
    # PgCat's test: sharding key 6 lands on shard 2 of 5.
    assert COMMENTS.shard_from_comment("/* sharding_key: 6 */ select 1 from foo;") == 2
    # shard_id_regex wins over sharding_key_regex.
    assert COMMENTS.shard_from_comment("/* sharding_key: 6 */ /* shard_id: 4 */ select") == 4
    assert COMMENTS.shard_from_comment(";") is None
    assert COMMENTS.shard_from_comment("select 1") is None


def test_comment_routing_looks_only_at_the_first_regex_search_limit_characters() -> None:
    padded = "select 1 /* padding padding padding */ /* shard_id: 3 */"
    assert COMMENTS.shard_from_comment(padded) is None
    assert Sharding(shards=5, shard_id_regex=COMMENTS.shard_id_regex).shard_from_comment(padded) == 3
