"""Which role (primary or replica) runs a client's next transaction, and why.

The router is asked once per transaction, when a client with no server
attached sends its first message. Inside a transaction the server stays
attached and nothing is classified: a write that reaches a replica is
refused by PostgreSQL itself (25006, read-only transaction), never moved.

Decision order:
1. a hint comment (``/* pypool: role=primary */``) decides one statement;
2. the client's ``SET SERVER ROLE TO 'primary'|'replica'`` override;
3. with the query parser on and read/write splitting on, the classification
   of the statement text (sqlglot, cached by fingerprint): anything not
   provably read-only goes to the primary;
4. otherwise the pool's ``default_role``.

PgCat's custom commands (``SET SERVER ROLE``, ``SHOW SERVER ROLE``,
``SET PRIMARY READS``, ``SHOW PRIMARY READS``, ``SET SHARDING KEY``,
``SET SHARD``, ``SHOW SHARD``) are recognised here and answered by the client
session without a server.

The shard (pools with several shards), in PgCat's order:
1. ``shard_id_regex`` / ``sharding_key_regex`` comments in the first
   ``regex_search_limit`` characters set the client's shard (it stays, as in PgCat);
2. with ``automatic_sharding_key``, the keys in the statement decide this one
   statement (several shards: a read fans out with ``default_shard = "all"``,
   anything else is refused rather than run on too few shards);
3. the client's shard from ``SET SHARD`` / ``SET SHARDING KEY`` / a comment;
4. otherwise ``Decision.shard`` is None and the session applies the pool's
   ``default_shard`` (``Router.sharding.target(decision.shard, healthy)``), except ``"all"``, which
   the router resolves: reads of a table fan out (``Decision.fanout``), writes
   are refused with an error naming the sharding key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from pypool import sqlstates
from pypool.roles import ANY, PRIMARY, REPLICA
from pypool.protocol import messages as m
from pypool.protocol.frames import ProtocolViolation
from pypool.routing.cache import ClassificationCache, number_shape
from pypool.routing.classify import DEFAULT_READ_ONLY_FUNCTIONS, Classification, role_hint
from pypool.routing.fanout import FanoutError, FanoutPlan
from pypool.routing.shard_key import ShardKeyError
from pypool.routing.sharding import ALL_SHARDS, parse_sharding_key

if TYPE_CHECKING:
    from pypool.config import Pool

# PgCat's custom commands, same grammar (case-insensitive, optional trailing ';').
_SET_SERVER_ROLE = re.compile(r"(?i)^\s*SET\s+SERVER\s+ROLE\s+TO\s+'(primary|replica|any|auto|default)'\s*;?\s*$")
_SHOW_SERVER_ROLE = re.compile(r"(?i)^\s*SHOW\s+SERVER\s+ROLE\s*;?\s*$")
_SET_PRIMARY_READS = re.compile(r"(?i)^\s*SET\s+PRIMARY\s+READS\s+TO\s+'?(on|off|default)'?\s*;?\s*$")
_SHOW_PRIMARY_READS = re.compile(r"(?i)^\s*SHOW\s+PRIMARY\s+READS\s*;?\s*$")
_SET_SHARDING_KEY = re.compile(r"(?i)^\s*SET\s+SHARDING\s+KEY\s+TO\s+'?([0-9]+)'?\s*;?\s*$")
_SET_SHARD = re.compile(r"(?i)^\s*SET\s+SHARD\s+TO\s+'?([0-9]+|ANY)'?\s*;?\s*$")
_SHOW_SHARD = re.compile(r"(?i)^\s*SHOW\s+SHARD\s*;?\s*$")
MEMO_SIZE = 10_000
# Transactions that only the primary can run, whatever their statements.
_PRIMARY_BEGINS = {"read write": "BEGIN READ WRITE", "serializable": "BEGIN ISOLATION LEVEL SERIALIZABLE"}
# Only these can start a custom command: a cheap filter before any regex.
_CUSTOM_PREFIXES = ("set server", "show server", "set primary", "show primary", "set shard", "show shard")


@dataclass(slots=True)
class RoutingState:
    """Per-client routing settings changed by PgCat's custom commands."""

    role_override: str | None = None  # "primary" | "replica" | "any"; None = automatic
    auto: bool = False  # SET SERVER ROLE TO 'auto' (SHOW SERVER ROLE says so)
    primary_reads: bool | None = None  # None = the pool's primary_reads_enabled
    shard: int | None = None  # SET SHARD, SET SHARDING KEY or a shard comment; None = by query/default_shard


