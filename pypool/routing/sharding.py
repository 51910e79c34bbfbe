"""Which shard a sharding key lands on: PgCat's two sharding functions, its
comment routing, and a pool's shard settings.

``pg_bigint_hash`` is PostgreSQL's own hash partitioning of one ``bigint``
column (``PARTITION BY HASH (id)``, partitions with ``MODULUS n``): the key is
hashed with ``hashint8extended(key, HASH_PARTITION_SEED)``, combined into a
row hash with ``hash_combine64(0, h)`` and the partition with remainder
``row_hash % n`` holds the row.  Shard ``i`` of a pool with ``n`` shards is
the partition ``FOR VALUES WITH (MODULUS n, REMAINDER i)``, so a table
hash-partitioned in one database can be split into shards without moving a
row.  Sources: PostgreSQL ``src/common/hashfn.c`` (``hash_bytes_uint32_extended``),
``src/backend/access/hash/hashfunc.c`` (``hashint8extended``),
``src/include/common/hashfn.h`` (``hash_combine64``),
``src/backend/partitioning/partbounds.c`` (``compute_partition_hash_value``).

``sha1`` is PgCat's own: the SHA-1 of the key's decimal text, the last 8 hex
digits as an integer, modulo the number of shards.

Keys are 64-bit signed integers, as in PgCat; anything else is not a key.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Collection

__all__ = [
    "HASH_PARTITION_SEED",
    "SHARDING_FUNCTIONS",
    "DEFAULT_REGEX_SEARCH_LIMIT",
    "ALL_SHARDS",
    "DefaultShard",
    "parse_default_shard",
    "parse_sharding_key",
    "pg_bigint_hash",
    "sha1",
    "Sharding",
]

# PostgreSQL's HASH_PARTITION_SEED (src/include/catalog/partition.h).
HASH_PARTITION_SEED = 0x7A5B22367996DCFD
DEFAULT_REGEX_SEARCH_LIMIT = 1000  # PgCat's default for regex_search_limit
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# default_shard = "all": the read runs on every shard (pypool addition).
ALL_SHARDS = -1

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M32; a ^= _rot(c, 4); c = (c + b) & _M32  # noqa: E702
    b = (b - a) & _M32; b ^= _rot(a, 6); a = (a + c) & _M32  # noqa: E702
    c = (c - b) & _M32; c ^= _rot(b, 8); b = (b + a) & _M32  # noqa: E702
    a = (a - c) & _M32; a ^= _rot(c, 16); c = (c + b) & _M32  # noqa: E702
    b = (b - a) & _M32; b ^= _rot(a, 19); a = (a + c) & _M32  # noqa: E702
    c = (c - b) & _M32; c ^= _rot(b, 4); b = (b + a) & _M32  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    c ^= b; c = (c - _rot(b, 14)) & _M32  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _M32  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _M32  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _M32  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _M32  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _M32  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _M32  # noqa: E702
    return a, b, c


def _seeded_state(seed: int) -> tuple[int, int, int]:
    """hash_bytes_uint32_extended's state after the seed is mixed in (it does
    not depend on the key, so it is computed once)."""
    a = b = c = (0x9E3779B9 + 4 + 3923095) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        a, b, c = _mix(a, b, c)
    return a, b, c


_PARTITION_STATE = _seeded_state(HASH_PARTITION_SEED)


def hashint8extended(value: int, seed: int = HASH_PARTITION_SEED) -> int:
    """PostgreSQL's ``hashint8extended(value, seed)`` as an unsigned 64-bit int."""
    lohalf = value & _M32
    hihalf = (value >> 32) & _M32
    lohalf ^= hihalf if value >= 0 else (~hihalf & _M32)
    a, b, c = _PARTITION_STATE if seed == HASH_PARTITION_SEED else _seeded_state(seed)
    _, b, c = _final((a + lohalf) & _M32, b, c)
    return (b << 32) | c


def _hash_combine64(a: int, b: int) -> int:
    return a ^ ((b + 0x49A0F4DD15E5A8E3 + ((a << 54) & _M64) + (a >> 7)) & _M64)


def pg_bigint_hash(key: int, shards: int) -> int:
    """The partition (remainder) PostgreSQL stores ``key`` in, for ``shards`` partitions."""
    return _hash_combine64(0, hashint8extended(key)) % shards


def sha1(key: int, shards: int) -> int:
    """PgCat's SHA-1 sharding: last 8 hex digits of sha1(str(key)), modulo shards."""
    return int(hashlib.sha1(str(key).encode()).hexdigest()[-8:], 16) % shards


SHARDING_FUNCTIONS: dict[str, Callable[[int, int], int]] = {"pg_bigint_hash": pg_bigint_hash, "sha1": sha1}


