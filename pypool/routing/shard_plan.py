"""ShardKeyFinder: the shards a statement's ``automatic_sharding_key`` values land on (sqlglot).

What it reads is described in :mod:`pypool.routing.shard_key`; this module is
imported only by a sharded pool with an ``automatic_sharding_key``, so that
other pools do not load sqlglot (about 30 MiB per process).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from pypool.routing.cache import fingerprint_literals
from pypool.routing.shard_key import LITERAL_BASE, Param, ShardKeyError, Value
from pypool.routing.sharding import parse_sharding_key

__all__ = ["ShardKeyFinder", "PLAN_CACHE_SIZE"]

PLAN_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class _Key:
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class _All:  # AND: every child restricts
    children: tuple["_Restriction", ...]


@dataclass(frozen=True, slots=True)
class _Any:  # OR: rows come from any child
    children: tuple["_Restriction", ...]


_Restriction = Union[_Key, _All, _Any, None]  # None: no restriction (every shard)


@dataclass(frozen=True, slots=True)
class _Plan:
    restrictions: tuple[_Restriction, ...]  # one per statement that names the key
    error: str | None = None


_NO_KEY = _Plan(())
_BY_TEXT = _Plan(())  # marker, compared by identity: plan each text of this fingerprint on its own


def _param_key(param: tuple[int, bytes | None]) -> int | None:
    fmt, raw = param
    if raw is None:
        return None
    if fmt == 1:  # binary int2/int4/int8, as PgCat reads them
        return int.from_bytes(raw, "big", signed=True) if len(raw) in (2, 4, 8) else None
    try:
        return parse_sharding_key(raw.decode("ascii"))
    except UnicodeDecodeError:
        return None


def _literal_key(text: str) -> int | None:
    """An integer written as a number or a plain '...' string literal."""
    if text[:1] == "'":
        text = text[1:-1] if text.endswith("'") else text[1:]
    key = parse_sharding_key(text)
    if key is None and text[:1].isdigit():
        try:
            key = parse_sharding_key(str(int(text, 0)))  # 0x1F, 0o17, 0b101
        except ValueError:
            return None
    return key


class ShardKeyFinder:
    """The shards of statements for one pool's ``automatic_sharding_key``."""

    def __init__(self, key: str, shard_for_key: Callable[[int], int], cache_size: int = PLAN_CACHE_SIZE) -> None:
        self.table, _, self.column = key.lower().partition(".")
        self.shard_for_key = shard_for_key
        self.cache_size = cache_size
        self._plans: OrderedDict[str, _Plan] = OrderedDict()
        self.parses = 0  # sqlglot runs (cache misses), for tests and metrics

    def shards(self, sql: str, params: Sequence[tuple[int, bytes | None]] = ()) -> frozenset[int] | None:
        """The shards the statement's keys land on, or None if it names no key.

        ``params`` are the Bind values (see ``bind_parameters``). Raises
        ShardKeyError for a statement pypool must refuse.
        """
        plan, literals = self._plan(sql)
        if plan.error is not None:
            raise ShardKeyError(plan.error)
        found: set[int] = set()
        for restriction in plan.restrictions:
            shards = self._evaluate(restriction, literals, params)
            if shards:
                found |= shards
        return frozenset(found) if found else None

    def uses_parameters(self, sql: str) -> bool:
        """Whether the key of ``sql`` comes from Bind values ($n): route it when they are known."""
        plan, _ = self._plan(sql)
        return any(_has_param(r) for r in plan.restrictions)

    # ----------------------------------------------------------- planning

    def _plan(self, sql: str) -> tuple[_Plan, list[str]]:
        plans = self._plans
        plan = plans.get(sql)
        if plan is not None and plan is not _BY_TEXT:
            plans.move_to_end(sql)
            return plan, []
        fp = fingerprint_literals(sql)
        if fp is not None and fp[1]:
            key, literals = fp
            plan = plans.get(key)
            if plan is None:
                text = _numbered(key)
                plan = (self._build(text) if text is not None else None) or _BY_TEXT
                self._remember(key, plan)
            if plan is not _BY_TEXT:
                plans.move_to_end(key)
                return plan, literals
            # This shape does not parse with parameters for its literals: plan each text alone.
        plan = self._build(sql) or _NO_KEY
        self._remember(sql, plan)
        return plan, []

    def _remember(self, key: str, plan: _Plan) -> None:
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.cache_size:
            self._plans.popitem(last=False)

    def _build(self, sql: str) -> _Plan | None:
        self.parses += 1
        try:
            statements = sqlglot.parse(sql, read="postgres")
        except SqlglotError:
            return None
        restrictions = []
        for statement in statements:
            while isinstance(statement, exp.Subquery):  # (SELECT ...)
                statement = statement.this
            if statement is None:
                continue
            try:
                restrictions.append(self._statement(statement))
            except ShardKeyError as exc:
                return _Plan((), str(exc))
        return _Plan(tuple(r for r in restrictions if r is not None))

    def _statement(self, node: exp.Expression) -> _Restriction:
        if isinstance(node, exp.Insert):
            return self._insert(node)
        if isinstance(node, (exp.Select, exp.Update, exp.Delete)):
            tables = _tables(node)
            if isinstance(node, exp.Update):
                for assignment in node.expressions:
                    if isinstance(assignment, exp.EQ) and self._is_key(assignment.this, tables):
                        raise ShardKeyError(f"an UPDATE cannot change the sharding key "
                                            f"{self.table}.{self.column}: the row would have to move to "
                                            f"another shard; delete it and insert it again")
            conditions = [j.args["on"] for j in node.args.get("joins") or ()
                          if j.args.get("on") is not None and _inner(j)]
            where = node.args.get("where")
            if where is not None:
                conditions.append(where.this)
            restriction = [self._restriction(c, tables) for c in conditions]
            restriction = [r for r in restriction if r is not None]
            if not restriction:
                return None
            return restriction[0] if len(restriction) == 1 else _All(tuple(restriction))
        return None

    def _insert(self, node: exp.Insert) -> _Restriction:
        target = node.this
        columns = target.expressions if isinstance(target, exp.Schema) else []
        table = target.this if isinstance(target, exp.Schema) else target
        if not isinstance(table, exp.Table) or not self._is_key_table(table.name):
            return None
        names = [c.name.lower() for c in columns]
        values = node.expression
        if self.column not in names or not isinstance(values, exp.Values):
            return None  # no column list (order unknown without the schema) or INSERT ... SELECT
        index = names.index(self.column)
        rows = []
        for row in values.expressions:
            items = row.expressions if isinstance(row, exp.Tuple) else [row]
            rows.append(_value(items[index]) if index < len(items) else None)
        # Every row's shard is needed (an unreadable row makes the INSERT keyless).
        return _Key(tuple(rows))

    def _restriction(self, node: exp.Expression, tables: dict[str, str]) -> _Restriction:
        if isinstance(node, exp.Paren):
            return self._restriction(node.this, tables)
        if isinstance(node, (exp.And, exp.Or)):
            left = self._restriction(node.left, tables)
            right = self._restriction(node.right, tables)
            if isinstance(node, exp.And):
                children = tuple(r for r in (left, right) if r is not None)
                return None if not children else children[0] if len(children) == 1 else _All(children)
            return None if left is None or right is None else _Any((left, right))
        if isinstance(node, exp.EQ):
            for column, value in ((node.this, node.expression), (node.expression, node.this)):
                if self._is_key(column, tables):
                    return _Key((_value(value),))
            return None
        if isinstance(node, exp.In) and self._is_key(node.this, tables) and not node.args.get("query"):
            return _Key(tuple(_value(v) for v in node.expressions))
        return None

    def _is_key_table(self, name: str) -> bool:
        return self.table == "*" or name.lower() == self.table

    def _is_key(self, node: exp.Expression, tables: dict[str, str]) -> bool:
        if not isinstance(node, exp.Column) or node.name.lower() != self.column:
            return False
        if self.table == "*":
            return True
        qualifier = node.table.lower()
        if qualifier:
            return tables.get(qualifier) == self.table
        return len(tables) == 1 and self.table in tables.values()  # one relation: no ambiguity

    # --------------------------------------------------------- evaluation

    def _evaluate(self, r: _Restriction, literals: list[str],
                  params: Sequence[tuple[int, bytes | None]]) -> frozenset[int] | None:
        if r is None:
            return None
        if isinstance(r, _Key):
            shards = set()
            for value in r.values:
                key = self._resolve(value, literals, params)
                if key is None:
                    return None  # one unreadable value: the rows may be anywhere
                shards.add(self.shard_for_key(key))
            return frozenset(shards)
        results = [self._evaluate(c, literals, params) for c in r.children]
        if isinstance(r, _All):
            known = [s for s in results if s is not None]
            if not known:
                return None
            shards = frozenset.intersection(*known)
            return shards or None  # contradictory keys: no row anywhere
        if any(s is None for s in results):
            return None
        return frozenset().union(*results)

    @staticmethod
    def _resolve(value: Value, literals: list[str], params: Sequence[tuple[int, bytes | None]]) -> int | None:
        if value is None or isinstance(value, int):
            return value
        sign, number = (-1, -value.number) if value.number < 0 else (1, value.number)
        if number >= LITERAL_BASE:
            index = number - LITERAL_BASE
            key = _literal_key(literals[index]) if index < len(literals) else None
        else:
            key = _param_key(params[number - 1]) if 0 < number <= len(params) else None
        return None if key is None else sign * key


