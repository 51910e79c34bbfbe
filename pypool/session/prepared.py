"""Named prepared statements in transaction mode (sans-IO).

A driver prepares a statement once (``Parse`` with a name) and binds it in
later transactions, which transaction pooling may run on another server
connection -- one that lacks the statement, or holds another client's
statement of the same name. So pypool never lets a client's names reach a
server:

* each client's names map to a server-side name derived from the statement
  itself (``pypool_`` + a hash of query text and parameter types) and from
  what its description depends on (the database's schema generation,
  pypool/session/schema.py, and the client's search_path), so clients
  preparing the same statement share it on a server connection, and a Parse
  after a schema change parses again instead of reusing a stale statement;
* each server connection remembers which of those it has prepared, in an LRU
  bounded by ``prepared_statements_cache_size`` (evicted with ``Close``);
* a ``Bind``/``Describe`` of a statement the current server lacks is preceded
  by an injected ``Parse`` (itself preceded by a ``Close`` of the same name,
  so that a server holding it after all, e.g. because an error made it skip
  a ``DEALLOCATE ALL``, does not fail); a ``Parse`` of one it already has is
  not sent;
  a client's ``Close`` of a statement leaves the shared copy alone.

The server must still answer in order, so a replacement message is always
sent where the client expects an answer: a ``Parse`` the server need not run
and a client's ``Close`` both become ``Close`` of a name that never exists
(PostgreSQL answers CloseComplete without an error); the relay turns the
former's CloseComplete into ParseComplete. Replies the client did not ask
for (to injected ``Parse`` and eviction ``Close``) are swallowed by the relay.

The relay finds the replies to act on by position: each action records the
Sync epoch it belongs to and its rank among the ParseComplete/CloseComplete
replies of that epoch. An ErrorResponse makes the server skip the rest of
the epoch, so its unanswered actions are undone (a statement whose Parse
never ran is not on the server, an eviction Close that never ran left the
statement there) -- also those of messages the client sends after the
error was already relayed, which the server will skip as well.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Any

from pypool.protocol import messages as m
from pypool.session.schema import SchemaGeneration, invalidates_statements

SERVER_PREFIX = b"pypool_"
# A statement name no one prepares: closing it is a no-op that still gets a reply.
ABSENT_NAME = b"pypool_absent"
# The per-server cache size when the config says 0 (PgCat's "off"): passing
# named statements through untouched would run one client's statement for
# another, so pypool always maps them in transaction mode.
DEFAULT_CACHE_SIZE = 500
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
_CLOSE_ABSENT = m.message(m.CLOSE, b"S" + ABSENT_NAME + b"\x00")

# What the relay does with the reply an action waits for.
SWALLOW = 1  # an injected Parse's ParseComplete or an eviction Close's CloseComplete
AS_PARSE_COMPLETE = 2  # the no-op Close standing in for a Parse the server did not need
PASS = 3  # the client's own Parse, renamed: forwarded, undone if never answered


@dataclass(slots=True)
class Action:
    epoch: int  # Sync epoch (counted by ServerStatements.epoch) of the message
    rank: int  # 1-based rank among ParseComplete/CloseComplete replies in that epoch
    kind: int
    server_name: bytes
    parsed: bool  # True: a Parse (undo: forget it); False: an eviction Close (undo: keep it)
    client_name: bytes = b""


def server_name(body: bytes, context: bytes = b"") -> bytes:
    """Server-side name of a statement; ``body`` is Parse's query text and parameter types,
    ``context`` what its description depends on besides them (``ClientStatements.context``)."""
    digest = hashlib.blake2b(body, digest_size=12)
    if context:
        digest.update(b"\x00" + context)
    return SERVER_PREFIX + digest.hexdigest().encode()


class ServerStatements:
    """What one server connection has prepared, and the actions waiting for its replies."""

    __slots__ = ("capacity", "names", "actions", "epoch", "hits", "misses", "evictions", "parses", "binds", "schema")

    def __init__(self, capacity: int, schema: SchemaGeneration | None = None) -> None:
        self.capacity = capacity if capacity > 0 else DEFAULT_CACHE_SIZE
        self.schema = schema  # the server database's schema generation, moved on by stale-statement errors
        self.names: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # name -> body
        self.actions: collections.deque[Action] = collections.deque()
        self.epoch = 0  # ReadyForQuery replies seen while actions were waiting
        # For SHOW SERVERS (PgCat's prepare_cache_* columns).
        self.hits = 0  # a statement the server already had
        self.misses = 0  # a statement pypool had to prepare
        self.evictions = 0
        # For SHOW STATS_TOTALS (PgBouncer's client_parse_count, bind_count; misses are server parses).
        self.parses = 0  # named statements the clients prepared
        self.binds = 0  # Binds of named statements

    def add_counts_to(self, stats: Any) -> None:
        """Fold this connection's counts into its pool's PoolStats, as the connection ends."""
        stats.client_parse_count += self.parses
        stats.server_parse_count += self.misses
        stats.bind_count += self.binds

    def clear(self) -> None:
        """The server dropped every statement (DISCARD ALL, DEALLOCATE ALL)."""
        self.names.clear()

    # ------------------------------------------------------------ relay side

    def on_reply(self, answered: int) -> int:
        """A ParseComplete/CloseComplete, the ``answered``-th of the current epoch: what to do with it."""
        actions = self.actions
        head = actions[0]
        if head.epoch == self.epoch and head.rank == answered:
            actions.popleft()
            return head.kind
        return PASS

    def on_error(self, client: "ClientStatements | None") -> None:
        """The server skips the rest of the epoch: undo what those messages would have done."""
        actions = self.actions
        while actions and actions[0].epoch == self.epoch:
            action = actions.popleft()
            if action.client_name and client is not None:
                # The client's own Parse never ran: its name does not exist, as in PostgreSQL.
                client.forget_if(action.client_name, action.server_name)
            if action.kind == AS_PARSE_COMPLETE or not action.server_name:
                continue  # a no-op or precautionary Close: nothing to undo on the server
            if action.parsed:
                self.names.pop(action.server_name, None)
            else:
                self.names[action.server_name] = b""
                self.names.move_to_end(action.server_name, last=False)

    def on_ready(self) -> None:
        self.epoch += 1

    def on_error_response(self, data: bytes, start: int, end: int, client: "ClientStatements | None") -> None:
        """An ErrorResponse (fields at ``data[start:end]``) relayed to ``client``'s statements.

        The rest of the epoch is skipped (``on_error``), and a stale statement moves the schema on.

        PostgreSQL keeps a statement whose plan cannot be revalidated failing
        ("cached plan must not change result type", "cache lookup failed for
        type"); the driver answers by preparing it again, and that Parse must
        reach a server as a new statement, on every server connection.
        """
        if self.actions:
            self.on_error(client)
        if self.schema is not None and invalidates_statements(data, start, end):
            self.schema.bump()


class ClientStatements:
    """One client's named statements: client name -> (server name, Parse body)."""

    __slots__ = ("names", "changing_settings", "notifying", "schema", "search_path", "unnamed", "unnamed_on")

    def __init__(self, schema: SchemaGeneration | None = None) -> None:
        self.names: dict[bytes, tuple[bytes, bytes]] = {}
        # Names of statements that change session settings (a prepared SET): each Bind of
        # one must mark the session for read-back, as its text is not sent again.
        self.changing_settings: set[bytes] = set()
        self.notifying: set[bytes] = set()  # ... and those that may NOTIFY (pypool/listen.py, note_sender)
        self.schema = schema
        self.search_path = ""  # the client's, as pypool syncs it: names resolve through it
        # The unnamed statement: its last Parse body, and the server connection that surely still holds
        # it (the one it is attached to, until it lets go); a Bind elsewhere parses it again first.
        self.unnamed: bytes | None = None
        self.unnamed_on: object | None = None

    def context(self) -> bytes:
        """What a statement prepared now depends on besides its text: part of its server name."""
        if self.schema is None and not self.search_path:
            return b""
        generation = self.schema.value if self.schema is not None else 0
        return f"{generation}\x00{self.search_path}".encode()

    def forget_if(self, name: bytes, server: bytes) -> None:
        entry = self.names.get(name)
        if entry is not None and entry[0] == server:
            del self.names[name]

    def clear(self) -> None:
        self.names.clear()
        self.changing_settings.clear()
        self.notifying.clear()


def names_statement(tag: int, data: bytes, start: int, end: int) -> bool:
    """Whether the Parse/Bind/Describe/Close whose payload is ``data[start:end]`` names a statement.

    Unnamed statements and portals pass untouched. ``end`` may lie beyond
    ``data`` (a message split across reads): then the answer is True when
    the bytes at hand cannot tell, and the caller takes the careful path.
    """
    n = min(end, len(data))
    if tag == m.PARSE:
        return start >= n or data[start] != 0
    if tag == m.BIND:
        portal_end = data.find(b"\x00", start, n)
        return portal_end < 0 or portal_end + 1 >= n or data[portal_end + 1] != 0
    # Describe / Close: 'S' or 'P', then the name
    return start + 1 >= n or (data[start] == 83 and data[start + 1] != 0)


class Rewriter:
    """Turns one client's Parse/Bind/Describe/Close into what its current server needs.

    ``epoch`` and ``rank`` locate each message among the server's replies (see
    the module docstring); the caller keeps them: ``rank`` is how many
    Parse/Close messages were already sent since the last Sync.
    """

    __slots__ = ("client", "server", "epoch", "rank", "out")

    def __init__(self, client: ClientStatements, server: ServerStatements, epoch: int, rank: int) -> None:
        self.client = client
        self.server = server
        self.epoch = epoch
        self.rank = rank
        self.out: list[bytes] = []

    def message(self, tag: int, payload: bytes, raw: bytes) -> None:
        """Rewrite one whole message (``raw`` is it with its header)."""
        if tag == m.PARSE:
            self._parse(payload, raw)
        elif tag == m.BIND:
            self._bind(payload, raw)
        elif tag == m.DESCRIBE:
            self._describe(payload, raw)
        elif tag == m.CLOSE:
            self._close(payload, raw)
        else:
            self.out.append(raw)

    def _act(self, kind: int, name: bytes, parsed: bool, client_name: bytes = b"") -> None:
        self.server.actions.append(Action(self.epoch, self.rank, kind, name, parsed, client_name))

    def _send_counted(self, data: bytes) -> None:
        self.rank += 1
        self.out.append(data)

    def _parse(self, payload: bytes, raw: bytes) -> None:
        end = payload.find(b"\x00")
        if end <= 0:
            self._send_counted(raw)  # unnamed (or malformed: the server says so)
            return
        name = payload[:end]
        body = payload[end + 1:]
        target = server_name(body, self.client.context())
        self.client.names[name] = (target, body)
        server = self.server
        server.parses += 1
        if target in server.names:
            server.names.move_to_end(target)
            server.hits += 1
            self._send_counted(_CLOSE_ABSENT)
            self._act(AS_PARSE_COMPLETE, target, parsed=False, client_name=name)
            return
        self._prepare(target, body, PASS, name)

    def parse_unnamed(self) -> None:
        """Parse the client's unnamed statement again, before a Bind/Describe of it where the server lacks it."""
        self._send_counted(m.message(m.PARSE, b"\x00" + self.client.unnamed))  # type: ignore[operator]
        self._act(SWALLOW, b"", parsed=False)

    def _prepare(self, target: bytes, body: bytes, kind: int, client_name: bytes = b"") -> None:
        server = self.server
        server.misses += 1
        while len(server.names) >= server.capacity:
            evicted, _ = server.names.popitem(last=False)
            server.evictions += 1
            self._send_counted(m.message(m.CLOSE, b"S" + evicted + b"\x00"))
            self._act(SWALLOW, evicted, parsed=False)
        server.names[target] = body
        # Close first: should the server hold the name after all (a DEALLOCATE ALL that an
        # error made it skip), the Parse must not fail with "already exists".
        self._send_counted(m.message(m.CLOSE, b"S" + target + b"\x00"))
        self._act(SWALLOW, b"", parsed=False)
        self._send_counted(m.message(m.PARSE, target + b"\x00" + body))
        self._act(kind, target, parsed=True, client_name=client_name)

    def _server_name_for(self, name: bytes) -> bytes | None:
        """The server name of a client statement, prepared on the server first if needed."""
        entry = self.client.names.get(name)
        if entry is None:
            return None  # unknown: the server's own "does not exist" error is the right answer
        target, body = entry
        server = self.server
        if target in server.names:
            server.names.move_to_end(target)
            server.hits += 1
        else:
            self._prepare(target, body, SWALLOW)
        return target

    def _bind(self, payload: bytes, raw: bytes) -> None:
        portal_end = payload.find(b"\x00")
        stmt_end = payload.find(b"\x00", portal_end + 1)
        if portal_end < 0 or stmt_end <= portal_end + 1:
            self.out.append(raw)
            return
        target = self._server_name_for(payload[portal_end + 1:stmt_end])
        if target is None:
            self.out.append(raw)
            return
        self.server.binds += 1
        self.out.append(m.message(m.BIND, payload[:portal_end + 1] + target + payload[stmt_end:]))

    def _describe(self, payload: bytes, raw: bytes) -> None:
        if payload[:1] != b"S" or len(payload) < 3:
            self.out.append(raw)
            return
        target = self._server_name_for(payload[1:-1])
        self.out.append(raw if target is None else m.message(m.DESCRIBE, b"S" + target + b"\x00"))

    def _close(self, payload: bytes, raw: bytes) -> None:
        if payload[:1] != b"S" or len(payload) < 3:
            self._send_counted(raw)
            return
        # The client forgets its name; the server keeps the shared copy for others.
        self.client.names.pop(payload[1:-1], None)
        self._send_counted(_CLOSE_ABSENT)