@dataclass(frozen=True, slots=True)
class Decision:
    role: str  # PRIMARY, REPLICA or ANY
    reason: str
    # BEGIN with no statement yet: answer it locally and decide at the next statement.
    hold_begin: bool = False
    # The first statement closes a held-back, still empty transaction (COMMIT/ROLLBACK).
    ends_empty_transaction: bool = False
    end_tag: str = "COMMIT"
    statement: str = ""  # the held-back BEGIN's text, replayed on the chosen server
    reply: bytes | None = None  # a custom command answered by the pooler (no ReadyForQuery)
    # Sharded pools: the shard to run on; None = the pool's default_shard; ALL_SHARDS = fan out.
    shard: int | None = None
    fanout: FanoutPlan | None = None  # with ALL_SHARDS: what each shard runs and how replies merge
    # Refuse the statement with this ErrorResponse (no ReadyForQuery; extended protocol: skip to Sync).
    error: bytes | None = None
    # The key is a $n parameter: route again with the Bind values (``params``).
    needs_params: bool = False


class Router:
    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.splitting = pool.query_parser_enabled and pool.query_parser_read_write_splitting
        if pool.query_parser_enabled:
            import pypool.routing.query_tree  # noqa: F401 - sqlglot at start-up, not on a client's first read
        self.cache = ClassificationCache(
            read_only_functions=DEFAULT_READ_ONLY_FUNCTIONS | frozenset(pool.read_only_functions),
            max_length=pool.query_parser_max_length,
        )
        # Decisions by role, read by the metrics collector.
        self.decisions: dict[str, int] = {PRIMARY: 0, REPLICA: 0, ANY: 0}
        # Hot path: decisions for clients in the default state, by exact message payload.
        self._memo: dict[bytes, Decision] = {}
        self._shapes: dict[str, Decision] = {}  # ... and by number_shape of the text
        # A text over query_parser_max_length is not classified (it goes to the primary), whatever its shape.
        self._shape_max_length = pool.query_parser_max_length or float("inf")
        self._default_state = RoutingState()
        self._unparsed = Decision(self._default_role(), "default_role")
        self._plain = self._plain_decision(pool)
        self.sharding = pool.sharding
        # Shard routing (comments, keys, default_shard "all") only where there is a choice.
        self.sharded = pool.sharding.shards > 1
        key = pool.sharding.automatic_sharding_key
        self.key_finder = None
        if key and self.sharded:
            # The finder (like the parser and the fan-out planner) uses sqlglot: loaded only where needed.
            from pypool.routing.shard_plan import ShardKeyFinder

            self.key_finder = ShardKeyFinder(key, pool.sharding.shard_for_key)

    # --------------------------------------------------------- custom commands

    def custom_command(self, state: RoutingState, sql: str) -> bytes | None:
        """The pooler's own answer to a PgCat custom command, or None if ``sql`` is not one.

        The answer is complete but for ReadyForQuery, which the caller adds.
        """
        head = sql.lstrip()[:12].lower()
        if not head.startswith(_CUSTOM_PREFIXES):
            return None
        if match := _SET_SERVER_ROLE.match(sql):
            value = match.group(1).lower()
            # 'default' hands the choice back to the config, 'auto' to the parser. As in
            # PgCat, 'auto' on a pool without read/write splitting infers no role: any server.
            state.auto = value == "auto"
            if value == "default":
                state.role_override = None
            elif value == "auto":
                state.role_override = None if self.splitting else ANY
            else:
                state.role_override = value
            return m.command_complete("SET SERVER ROLE")
        if _SHOW_SERVER_ROLE.match(sql):
            return _show("server role", self.describe_role(state))
        if match := _SET_PRIMARY_READS.match(sql):
            value = match.group(1).lower()
            state.primary_reads = None if value == "default" else value == "on"
            return m.command_complete("SET PRIMARY READS")
        if _SHOW_PRIMARY_READS.match(sql):
            return _show("primary reads", "on" if self.primary_reads(state) else "off")
        if match := _SET_SHARDING_KEY.match(sql):
            key = parse_sharding_key(match.group(1))
            if key is None:
                return m.error_response(sqlstates.NUMERIC_VALUE_OUT_OF_RANGE,
                                        f"sharding key {match.group(1)} is out of range for type bigint")
            state.shard = self.sharding.shard_for_key(key)
            return m.command_complete("SET SHARDING KEY")
        if match := _SET_SHARD.match(sql):
            value = match.group(1)
            shards = self.sharding.shards
            shard = random.randrange(shards) if value.upper() == "ANY" else int(value)
            if shard >= shards:
                return self._unknown_shard(shard, state)
            state.shard = shard
            return m.command_complete("SET SHARD")
        if _SHOW_SHARD.match(sql):
            return _show("shard", "unset" if state.shard is None else str(state.shard))
        return None

    def _unknown_shard(self, shard: int, state: RoutingState) -> bytes:
        # PgCat's words; the client keeps its shard.
        current = "unset" if state.shard is None else state.shard
        return m.error_response(sqlstates.INVALID_PARAMETER_VALUE,
                                f"shard {shard} is not configured {self.sharding.shards}, staying on shard "
                                f"{current} (shard numbers start at 0)")

    def describe_role(self, state: RoutingState) -> str:
        if state.auto:
            return "auto"
        if state.role_override is not None:
            return state.role_override
        if self.splitting:
            return "auto"
        return self.pool.default_role

    def primary_reads(self, state: RoutingState) -> bool:
        return self.pool.primary_reads_enabled if state.primary_reads is None else state.primary_reads

    # ----------------------------------------------------------------- routing

    def route_default(self, message: bytes) -> Decision | None:
        """The decision for a client in the default routing state, memoised by message.

        ``message`` is one whole message, tag and length included. Returns
        None when it needs the full path (a custom command, a BEGIN to hold
        back, a message without statement text).
        """
        if self.sharded:
            return None  # the shard depends on the client's state and on values: full path
        if self._plain is not None and b"pypool" not in message:
            plain = self._plain  # only the primary can answer: only a hint comment could change the role
            self.decisions[plain.role] += 1
            return plain
        decision = self._memo.get(message)
        if decision is None:
            tag = message[0]
            if tag != m.QUERY and tag != m.PARSE:
                return None
            sql = _statement_text(tag, message[5:])
            # pgbench's "... WHERE aid = 12345": a new text each time, one shape.
            shape = number_shape(sql) if sql and len(sql) <= self._shape_max_length else None
            decision = self._shapes.get(shape) if shape is not None else None
            if decision is None:
                decision = self._decide_default(message, tag, sql, shape)  # the cache counts this one
                if decision is not None:
                    self.decisions[decision.role] += 1
                return decision
        # A memo hit is a classification without sqlglot: it counts in the cache's hit ratio.
        self.cache.hits += 1
        self.decisions[decision.role] += 1
        return decision

    def _decide_default(self, message: bytes, tag: int, sql: str | None, shape: str | None) -> Decision | None:
        """route_default's decision for a text neither memo knows, remembered; None for the full path."""
        if tag == m.QUERY and sql and self.custom_command(RoutingState(), sql) is not None:
            return None  # PgCat's custom commands change the client's state: full path
        decision = self._decide(self._default_state, tag, sql, False)
        if decision.hold_begin or decision.ends_empty_transaction:
            return None
        if shape is not None:
            if len(self._shapes) >= MEMO_SIZE:
                self._shapes.clear()  # a workload of endless distinct shapes: start over
            self._shapes[shape] = decision
        if shape is None or "?" not in shape:  # texts with literals would only churn the exact memo
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[message] = decision
        return decision

    def route(self, state: RoutingState, tag: int, payload: bytes, *, held_begin: bool = False,
              params: Sequence[tuple[int, bytes | None]] | None = None, sql: str | None = None) -> Decision:
        """The decision for one message (Query, Parse; Bind/Execute/Sync give no text).

        Sharded pools: ``params`` are the Bind values of the statement
        (``shard_key.bind_parameters``), ``sql`` its text when the message
        does not carry it (a Bind of a statement prepared earlier).
        """
        if sql is None:
            sql = _statement_text(tag, payload)
        commented = None
        if self.sharded and sql and self.sharding.comment_routing:
            commented = self.sharding.shard_from_comment(sql)
            if commented is not None:
                if commented >= self.sharding.shards:
                    return Decision(PRIMARY, "shard comment", error=self._unknown_shard(commented, state))
                state.shard = commented  # as in PgCat: a comment skips the custom commands
        if tag == m.QUERY and sql and commented is None:
            reply = self.custom_command(state, sql)
            if reply is not None:
                return Decision(PRIMARY, "custom command", reply=reply)
        decision = self._decide(state, tag, sql, held_begin)
        if self.sharded and not (decision.hold_begin or decision.ends_empty_transaction):
            decision = self._shard(decision, state, tag, sql, params)
            if held_begin and decision.shard == ALL_SHARDS:
                # A transaction stays on the server of its first statement: one shard.
                decision = replace(decision, shard=None, fanout=None, error=m.error_response(
                    sqlstates.FEATURE_NOT_SUPPORTED,
                    "a transaction runs on one shard: its first statement needs a value of the sharding key "
                    f"{self.sharding.automatic_sharding_key or '(or SET SHARD before BEGIN)'}"))
        self.decisions[decision.role] += 1
        return decision

    def _shard(self, decision: Decision, state: RoutingState, tag: int, sql: str | None,
               params: Sequence[tuple[int, bytes | None]] | None) -> Decision:
        shards = None
        if self.key_finder is not None and sql:
            if params is None and tag != m.QUERY and self.key_finder.uses_parameters(sql):
                return replace(decision, needs_params=True)
            try:
                shards = self.key_finder.shards(sql, params or ())
            except ShardKeyError as exc:
                return replace(decision, error=m.error_response_for(exc))
        if shards is not None and len(shards) == 1:
            return replace(decision, shard=next(iter(shards)))
        default_all = self.sharding.default_shard.kind == "all"
        if shards is not None and not (default_all and self._reads(sql)):
            listed = ", ".join(map(str, sorted(shards)))
            return replace(decision, error=m.error_response(
                sqlstates.FEATURE_NOT_SUPPORTED,
                f"the values of the sharding key {self.sharding.automatic_sharding_key} in this statement are on "
                f"shards {listed}; pypool runs a statement on one shard",
                hint="send one statement per shard" + ("" if default_all else
                                                       ', or set default_shard = "all" to run reads on every shard')))
        if shards is None and state.shard is not None:
            return replace(decision, shard=state.shard)
        if not default_all:
            return decision
        return self._everywhere(decision, sql)

    def _everywhere(self, decision: Decision, sql: str | None) -> Decision:
        """default_shard = "all": a read of tables runs on every shard, a write is refused."""
        key = self.sharding.automatic_sharding_key or "(SET SHARDING KEY, SET SHARD or a shard comment)"
        if sql is None:
            return replace(decision, error=m.error_response(
                sqlstates.FEATURE_NOT_SUPPORTED, f"no statement text to find the sharding key {key} in"))
        c = self.cache.classify(sql)
        if not c.has_statement:
            return replace(decision, shard=0)  # COMMIT, SET...: no rows to look for, any shard answers
        if c.writes:
            return replace(decision, error=m.error_response(
                sqlstates.FEATURE_NOT_SUPPORTED,
                f"a write must name its shard: this statement has no value of the sharding key {key}",
                hint='with default_shard = "all" only reads run on every shard'))
        from pypool.routing.fanout_plan import plan_fanout  # sqlglot: loaded by the first fan-out

        try:
            plan = plan_fanout(sql, key)
        except FanoutError as exc:
            return replace(decision, error=m.error_response_for(exc))
        if not plan.reads_tables:
            return replace(decision, shard=0)  # SELECT now(): one answer, not one per shard
        return replace(decision, shard=ALL_SHARDS, fanout=plan)

    def _reads(self, sql: str | None) -> bool:
        return sql is not None and not self.cache.classify(sql).writes

    def _decide(self, state: RoutingState, tag: int, sql: str | None, held_begin: bool) -> Decision:
        if sql is not None:
            hint = role_hint(sql) if "pypool" in sql else None
            if hint is not None:
                return Decision(hint, "hint comment")
        if state.role_override is not None:
            return Decision(state.role_override, "SET SERVER ROLE")
        if not self.splitting:
            return Decision(self._default_role(), "default_role")
        if sql is None:
            # Bind/Execute/Sync of a statement prepared earlier: its text is not at hand.
            return Decision(PRIMARY, "no statement text")
        classification = self.cache.classify(sql)
        if not classification.has_statement:
            return self._transaction_control(state, classification, tag, held_begin, sql)
        if classification.writes:
            return Decision(PRIMARY, classification.reason)
        if classification.begin in _PRIMARY_BEGINS:
            return Decision(PRIMARY, _PRIMARY_BEGINS[classification.begin])
        return Decision(self._read_role(state), classification.reason)

    def _read_role(self, state: RoutingState) -> str:
        # PgCat: with primary reads on, a read may go to any server, primary included.
        return ANY if self.primary_reads(state) else REPLICA

    def _transaction_control(self, state: RoutingState, c: Classification, tag: int,
                             held_begin: bool, sql: str) -> Decision:
        if c.begin in _PRIMARY_BEGINS:
            return Decision(PRIMARY, _PRIMARY_BEGINS[c.begin])
        if c.begin == "read only":
            return Decision(self._read_role(state), "BEGIN READ ONLY")
        if c.begin is not None and not c.ends_transaction and tag == m.QUERY:
            # A bare BEGIN decides nothing: wait for the first real statement.
            return Decision(PRIMARY, "BEGIN held back", hold_begin=True, statement=sql)
        if held_begin and c.ends_transaction and tag == m.QUERY:
            ends_with_rollback = sql.strip().rstrip(";").strip().lower().startswith(("rollback", "abort"))
            return Decision(PRIMARY, "empty transaction", ends_empty_transaction=True,
                            end_tag="ROLLBACK" if ends_with_rollback else "COMMIT")
        # COMMIT outside a transaction, SAVEPOINT, empty query...: any server answers alike.
        return Decision(PRIMARY, c.reason or "transaction control")

    def _plain_decision(self, pool: "Pool") -> Decision | None:
        """The decision for every message of a client in the default state, when the text cannot matter:
        no parser, or a pool whose reads can only go to its primary (no replica; a read meant for a
        replica still fails as before). None: the text decides."""
        if pool.sharding.shards > 1:
            return None
        only_primary = not pool.replicas() and pool.default_role != "replica"
        if only_primary and (not self.splitting or pool.primary_reads_enabled):
            return Decision(PRIMARY, "no replica")  # "any" is the primary: skip the balancer
        return None if self.splitting else self._unparsed

    def _default_role(self) -> str:
        role = self.pool.default_role
        return {"primary": PRIMARY, "replica": REPLICA}.get(role, ANY)


def _show(name: str, value: str) -> bytes:
    # PgCat's reply to its SHOW commands: one text column, tag "SELECT 1".
    return m.result_set([name], [[value]])


def _statement_text(tag: int, payload: bytes) -> str | None:
    try:
        if tag == m.QUERY:
            return m.parse_query(payload)
        if tag == m.PARSE:
            return m.parse_parse(payload)[1]
    except ProtocolViolation:
        return ""  # unreadable text: classified as a parse failure, so primary
    return None
