"""One read on every shard, one result for the client (``default_shard = "all"``).

Two sans-IO halves:

* ``plan_fanout(sql, key)`` (pypool.routing.fanout_plan, sqlglot) decides whether the
  shards' results can be merged into exactly the result one database holding
  every row would give, and how; it returns the text each shard runs (LIMIT
  widened to LIMIT + OFFSET, ``avg(x)`` split into ``sum(x), count(x)``) or
  raises FanoutError naming the sharding key the query lacks.
* ``merge(plan, replies)`` takes each shard's reply messages (RowDescription,
  DataRows, CommandComplete; the simple protocol's ReadyForQuery may be
  included and is dropped) and returns the client's messages: the columns
  must be alike on every shard; rows are concatenated, or merged in ORDER BY
  order, then OFFSET/LIMIT applied; ``count``, ``sum``, ``min``, ``max`` and
  ``avg`` are combined (per group with GROUP BY); CommandComplete carries the
  number of rows sent.  The first ErrorResponse of any shard is the answer.

What is refused (never a wrong answer): DISTINCT, set operations (UNION...),
HAVING, window functions, aggregates other than the five or inside other
expressions, ORDER BY something not in the select list, non-constant
LIMIT/OFFSET, and, at merge time, ORDER BY/min/max on text (the shards'
collation decides that order, pypool cannot reproduce it) or on a type pypool
does not compare.  Results must be in text format.
"""

from __future__ import annotations

import datetime
import functools
import struct
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Callable, Iterable, Sequence

from pypool import sqlstates
from pypool.errors import FixedCodeError

from pypool.protocol import messages as m
from pypool.protocol.frames import MessageBuffer

__all__ = ["FanoutError", "FanoutPlan", "FanoutRefused", "OrderKey", "merge", "FanoutCollector"]


class FanoutError(FixedCodeError):
    """A read that cannot run on every shard and be merged exactly."""

    sqlstate = sqlstates.FEATURE_NOT_SUPPORTED


class FanoutRefused(Exception):
    """This request cannot run on every shard as sent; the text says why (pypool/session/shards.py)."""


@dataclass(frozen=True, slots=True)
class OrderKey:
    column: int  # output column index; -1: found by ``name`` in the RowDescription (SELECT *)
    descending: bool = False
    nulls_first: bool = False  # PostgreSQL: NULLS LAST for ASC, FIRST for DESC unless written
    name: str = ""


@dataclass(frozen=True, slots=True)
class FanoutPlan:
    shard_sql: str  # what every shard runs
    # Per column of the shards' rows: "row" (no aggregates: rows pass through), or
    # "group", "count", "sum", "min", "max", "avg_sum", "avg_count" (avg's two halves).
    columns: tuple[str, ...] = ()
    order_by: tuple[OrderKey, ...] = ()
    limit: int | None = None
    offset: int = 0
    reads_tables: bool = True  # False: SELECT now() and the like, one shard answers for all

    @property
    def aggregates(self) -> bool:
        return bool(self.columns) and self.columns[0] != "row"


# ------------------------------------------------------------------ merge

_ROW_DESCRIPTION_FIELD = struct.Struct("!IhIhih")  # table oid, attnum, type oid, size, typmod, format
PORTAL_SUSPENDED = ord("s")
_INT_TYPES = {20, 21, 23, 26, 28}  # int8 int2 int4 oid xid
_FLOAT_TYPES = {700, 701}
NUMERIC = 1700
FLOAT8 = 701
_SORTABLE: dict[int, Callable[[str], object]] = {
    **{t: int for t in _INT_TYPES},
    **{t: float for t in _FLOAT_TYPES},
    NUMERIC: Decimal,
    16: lambda v: v == "t",  # bool
    1082: datetime.date.fromisoformat,
    1114: datetime.datetime.fromisoformat,
    1184: datetime.datetime.fromisoformat,  # ISO DateStyle, as PostgreSQL sends by default
}


@dataclass(frozen=True, slots=True)
class _Column:
    name: bytes
    table_oid: int
    attnum: int
    type_oid: int
    size: int
    typmod: int
    format: int

    def alike(self) -> tuple:
        # Table oids differ between shard databases; the rest must not.
        return (self.name, self.type_oid, self.size, self.typmod, self.format)