def _has_param(r: _Restriction) -> bool:
    if isinstance(r, _Key):
        return any(isinstance(v, Param) and abs(v.number) < LITERAL_BASE for v in r.values)
    return r is not None and any(_has_param(c) for c in r.children)


def _inner(join: exp.Join) -> bool:
    return join.args.get("side") in (None, "") and (join.args.get("kind") or "").upper() in ("", "INNER")


def _tables(node: exp.Expression) -> dict[str, str]:
    """Names a column may be qualified with (table or alias, lower case) -> table name."""
    found: dict[str, str] = {}
    sources = []
    if isinstance(node, (exp.Update, exp.Delete)):
        sources.append(node.this)
    from_ = node.args.get("from") or node.args.get("from_")
    if from_ is not None:
        sources.append(from_.this)
    sources.extend(j.this for j in node.args.get("joins") or ())
    using = node.args.get("using")
    if isinstance(using, list):
        sources.extend(using)
    for source in sources:
        if isinstance(source, exp.Table) and source.name:
            name = source.name.lower()
            alias = source.alias.lower() if source.alias else name
            found[alias] = name
        elif source is not None:
            found[f"\x00{id(source)}"] = ""  # a subquery or function: another relation
    return found


def _value(node: exp.Expression) -> Value:
    """An integer constant, a parameter reference (negative: -$n), or None."""
    if isinstance(node, (exp.Cast, exp.Paren)):
        return _value(node.this)
    if isinstance(node, exp.Neg):
        inner = _value(node.this)
        if isinstance(inner, Param):
            return Param(-inner.number)
        return -inner if isinstance(inner, int) else None
    if isinstance(node, exp.Parameter) and isinstance(node.this, exp.Literal) and not node.this.is_string:
        return Param(int(node.this.this))
    if isinstance(node, exp.Literal):
        return _literal_key(f"'{node.this}'" if node.is_string else node.this)
    return None


def _numbered(fp: str) -> str | None:
    """The fingerprint with its i-th ``?`` written as ``$(LITERAL_BASE + i)``, or None if
    a ``?`` belongs to a prefixed literal (B'', X'', N'', U&'') that a parameter cannot replace."""
    parts = fp.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:]):
        before = out[-1][-1:] if out[-1] else ""
        if before.isalnum() or before in ("&", "_"):
            return None
        out.append(f"${LITERAL_BASE + i}")
        out.append(part)
    return "".join(out)