def parse_sharding_key(text: str) -> int | None:
    """A sharding key written as an integer (PgCat's i64), or None."""
    try:
        key = int(text.strip())
    except ValueError:
        return None
    return key if INT64_MIN <= key <= INT64_MAX else None


# ------------------------------------------------------------ default_shard


@dataclass(frozen=True, slots=True)
class DefaultShard:
    """Where a query that names no shard goes: ``shard_<n>`` (PgCat's default
    is shard 0), ``random``, ``random_healthy``, or pypool's ``all``."""

    kind: str  # "shard" | "random" | "random_healthy" | "all"
    shard: int = 0  # for kind "shard"

    def __str__(self) -> str:
        return f"shard_{self.shard}" if self.kind == "shard" else self.kind

    def pick(self, shards: int, healthy: Collection[int] | None = None,
             choice: Callable[[list[int]], int] = random.choice) -> int:
        """A shard number, or ALL_SHARDS for ``all``.

        ``healthy`` are the shards with a server that is not banned (only
        ``random_healthy`` looks at it; with none healthy it picks from all).
        """
        if self.kind == "shard":
            return self.shard
        if self.kind == "all":
            return ALL_SHARDS
        candidates = list(range(shards))
        if self.kind == "random_healthy" and healthy:
            candidates = [s for s in candidates if s in healthy] or candidates
        return choice(candidates)


SHARD_0 = DefaultShard("shard", 0)
_DEFAULT_SHARD_RE = re.compile(r"shard_([0-9]+)")


def parse_default_shard(value: str, shards: int) -> DefaultShard:
    """``default_shard`` as written in the config; ValueError says what is wrong."""
    if value in ("random", "random_healthy", "all"):
        return DefaultShard(value)
    match = _DEFAULT_SHARD_RE.fullmatch(value)
    if match is None:
        raise ValueError(f'expected "shard_<n>", "random", "random_healthy" or "all", got "{value}"')
    number = int(match.group(1))
    if number >= shards:
        raise ValueError(f'expected a configured shard, shard_0..shard_{shards - 1}, got "{value}"')
    return DefaultShard("shard", number)


# ------------------------------------------------------------ a pool's view


@dataclass(frozen=True, slots=True)
class Sharding:
    """A pool's sharding settings, ready to use (built once per config)."""

    shards: int = 1
    function: str = "pg_bigint_hash"
    default_shard: DefaultShard = SHARD_0
    automatic_sharding_key: str | None = None  # "table.column" or "*.column", lower case
    sharding_key_regex: re.Pattern[str] | None = None
    shard_id_regex: re.Pattern[str] | None = None
    regex_search_limit: int = DEFAULT_REGEX_SEARCH_LIMIT

    def settings(self) -> dict[str, str]:
        """The PgCat keys and their values as text (SHOW CONFIG); "-" for unset."""
        return {
            "sharding_function": self.function,
            "default_shard": str(self.default_shard),
            "automatic_sharding_key": self.automatic_sharding_key or "-",
            "sharding_key_regex": self.sharding_key_regex.pattern if self.sharding_key_regex else "-",
            "shard_id_regex": self.shard_id_regex.pattern if self.shard_id_regex else "-",
            "regex_search_limit": str(self.regex_search_limit),
        }

    def target(self, shard: int | None, healthy: Collection[int] | None = None) -> int:
        """The shard a routing decision runs on: its own (``Decision.shard``), else the
        pool's ``default_shard``. ``"all"`` is resolved by the router (fan-out or an
        error); what it leaves without a shard (transaction control) runs on shard 0.
        """
        if shard is not None:
            return shard
        if self.shards == 1 or self.default_shard.kind == "all":
            return 0
        return self.default_shard.pick(self.shards, healthy)

    def shard_for_key(self, key: int) -> int:
        return SHARDING_FUNCTIONS[self.function](key, self.shards)

    @property
    def comment_routing(self) -> bool:
        return self.shard_id_regex is not None or self.sharding_key_regex is not None

    def shard_from_comment(self, text: str) -> int | None:
        """The shard a query names in its first ``regex_search_limit``
        characters: ``shard_id_regex`` first, then ``sharding_key_regex``
        (PgCat's order); group 1 of the regex is the shard number or key.

        A shard number is returned as written, even one that is not
        configured: the caller refuses it (as PgCat does when it checks out).
        """
        head = text[: self.regex_search_limit]
        if self.shard_id_regex is not None:
            match = self.shard_id_regex.search(head)
            if match is not None and match.lastindex and match.group(1).isdigit():
                return int(match.group(1))
        if self.sharding_key_regex is not None:
            match = self.sharding_key_regex.search(head)
            if match is not None and match.lastindex:
                key = parse_sharding_key(match.group(1))
                if key is not None:
                    return self.shard_for_key(key)
        return None
