"""What a client has asked its server connection and what is still owed (sans-IO).

One RequestTracker per server connection, restarted at each attach (each
client/server pairing). The client side reports every message it forwards
(``sent``), the server side every ReadyForQuery it relays (``ready``); the
tracker alone counts, so "has the server answered everything?" and "is this
client inside a transaction?" have one answer each.
"""

from __future__ import annotations

from pypool.protocol import messages as m

_Q = m.QUERY
_S = m.SYNC
_F = m.FUNCTION_CALL
_P = m.PARSE
_C = m.CLOSE
_EXECUTE = m.EXECUTE
_COPY_DATA = m.COPY_DATA
_COPY_TAGS = frozenset((m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL))
IDLE = ord("I")  # ReadyForQuery status: not in a transaction


class RequestTracker:
    __slots__ = ("status", "owed", "batch_open", "parse_rank", "parse_answered", "failed", "_syncs_after_execute")

    def __init__(self) -> None:
        self.status = IDLE  # transaction status byte of the last ReadyForQuery
        self.owed = 0  # ReadyForQuery replies still owed (one per Query, FunctionCall, Sync)
        self.batch_open = False  # extended-protocol messages sent after the last Sync
        # Prepared-statement bookkeeping (pypool/session/prepared.py): Parse/Close messages sent
        # since the last Sync, ParseComplete/CloseComplete replies since the last ReadyForQuery.
        self.parse_rank = 0
        self.parse_answered = 0
        self.failed = False  # an ErrorResponse since the last ReadyForQuery: the server skips to Sync
        self._syncs_after_execute = 0  # Syncs sent since the last Execute (see ``sent``)

    def begin(self) -> None:
        """A client was attached: nothing is owed to it yet."""
        self.owed = 0
        self.batch_open = False
        self.parse_rank = 0
        self.parse_answered = 0
        self.failed = False
        self._syncs_after_execute = 0

    @property
    def in_transaction(self) -> bool:
        """The server connection is inside a transaction or still owes replies."""
        return self.status != IDLE or self.owed > 0 or self.batch_open

    @property
    def idle_in_transaction(self) -> bool:
        """Inside a transaction with every request answered: the client's turn."""
        return self.status != IDLE and self.owed <= 0 and not self.batch_open

    # ------------------------------------------------------------ client side

    def sent(self, tag: int) -> None:
        """The client sent a message of type ``tag`` (not Terminate) to the server."""
        if tag == _Q or tag == _S or tag == _F:
            self.owed += 1
            self.batch_open = False
            self.parse_rank = 0
            self._syncs_after_execute = self._syncs_after_execute + 1 if tag == _S else 0
        elif tag in _COPY_TAGS:
            if tag != _COPY_DATA and self._syncs_after_execute:
                # A COPY FROM STDIN started by Execute: the server ignores Syncs that arrive
                # in copy-in mode (libpq sends one right after Execute), so they get no
                # ReadyForQuery of their own.
                self.owed -= self._syncs_after_execute
                self._syncs_after_execute = 0
        else:
            self.batch_open = True
            if tag == _EXECUTE:
                self._syncs_after_execute = 0
            elif tag == _P or tag == _C:
                self.parse_rank += 1

    def sent_rewritten(self, parse_rank: int) -> None:
        """An extended-protocol message went out rewritten, now ``parse_rank`` Parse/Close deep."""
        self.batch_open = True
        self.parse_rank = parse_rank

    # ------------------------------------------------------------ server side

    def ready(self, status: int) -> bool:
        """A ReadyForQuery with ``status``; True when everything asked has been answered."""
        self.status = status
        self.parse_answered = 0
        self.failed = False
        owed = self.owed = self.owed - 1
        if owed <= 0 and not self.batch_open:
            self.owed = 0  # as ``begin`` leaves it: the next attach need not call it
            self._syncs_after_execute = 0
            return True
        return False
