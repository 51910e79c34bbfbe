"""One admin console session: reads simple queries, runs their statements, writes the answers.

The console speaks the simple query protocol only, like PgCat's and PgBouncer's:
extended-protocol messages are refused once and discarded up to Sync. Each
statement runs here (``AdminCommands``) or, in a multi-process instance, on
every worker (``pypool.instance.Worker.admin_command``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from pypool import sqlstates
from pypool.admin.commands import AdminCommands, AdminError, Pooler
from pypool.protocol import messages as m
from pypool.protocol.frames import ProtocolViolation

log = logging.getLogger("pypool.admin")

# Extended-protocol messages: refused (simple protocol only), discarded up to Sync.
_EXTENDED = frozenset((m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.FLUSH))


class ConsoleSession(Protocol):
    """Who the console's client is (``pypool.session.session.ClientSession``)."""

    peer: str
    user: str
    database: str
    process_id: int
    secret_key: int


class ConsoleClient(Protocol):
    """The client connection a console runs on (``pypool.client.ClientConnection``, the asyncio adapter)."""

    app: Pooler
    session: ConsoleSession

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    async def authenticate(self, identity: Any) -> None: ...

    def greet(self, greeting: bytes) -> None: ...

    async def read_message(self) -> tuple[int, bytes]: ...

    def close(self) -> None: ...


class AdminConsole:
    def __init__(self, client: ConsoleClient) -> None:
        self.client = client
        self.commands = AdminCommands(client.app, client.session.peer)
        self.busy = False  # running a command (SHOW CLIENTS: "active")

    def write(self, data: bytes) -> None:
        client = self.client
        if not client.is_closing():
            client.write(data)

    async def run(self) -> None:
        client = self.client
        discarding = False
        while True:
            tag, payload = await client.read_message()
            if tag == m.TERMINATE:
                client.close()
                return
            if tag == m.QUERY:
                discarding = False
                await self.execute(m.parse_query(payload))
            elif tag == m.SYNC:
                discarding = False
                self.write(m.ready_for_query())
            elif tag in _EXTENDED:
                if not discarding:
                    discarding = True
                    self.write(m.error_response(
                        sqlstates.FEATURE_NOT_SUPPORTED,
                        "the pypool admin console supports only the simple query protocol",
                        hint="send admin commands as simple queries (psql does; in psycopg connect with "
                             "prepare_threshold=None and use execute() without parameters)"))
            else:
                raise ProtocolViolation(f"unexpected message type {chr(tag)!r} on the admin console")

    async def execute(self, sql: str) -> None:
        """One simple query: its statements in order, up to the first error, then ReadyForQuery."""
        statements = [s.strip() for s in sql.split(";")]
        statements = [s for s in statements if s]
        if not statements:
            self.write(m.empty_query_response() + m.ready_for_query())
            return
        out = []
        worker = self.client.app.worker  # one of several processes: answer for the whole instance
        self.busy = True
        try:
            for statement in statements:
                try:
                    out.append(await self.commands.run(statement) if worker is None
                               else await worker.admin_command(self.commands, statement))
                except AdminError as exc:
                    out.append(m.error_response_for(exc))
                    break
                except Exception as exc:  # noqa: BLE001 - a bug in one command must not end the session
                    log.exception("admin command %r failed", statement)
                    out.append(m.error_response(sqlstates.INTERNAL_ERROR, f"internal error in pypool: {exc}"))
                    break
        finally:
            self.busy = False
        out.append(m.ready_for_query())
        self.write(b"".join(out))
