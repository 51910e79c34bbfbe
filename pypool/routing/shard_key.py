"""The shards a statement's ``automatic_sharding_key`` values land on: the parts without sqlglot.

The finder itself (:class:`pypool.routing.shard_plan.ShardKeyFinder`) parses
statements with sqlglot and is imported only by sharded pools with a key;
this module holds what the session needs for every sharded pool (the Bind
values, the error) and imports nothing heavy.

With ``automatic_sharding_key = "table.column"`` (or ``"*.column"``) the key
is read from the statement itself (sqlglot, dialect postgres):

* ``WHERE column = <value>`` and ``column IN (<values>)``, also inside
  ``AND``/``OR`` and in ``INNER JOIN ... ON`` (equivalent to WHERE for inner
  joins), for SELECT, UPDATE and DELETE;
* each row of ``INSERT INTO table (..., column, ...) VALUES (...), (...)``.

A value is an integer literal (also ``-5``, ``'5'``, ``'5'::bigint``) or a
``$n`` parameter, resolved from the extended protocol's Bind values.

What the WHERE clause restricts is computed, not guessed: ``id = 1 OR id = 2``
is both shards, ``id = 1 OR name = 'x'`` is every shard (no key), ``id = 1
AND name = 'x'`` is shard(1).  (PgCat takes any ``id = <n>`` it finds, even
under an OR; pypool does not, so it never narrows a query to too few shards.)

Column names compare case-insensitively, as PgCat does; an unqualified column
is the key only when the statement reads one table and that table is the
key's (``public.t`` counts as ``t``); a qualified one may use the table's
alias.  Only the outermost statement is looked at, as in PgCat: keys inside
subqueries and CTEs do not route.

Plans are literal-independent and cached: by the exact text (extended
protocol, ``$n`` parameters) and, for texts with literals, by fingerprint, so
sqlglot runs once per statement shape; a cache hit costs a fingerprint pass
that also collects the literals.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

from pypool import sqlstates
from pypool.errors import FixedCodeError


__all__ = ["ShardKeyError", "Param", "Value", "LITERAL_BASE", "bind_parameters"]

# Literal number i of a fingerprint is parsed as parameter $(LITERAL_BASE + i):
# PostgreSQL's own parameters stop at $65535.
LITERAL_BASE = 1_000_000


class ShardKeyError(FixedCodeError):
    """A statement pypool refuses to route (an UPDATE of the sharding key)."""

    sqlstate = sqlstates.FEATURE_NOT_SUPPORTED


@dataclass(frozen=True, slots=True)
class Param:
    number: int  # $n; n >= LITERAL_BASE: a literal of the fingerprinted text


Value = Union[int, Param, None]  # None: not a value pypool can read (an expression)


def bind_parameters(payload: bytes) -> list[tuple[int, bytes | None]]:
    """(format code, raw value or None for NULL) of each parameter of a Bind message payload."""
    pos = payload.index(b"\x00") + 1  # portal
    pos = payload.index(b"\x00", pos) + 1  # statement
    (nformats,) = struct.unpack_from("!h", payload, pos)
    formats = struct.unpack_from(f"!{nformats}h", payload, pos + 2)
    pos += 2 + 2 * nformats
    (nparams,) = struct.unpack_from("!h", payload, pos)
    pos += 2
    out: list[tuple[int, bytes | None]] = []
    for i in range(nparams):
        (length,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        fmt = formats[0] if nformats == 1 else (formats[i] if nformats else 0)
        if length < 0:
            out.append((fmt, None))
        else:
            out.append((fmt, payload[pos:pos + length]))
            pos += length
    return out
