"""When a database's schema changed under its prepared statements (sans-IO).

Server-side statements are shared by every client whose statement has the
same identity (pypool/session/prepared.py). A statement's description --
parameter types, result columns -- depends on the catalogs as they were at
Parse time, so its identity includes a generation number of the database's
schema: DDL run through pypool and the errors PostgreSQL raises for a stale
statement move the generation on, and a Parse after that really parses
again on every server connection instead of reusing another client's stale
statement.
"""

from __future__ import annotations

from pypool import sqlstates

# PostgreSQL's routine that raises "cached plan must not change result type" (asyncpg keys on it too).
_REVALIDATE = b"\x00RRevalidateCachedQuery\x00"
_FEATURE_NOT_SUPPORTED = b"\x00C" + sqlstates.FEATURE_NOT_SUPPORTED.encode() + b"\x00"
# "cache lookup failed for type N" and its kin: an internal error, typically a statement
# that still names a catalog object that was dropped.
_INTERNAL_ERROR = b"\x00C" + sqlstates.INTERNAL_ERROR.encode() + b"\x00"


class SchemaGeneration:
    """A counter that moves on whenever a database's schema may have changed."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


_generations: dict[str, SchemaGeneration] = {}


def generation_for(database: str) -> SchemaGeneration:
    """The one generation of a server database (``name@host:port`` of its first server), shared by
    every pool and user that reaches it."""
    generation = _generations.get(database)
    if generation is None:
        generation = _generations[database] = SchemaGeneration()
    return generation


def invalidates_statements(data: bytes, start: int, end: int) -> bool:
    """Whether the ErrorResponse with fields at ``data[start:end]`` says a prepared statement went stale.

    (Fields are looked for after a NUL: the first field is the severity, never these.)
    """
    if data.find(_INTERNAL_ERROR, start, end) >= 0:
        return True
    return data.find(_FEATURE_NOT_SUPPORTED, start, end) >= 0 and data.find(_REVALIDATE, start, end) >= 0
