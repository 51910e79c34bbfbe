"""Build and parse the protocol messages pypool itself sends or reads (sans-IO).

Relayed traffic is never decoded: only what the pooler answers on its own
(authentication, errors, its custom commands, the admin console) or must
inspect (query text for routing, server errors) goes through here.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from typing import Final

from pypool import sqlstates
from pypool.errors import PoolerError
from pypool.protocol.frames import CANCEL_REQUEST_CODE, PROTOCOL_VERSION_3, SSL_REQUEST_CODE, ProtocolViolation

# Frontend tags
QUERY: Final[int] = ord("Q")
PARSE: Final[int] = ord("P")
BIND: Final[int] = ord("B")
DESCRIBE: Final[int] = ord("D")
EXECUTE: Final[int] = ord("E")
CLOSE: Final[int] = ord("C")
SYNC: Final[int] = ord("S")
FLUSH: Final[int] = ord("H")
TERMINATE: Final[int] = ord("X")
COPY_DATA: Final[int] = ord("d")
COPY_DONE: Final[int] = ord("c")
COPY_FAIL: Final[int] = ord("f")
FUNCTION_CALL: Final[int] = ord("F")
PASSWORD: Final[int] = ord("p")  # PasswordMessage, SASLInitialResponse and SASLResponse share it

# Backend tags
AUTHENTICATION: Final[int] = ord("R")
PARAMETER_STATUS: Final[int] = ord("S")
BACKEND_KEY_DATA: Final[int] = ord("K")
READY_FOR_QUERY: Final[int] = ord("Z")
ERROR_RESPONSE: Final[int] = ord("E")
NOTICE_RESPONSE: Final[int] = ord("N")
NOTIFICATION_RESPONSE: Final[int] = ord("A")
COMMAND_COMPLETE: Final[int] = ord("C")
ROW_DESCRIPTION: Final[int] = ord("T")
DATA_ROW: Final[int] = ord("D")
EMPTY_QUERY_RESPONSE: Final[int] = ord("I")
PARSE_COMPLETE: Final[int] = ord("1")
BIND_COMPLETE: Final[int] = ord("2")
CLOSE_COMPLETE: Final[int] = ord("3")
COPY_IN_RESPONSE: Final[int] = ord("G")
COPY_OUT_RESPONSE: Final[int] = ord("H")
COPY_BOTH_RESPONSE: Final[int] = ord("W")

# Authentication request codes
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_INT32 = struct.Struct("!I")


def message(tag: int, payload: bytes = b"") -> bytes:
    return bytes((tag,)) + _INT32.pack(len(payload) + 4) + payload


def cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\x00"


# ---------------------------------------------------------------- backend side

def authentication_ok() -> bytes:
    return message(AUTHENTICATION, _INT32.pack(AUTH_OK))


def authentication_md5(salt: bytes) -> bytes:
    return message(AUTHENTICATION, _INT32.pack(AUTH_MD5) + salt)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    body = b"".join(cstr(m) for m in mechanisms) + b"\x00"
    return message(AUTHENTICATION, _INT32.pack(AUTH_SASL) + body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return message(AUTHENTICATION, _INT32.pack(AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return message(AUTHENTICATION, _INT32.pack(AUTH_SASL_FINAL) + data)


@functools.lru_cache(maxsize=1024)  # every login sends the same dozen settings
def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, cstr(name) + cstr(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(BACKEND_KEY_DATA, struct.pack("!II", process_id, secret_key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(READY_FOR_QUERY, status)


def command_complete(tag: str) -> bytes:
    return message(COMMAND_COMPLETE, cstr(tag))


def empty_query_response() -> bytes:
    return message(EMPTY_QUERY_RESPONSE)


def error_response(sqlstate: str, text: str, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    return message(ERROR_RESPONSE, _fields(severity, sqlstate, text, detail, hint))


def error_response_for(error: PoolerError) -> bytes:
    """The ErrorResponse a client sees for ``error``."""
    return error_response(error.sqlstate, str(error), error.severity, error.detail, error.hint)


def notice_response(text: str, severity: str = "NOTICE", sqlstate: str = sqlstates.SUCCESSFUL_COMPLETION,
                    detail: str | None = None) -> bytes:
    return message(NOTICE_RESPONSE, _fields(severity, sqlstate, text, detail, None))


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate), b"M" + cstr(text)]
    if detail:
        parts.append(b"D" + cstr(detail))
    if hint:
        parts.append(b"H" + cstr(hint))
    return b"".join(parts) + b"\x00"


def row_description(columns: Sequence[str | tuple[str, int]]) -> bytes:
    """Columns as names (sent as text, type oid 25) or ``(name, type_oid)``."""
    body = [struct.pack("!H", len(columns))]
    for col in columns:
        name, oid = (col, 25) if isinstance(col, str) else col
        size = {20: 8, 23: 4, 16: 1}.get(oid, -1)
        body.append(cstr(name) + struct.pack("!IhIhih", 0, 0, oid, size, -1, 0))
    return message(ROW_DESCRIPTION, b"".join(body))


def data_row(values: Sequence[object]) -> bytes:
    body = [struct.pack("!H", len(values))]
    for value in values:
        if value is None:
            body.append(struct.pack("!i", -1))
        else:
            if isinstance(value, bool):
                raw = b"t" if value else b"f"
            else:
                raw = str(value).encode("utf-8")
            body.append(struct.pack("!i", len(raw)) + raw)
    return message(DATA_ROW, b"".join(body))


def result_set(columns: Sequence[str | tuple[str, int]], rows: Iterable[Sequence[object]],
               tag: str | None = None) -> bytes:
    """RowDescription + DataRows + CommandComplete (no ReadyForQuery)."""
    rows = list(rows)
    out = [row_description(columns)]
    out.extend(data_row(r) for r in rows)
    out.append(command_complete(tag if tag is not None else f"SELECT {len(rows)}"))
    return b"".join(out)


# --------------------------------------------------------------- frontend side

def startup_message(params: dict[str, str]) -> bytes:
    body = _INT32.pack(PROTOCOL_VERSION_3) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _INT32.pack(len(body) + 4) + body


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, process_id, secret_key)


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST_CODE)


def query(sql: str) -> bytes:
    return message(QUERY, cstr(sql))


def password_message(password: bytes) -> bytes:
    return message(PASSWORD, password + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(PASSWORD, cstr(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(PASSWORD, data)


def terminate() -> bytes:
    return message(TERMINATE)


# ------------------------------------------------------------------- parsing

def read_cstring(payload: bytes, pos: int = 0) -> tuple[str, int]:
    end = payload.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("unterminated string in message")
    try:
        return payload[pos:end].decode("utf-8"), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid UTF-8 in message string") from exc


def parse_query(payload: bytes) -> str:
    """Text of a simple Query message."""
    return read_cstring(payload)[0]


def parse_parse(payload: bytes) -> tuple[str, str]:
    """(statement name, query text) of a Parse message."""
    name, pos = read_cstring(payload)
    text, _ = read_cstring(payload, pos)
    return name, text


def parse_sasl_initial_response(payload: bytes) -> tuple[str, bytes]:
    mechanism, pos = read_cstring(payload)
    if len(payload) < pos + 4:
        raise ProtocolViolation("truncated SASLInitialResponse")
    length = int.from_bytes(payload[pos:pos + 4], "big", signed=True)
    data = payload[pos + 4:]
    # -1 means "no initial response": then there must be no data after it either.
    if (0 if length == -1 else length) != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match its data")
    return mechanism, data


def parse_password(payload: bytes) -> bytes:
    if not payload.endswith(b"\x00"):
        raise ProtocolViolation("password message is not terminated")
    return payload[:-1]


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse fields keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        end = payload.find(b"\x00", pos + 1)
        if end < 0:
            break
        fields[code] = payload[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    name, pos = read_cstring(payload)
    value, _ = read_cstring(payload, pos)
    return name, value


def parse_auth_request(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise ProtocolViolation("truncated authentication request")
    return int.from_bytes(payload[:4], "big"), payload[4:]


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    try:
        return [m.decode("utf-8") for m in data.split(b"\x00") if m]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid UTF-8 in SASL mechanism list") from exc
