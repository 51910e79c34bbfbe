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


def test_sharding_target_applies_default_shard() -> None:
    assert Sharding(shards=3).target(None) == 0
    assert Sharding(shards=3).target(2) == 2
    assert Sharding(shards=3, default_shard=DefaultShard("shard", 1)).target(None) == 1
    assert Sharding(shards=3, default_shard=DefaultShard("all")).target(None) == 0
    assert Sharding(shards=3, default_shard=DefaultShard("random_healthy")).target(None, healthy={2}) == 2


# ----------------------------------------------------------------- config

from pypool.config import ConfigError, parse_config  # noqa: E402

# Shaped like PgCat's own example pgcat.toml: pool sharded_db, three shards.
SHARDED = """
[general]
admin_username = "admin_user"
admin_password = "admin_pass"

[pools.sharded_db]
pool_mode = "transaction"
default_role = "any"
query_parser_enabled = true
primary_reads_enabled = true
sharding_function = "pg_bigint_hash"
{extra}

[pools.sharded_db.users.0]
username = "sharding_user"
password = "sharding_user"
pool_size = 5

[pools.sharded_db.users.1]
username = "other_user"
password = "other_user"
pool_size = 21

[pools.sharded_db.shards.0]
servers = [["127.0.0.1", 5432, "primary"], ["localhost", 5432, "replica"]]
database = "shard0"

[pools.sharded_db.shards.1]
servers = [["127.0.0.1", 5432, "primary"], ["localhost", 5432, "replica"]]
database = "shard1"

[pools.sharded_db.shards.2]
servers = [["127.0.0.1", 5432, "primary"], ["localhost", 5432, "replica"]]
database = "shard2"
"""


def sharded(extra: str = ""):
    text = SHARDED.format(extra=extra)
    if "sharding_function" in extra:
        text = text.replace('sharding_function = "pg_bigint_hash"\n', "", 1)
    return parse_config(text, "pgcat.toml")


def test_sharded_example_loads_with_pgcat_defaults() -> None:
    cfg = sharded()
    pool = cfg.pools["sharded_db"]
    assert [s.database for s in pool.shards] == ["shard0", "shard1", "shard2"]
    s = pool.sharding
    assert (s.shards, s.function, str(s.default_shard), s.regex_search_limit) == (3, "pg_bigint_hash", "shard_0", 1000)
    assert s.automatic_sharding_key is None and not s.comment_routing
    assert not any("sharding_function" in w for w in cfg.warnings)


def test_sharding_keys_are_read_and_validated() -> None:
    pool = sharded('automatic_sharding_key = "Data.ID"\nsharding_key_regex = "/\\\\* sharding_key: (\\\\d+) \\\\*/"\n'
                   'shard_id_regex = "/\\\\* shard_id: (\\\\d+) \\\\*/"\nregex_search_limit = 50\n'
                   'default_shard = "random_healthy"\nsharding_function = "sha1"').pools["sharded_db"]
    s = pool.sharding
    assert s.automatic_sharding_key == "data.id"
    assert s.shard_from_comment("/* shard_id: 2 */ SELECT 1") == 2
    assert s.shard_from_comment("/* sharding_key: 3 */ SELECT 1") == sha1(3, 3)
    assert (s.function, str(s.default_shard), s.regex_search_limit) == ("sha1", "random_healthy", 50)
    assert str(sharded('default_shard = "all"').pools["sharded_db"].sharding.default_shard) == "all"
    assert sharded('sharding_function = "PgBigintHash"').pools["sharded_db"].sharding.function == "pg_bigint_hash"


@pytest.mark.parametrize("extra,key,fragments", [
    ('default_shard = "shard_3"', "default_shard", ["shard_0..shard_2", '"shard_3"']),
    ('default_shard = "first"', "default_shard", ['"shard_<n>"', '"all"']),
    ('sharding_function = "md5"', "sharding_function", ['"pg_bigint_hash"', '"sha1"', '"md5"']),
    ('automatic_sharding_key = "id"', "automatic_sharding_key", ['"table.column"', '"id"']),
    ('automatic_sharding_key = "a.b.c"', "automatic_sharding_key", ['"a.b.c"']),
    ('shard_id_regex = "(unclosed"', "shard_id_regex", ["regular expression", '"(unclosed"']),
    ("regex_search_limit = 0", "regex_search_limit", ["positive integer"]),
])
def test_bad_sharding_settings_name_file_and_key(extra: str, key: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        sharded(extra)
    assert info.value.key == f"pools.sharded_db.{key}"
    assert info.value.path == "pgcat.toml"
    for fragment in fragments:
        assert fragment in info.value.reason


def test_sharding_settings_that_cannot_work_warn() -> None:
    warnings = sharded('shard_id_regex = "shard_id: \\\\d+"').warnings
    assert any("shard_id_regex" in w and "capture group" in w for w in warnings)
    no_parser = parse_config(SHARDED.format(extra='automatic_sharding_key = "data.id"').replace(
        "query_parser_enabled = true", "query_parser_enabled = false"), "pgcat.toml")
    assert no_parser.pools["sharded_db"].sharding.automatic_sharding_key is None
    assert any("automatic_sharding_key" in w and "query_parser_enabled" in w for w in no_parser.warnings)


def test_docker_example_same_server_as_primary_and_replica_loads() -> None:
    # Shaped like PgCat's examples/docker/pgcat.toml: one server listed as primary and as
    # replica in each of three shards, and the same username twice.
    text = """
[general]
admin_username = "postgres"
admin_password = "postgres"
[pools.sharded]
sharding_function = "pg_bigint_hash"
[pools.sharded.users.0]
username = "postgres"
password = "postgres"
pool_size = 9
[pools.sharded.users.1]
username = "postgres"
password = "postgres"
pool_size = 21
""" + "".join(f"""
[pools.sharded.shards.{i}]
servers = [["postgres", 5432, "primary"], ["postgres", 5432, "replica"]]
database = "postgres"
""" for i in range(3))
    cfg = parse_config(text, "pgcat.toml")
    pool = cfg.pools["sharded"]
    assert len(pool.shards) == 3 and pool.sharding.shards == 3
    assert [s.role for s in pool.shards[1].servers] == ["primary", "replica"]
    assert pool.users["postgres"].pool_size == 21