def _messages(data: bytes) -> Iterable[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        tag = data[pos]
        (length,) = struct.unpack_from("!I", data, pos + 1)
        yield tag, data[pos + 5:pos + 1 + length]
        pos += 1 + length


def _row_description(payload: bytes) -> list[_Column]:
    (count,) = struct.unpack_from("!h", payload, 0)
    pos, columns = 2, []
    for _ in range(count):
        end = payload.index(b"\x00", pos)
        fields = _ROW_DESCRIPTION_FIELD.unpack_from(payload, end + 1)
        columns.append(_Column(payload[pos:end], *fields))
        pos = end + 1 + _ROW_DESCRIPTION_FIELD.size
    return columns


def _encode_row_description(columns: Sequence[_Column]) -> bytes:
    body = [struct.pack("!h", len(columns))]
    for c in columns:
        body.append(c.name + b"\x00" + _ROW_DESCRIPTION_FIELD.pack(c.table_oid, c.attnum, c.type_oid, c.size,
                                                                   c.typmod, c.format))
    return m.message(m.ROW_DESCRIPTION, b"".join(body))


def _data_row(payload: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from("!h", payload, 0)
    pos, values = 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(payload[pos:pos + length])
            pos += length
    return values


def _encode_data_row(values: Sequence[bytes | None]) -> bytes:
    body = [struct.pack("!h", len(values))]
    for v in values:
        body.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return m.message(m.DATA_ROW, b"".join(body))


def merge(plan: FanoutPlan, replies: Sequence[bytes]) -> bytes:
    """The client's messages for the shards' ``replies`` (no ReadyForQuery).

    The first shard's reply is the template: its other messages (ParseComplete,
    BindComplete, ParameterDescription, notices) keep their places, its
    RowDescription and CommandComplete are replaced by the merged ones and the
    merged rows go just before CommandComplete. Without a RowDescription (an
    extended-protocol Execute without Describe) rows can only be concatenated.
    Raises FanoutError when the replies cannot be merged exactly.
    """
    described: list[_Column] | None = None
    rows: list[list[bytes | None]] = []
    for reply in replies:
        for tag, payload in _messages(reply):
            if tag == m.ERROR_RESPONSE:
                return m.message(tag, payload)
            if tag == m.ROW_DESCRIPTION:
                columns = _row_description(payload)
                if described is None:
                    described = columns
                elif [c.alike() for c in columns] != [c.alike() for c in described]:
                    raise FanoutError("the shards return different columns for this query (schemas differ)")
            elif tag == m.DATA_ROW:
                rows.append(_data_row(payload))
            elif tag == PORTAL_SUSPENDED:
                raise FanoutError("an Execute with a row limit cannot be merged across shards")
    if described is None:
        if plan.aggregates or plan.order_by:
            raise FanoutError("merging this query across shards needs its row description (Describe)")
    elif any(c.format != 0 for c in described):
        raise FanoutError("results in binary format cannot be merged across shards")
    if plan.aggregates:
        described, rows = _combine(plan, described, rows)
    ordered = sorted(rows, key=_sort_key(plan, described)) if plan.order_by else rows
    end = None if plan.limit is None else plan.offset + plan.limit
    sent = ordered[plan.offset:end]
    out = []
    for tag, payload in _messages(replies[0]):
        if tag == m.ROW_DESCRIPTION:
            out.append(_encode_row_description(described))
        elif tag == m.COMMAND_COMPLETE:
            out.extend(_encode_data_row(r) for r in sent)
            out.append(m.command_complete(f"SELECT {len(sent)}"))
        elif tag not in (m.DATA_ROW, m.READY_FOR_QUERY):
            out.append(m.message(tag, payload))
    return b"".join(out)


def _parser(column: _Column, why: str) -> Callable[[str], object]:
    parse = _SORTABLE.get(column.type_oid)
    if parse is None:
        raise FanoutError(f"{why} on column {column.name.decode(errors='replace')} (type oid "
                          f"{column.type_oid}) cannot be merged across shards: pypool cannot reproduce "
                          f"PostgreSQL's order for that type (text follows the shards' collation)")
    return parse


def _resolve(key: OrderKey, columns: Sequence[_Column]) -> OrderKey:
    if key.column >= 0:
        return key
    found = [i for i, c in enumerate(columns) if c.name.decode(errors="replace").lower() == key.name]
    if len(found) != 1:
        raise FanoutError(f"ORDER BY {key.name} must name one column of the result to be merged across shards")
    return OrderKey(found[0], key.descending, key.nulls_first)


def _sort_key(plan: FanoutPlan, columns: Sequence[_Column]) -> Callable[[list[bytes | None]], tuple]:
    keys = [_resolve(k, columns) for k in plan.order_by]
    parsers = [(k, _parser(columns[k.column], "ORDER BY")) for k in keys]

    def compare(a: list[bytes | None], b: list[bytes | None]) -> int:
        for k, parse in parsers:
            x, y = a[k.column], b[k.column]
            if x is None or y is None:
                if x is y:
                    continue
                null_before = -1 if k.nulls_first else 1  # NULLs: LAST for ASC, FIRST for DESC by default
                return null_before if x is None else -null_before
            vx, vy = parse(x.decode()), parse(y.decode())
            if vx != vy:
                result = -1 if vx < vy else 1
                return -result if k.descending else result
        return 0

    return functools.cmp_to_key(compare)


def _combine(plan: FanoutPlan, columns: list[_Column], rows: list[list[bytes | None]]):
    """Fold the shards' partial aggregates, per group; returns the output columns and rows."""
    kinds = plan.columns
    groups: dict[tuple, list[bytes | None]] = {}
    for row in rows:
        group = tuple(v for v, kind in zip(row, kinds) if kind == "group")
        current = groups.get(group)
        if current is None:
            groups[group] = list(row)
            continue
        for i, kind in enumerate(kinds):
            current[i] = _fold(kind, columns[i], current[i], row[i])
    if not groups and "group" not in kinds:
        return columns, []  # no shard answered a row (cannot happen for aggregates without GROUP BY)
    out_columns: list[_Column] = []
    for i, kind in enumerate(kinds):
        if kind == "avg_count":
            continue
        column = columns[i]
        if kind == "avg_sum":
            is_float = column.type_oid in _FLOAT_TYPES
            column = _Column(b"avg" if column.name == b"sum" else column.name, 0, 0,
                             FLOAT8 if is_float else NUMERIC, 8 if is_float else -1, -1, 0)
        out_columns.append(column)
    out_rows = []
    for row in groups.values():
        out = []
        for i, kind in enumerate(kinds):
            if kind == "avg_sum":
                out.append(_average(columns[i], row[i], row[i + 1]))
            elif kind != "avg_count":
                out.append(row[i])
        out_rows.append(out)
    return out_columns, out_rows


def _number(column: _Column, value: bytes):
    text = value.decode()
    if column.type_oid in _INT_TYPES:
        return int(text)
    if column.type_oid in _FLOAT_TYPES:
        return float(text)
    return Decimal(text)


def _fold(kind: str, column: _Column, a: bytes | None, b: bytes | None) -> bytes | None:
    if kind == "group":
        return a
    if kind in ("count", "avg_count"):
        return str(int(a or b"0") + int(b or b"0")).encode()
    if a is None or b is None:  # sum/min/max ignore the shards without rows
        return a if b is None else b
    if kind in ("sum", "avg_sum"):
        total = _number(column, a) + _number(column, b)
        return (repr(total) if isinstance(total, float) else str(total)).encode()
    parse = _parser(column, kind)
    va, vb = parse(a.decode()), parse(b.decode())
    if kind == "min":
        return a if va <= vb else b
    return a if va >= vb else b


def _average(column: _Column, total: bytes | None, count: bytes | None) -> bytes | None:
    n = int(count or b"0")
    if total is None or n == 0:
        return None
    if column.type_oid in _FLOAT_TYPES:
        return repr(float(total.decode()) / n).encode()
    return str(_numeric_div(Decimal(total.decode()), n)).encode()


def _base10000(value: Decimal) -> tuple[int, int]:
    """(weight, first digit) of a numeric in PostgreSQL's base-10000 digits."""
    value = abs(value)
    if value >= 1:
        whole = str(int(value))
        return (len(whole) - 1) // 4, int(whole[: len(whole) % 4 or 4])
    fraction = format(value, "f").partition(".")[2]
    for k in range(0, len(fraction), 4):
        group = int(fraction[k:k + 4].ljust(4, "0"))
        if group:
            return -(k // 4) - 1, group
    return 0, 0


def _numeric_div(total: Decimal, n: int) -> Decimal:
    """total / n as PostgreSQL's numeric division shows it (select_div_scale, rounded half away from zero)."""
    weight1, first1 = _base10000(total)
    weight2, first2 = _base10000(Decimal(n))
    qweight = weight1 - weight2 - (1 if first1 <= first2 else 0)
    scale = min(max(16 - qweight * 4, -min(total.as_tuple().exponent, 0), 0), 1000)
    with localcontext() as ctx:
        ctx.prec = 1100
        return (total / n).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


class FanoutCollector:
    """Every shard's reply to one fanned-out statement, then the one answer for the client.

    The session feeds each shard's server bytes as they arrive; when every
    shard has sent ReadyForQuery, ``result()`` is the client's reply: the
    merged messages (or an ErrorResponse saying why they cannot be merged)
    and the first shard's ReadyForQuery.
    """

    def __init__(self, plan: FanoutPlan, shards: int) -> None:
        self.plan = plan
        self._buffers = [MessageBuffer() for _ in range(shards)]
        self._replies = [bytearray() for _ in range(shards)]
        self._done = [False] * shards
        self._status = b"I"

    def feed(self, shard: int, data: bytes) -> bool:
        """Add bytes from ``shard``'s server; True once every shard's reply is complete."""
        buffer = self._buffers[shard]
        buffer.feed(data)
        while (message := buffer.next_message()) is not None:
            tag, payload = message
            if tag == m.READY_FOR_QUERY:
                self._done[shard] = True
                if shard == 0:
                    self._status = payload
            else:
                self._replies[shard] += m.message(tag, payload)
        return all(self._done)

    @property
    def complete(self) -> bool:
        return all(self._done)

    def result(self) -> bytes:
        try:
            body = merge(self.plan, [bytes(r) for r in self._replies])
        except FanoutError as exc:
            body = m.error_response_for(exc)
        return body + m.ready_for_query(self._status)
