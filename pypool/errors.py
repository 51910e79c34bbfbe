"""The base of every error a client or the admin console sees: SQLSTATE, severity, message.

``protocol.messages.error_response_for`` turns one into the ErrorResponse the
client receives. This module imports nothing else of pypool's but the codes,
so that ``protocol.frames`` and ``protocol.auth`` can derive their errors from it.
"""

from __future__ import annotations

from pypool import sqlstates

ERROR = "ERROR"  # the request fails, the session goes on
FATAL = "FATAL"  # the connection ends after the ErrorResponse


class PoolerError(Exception):
    """An error pypool reports to a client as PostgreSQL would: ``str(error)`` is the message."""

    sqlstate: str = sqlstates.INTERNAL_ERROR
    severity: str = ERROR

    def __init__(self, sqlstate: str, message: str, severity: str | None = None,
                 hint: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        if severity is not None:
            self.severity = severity
        self.hint = hint
        self.detail = detail

    @property
    def message(self) -> str:
        return str(self)


class FixedCodeError(PoolerError):
    """A kind of error whose SQLSTATE and severity are the class's own: raised with a message only."""

    def __init__(self, message: str = "") -> None:
        super().__init__(self.sqlstate, message)


class LoginRefused(PoolerError):
    """Ends a login with an ErrorResponse: the limits, the access rules or the pool list turn it away."""

    severity = FATAL


class ProtocolViolation(FixedCodeError):
    """The peer sent bytes that cannot be a valid message. The text is safe to send to it.

    Defined here, not in protocol/frames.py that raises it, because that module may be compiled
    (setup.py) and a compiled subclass loses its class-level ``sqlstate``.
    """

    sqlstate = sqlstates.PROTOCOL_VIOLATION
    severity = FATAL
