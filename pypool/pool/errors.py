"""Why a pool gives a client no connection: a timeout, a pool closing or replaced, a failed health check.

Apart from pypool/pool/pool.py, which may be compiled (setup.py): a compiled subclass of an exception
loses the class-level attributes it sets (PoolerError's ``sqlstate``).
"""

from __future__ import annotations

from pypool import sqlstates
from pypool.errors import FixedCodeError
from pypool.pool.conversation import ServerError


class PoolTimeout(FixedCodeError):
    """No connection became free within checkout_timeout."""

    sqlstate = sqlstates.TOO_MANY_CONNECTIONS


class PoolRetired(Exception):
    """A config reload replaced this pool while a client waited in it: ask the new one.

    Not a PoolerError: the client follows the reload and no one sees this error.
    """


class PoolClosing(ServerError):
    """The shutdown drain closed this pool: it starts no transaction (57P01), only serves held BEGINs."""

    def __init__(self, label: str) -> None:
        super().__init__(f"pool for {label} is shutting down", {"C": sqlstates.ADMIN_SHUTDOWN})


class HealthCheckFailed(ServerError):
    """An idle connection failed its pre-checkout health check; it was closed."""
