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
``SET PRIMARY READS``, ``SHOW PRIMARY READS``) are recognised here and
answered by the client session without a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pypool.pool.group import ANY, PRIMARY, REPLICA
from pypool.protocol import messages as m
from pypool.protocol.frames import ProtocolViolation
from pypool.routing.cache import ClassificationCache
from pypool.routing.classify import DEFAULT_READ_ONLY_FUNCTIONS, Classification, role_hint

if TYPE_CHECKING:
    from pypool.config import Pool

# PgCat's custom commands, same grammar (case-insensitive, optional trailing ';').
_SET_SERVER_ROLE = re.compile(r"(?i)^\s*SET\s+SERVER\s+ROLE\s+TO\s+'(primary|replica|any|auto|default)'\s*;?\s*$")
_SHOW_SERVER_ROLE = re.compile(r"(?i)^\s*SHOW\s+SERVER\s+ROLE\s*;?\s*$")
_SET_PRIMARY_READS = re.compile(r"(?i)^\s*SET\s+PRIMARY\s+READS\s+TO\s+'?(on|off|default)'?\s*;?\s*$")
_SHOW_PRIMARY_READS = re.compile(r"(?i)^\s*SHOW\s+PRIMARY\s+READS\s*;?\s*$")
MEMO_SIZE = 10_000
# Transactions that only the primary can run, whatever their statements.
_PRIMARY_BEGINS = {"read write": "BEGIN READ WRITE", "serializable": "BEGIN ISOLATION LEVEL SERIALIZABLE"}
# Only these can start a custom command: a cheap filter before any regex.
_CUSTOM_PREFIXES = ("set server", "show server", "set primary", "show primary")


@dataclass(slots=True)
class RoutingState:
    """Per-client routing settings changed by PgCat's custom commands."""

    role_override: str | None = None  # "primary" | "replica" | "any"; None = automatic
    auto: bool = False  # SET SERVER ROLE TO 'auto' (SHOW SERVER ROLE says so)
    primary_reads: bool | None = None  # None = the pool's primary_reads_enabled


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


class Router:
    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.splitting = pool.query_parser_enabled and pool.query_parser_read_write_splitting
        self.cache = ClassificationCache(
            read_only_functions=DEFAULT_READ_ONLY_FUNCTIONS | frozenset(pool.read_only_functions),
            max_length=pool.query_parser_max_length,
        )
        # Decisions by role, read by the metrics collector.
        self.decisions: dict[str, int] = {PRIMARY: 0, REPLICA: 0, ANY: 0}
        # Hot path: decisions for clients in the default state, by exact message payload.
        self._memo: dict[bytes, Decision] = {}
        self._default_state = RoutingState()
        self._unparsed = Decision(self._default_role(), "default_role")

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
            return m.result_set(["server role"], [[self.describe_role(state)]], tag="SHOW")
        if match := _SET_PRIMARY_READS.match(sql):
            value = match.group(1).lower()
            state.primary_reads = None if value == "default" else value == "on"
            return m.command_complete("SET PRIMARY READS")
        if _SHOW_PRIMARY_READS.match(sql):
            return m.result_set(["primary reads"], [["on" if self.primary_reads(state) else "off"]], tag="SHOW")
        return None

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
        if not self.splitting and b"pypool" not in message:
            decision = self._unparsed  # no parser: only a hint comment could change the role
            self.decisions[decision.role] += 1
            return decision
        decision = self._memo.get(message)
        if decision is not None:
            # A memo hit is a classification without sqlglot: it counts in the cache's hit ratio.
            self.cache.hits += 1
        else:
            tag = message[0]
            if tag != m.QUERY and tag != m.PARSE:
                return None
            payload = message[5:]
            if tag == m.QUERY and self.custom_command(RoutingState(), _text(payload)) is not None:
                return None  # PgCat's custom commands change the client's state: full path
            decision = self._decide(self._default_state, tag, _statement_text(tag, payload), False)
            if decision.hold_begin or decision.ends_empty_transaction:
                return None
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()  # a workload of endless distinct texts: start over
            self._memo[message] = decision
        self.decisions[decision.role] += 1
        return decision

    def route(self, state: RoutingState, tag: int, payload: bytes, *, held_begin: bool = False) -> Decision:
        sql = _statement_text(tag, payload)
        if tag == m.QUERY and sql:
            reply = self.custom_command(state, sql)
            if reply is not None:
                return Decision(PRIMARY, "custom command", reply=reply)
        decision = self._decide(state, tag, sql, held_begin)
        self.decisions[decision.role] += 1
        return decision

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

    def _default_role(self) -> str:
        role = self.pool.default_role
        return {"primary": PRIMARY, "replica": REPLICA}.get(role, ANY)


def _text(payload: bytes) -> str:
    return payload.rstrip(b"\x00").decode("utf-8", "replace")


def _statement_text(tag: int, payload: bytes) -> str | None:
    try:
        if tag == m.QUERY:
            return m.parse_query(payload)
        if tag == m.PARSE:
            return m.parse_parse(payload)[1]
    except ProtocolViolation:
        return ""  # unreadable text: classified as a parse failure, so primary
    return None
