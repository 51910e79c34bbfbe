"""Split PostgreSQL wire-protocol byte streams into messages (sans-IO).

Two framings exist on the wire:

* the startup phase, where a message is ``int32 length`` + ``int32 code`` +
  body and has no tag byte (StartupMessage, SSLRequest, GSSENCRequest,
  CancelRequest);
* everything after it, where a message is ``byte tag`` + ``int32 length`` +
  body, and the length counts itself but not the tag.

Nothing here touches a socket: callers feed bytes in and get messages out, so
the framing can be unit-tested and fuzzed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pypool import sqlstates
from pypool.errors import FATAL, FixedCodeError

HEADER_SIZE = 5  # tag + int32 length

PROTOCOL_VERSION_3 = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# A startup packet larger than this is garbage, not a client (PostgreSQL uses 10000).
MAX_STARTUP_PACKET = 10_000
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class ProtocolViolation(FixedCodeError):
    """The peer sent bytes that cannot be a valid message. The text is safe to send to it."""

    sqlstate = sqlstates.PROTOCOL_VIOLATION
    severity = FATAL


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int


StartupPacket = StartupMessage | SSLRequest | GSSEncRequest | CancelRequest


def parse_startup_packet(buf: bytes | bytearray) -> tuple[StartupPacket, int] | None:
    """Parse one startup-phase packet from the front of ``buf``.

    Returns ``(packet, bytes_consumed)``, or ``None`` while the packet is
    still incomplete. Raises ProtocolViolation for anything malformed.
    """
    if len(buf) < 4:
        return None
    length = int.from_bytes(buf[0:4], "big")
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    code = int.from_bytes(buf[4:8], "big")
    if code == SSL_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation("invalid SSLRequest length")
        return SSLRequest(), length
    if code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation("invalid GSSENCRequest length")
        return GSSEncRequest(), length
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise ProtocolViolation("invalid CancelRequest length")
        pid = int.from_bytes(buf[8:12], "big")
        key = int.from_bytes(buf[12:16], "big")
        return CancelRequest(pid, key), length
    major = code >> 16
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0"
        )
    params = _parse_cstring_pairs(bytes(buf[8:length]))
    if not params.get("user"):
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return StartupMessage(code, params), length


def _parse_cstring_pairs(body: bytes) -> dict[str, str]:
    # The body is name\0value\0 ... \0: an empty name ends the list, and that
    # terminating \0 must be the last byte (as PostgreSQL's own check has it).
    params: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        name_end = body.find(b"\x00", pos)
        if name_end < 0 or name_end == pos:
            break
        value_end = body.find(b"\x00", name_end + 1)
        if value_end < 0:
            raise ProtocolViolation("invalid startup packet layout: unpaired parameter")
        try:
            name = body[pos:name_end].decode("utf-8")
            value = body[name_end + 1:value_end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("invalid startup packet: parameters are not valid UTF-8") from exc
        params[name] = value
        pos = value_end + 1
    if pos != len(body) - 1 or body[pos] != 0:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    return params


def scan_messages(buf: bytes | bytearray | memoryview, start: int = 0,
                  max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> int:
    """Return the offset just past the last complete tagged message in ``buf``.

    Used by callers that only forward bytes and need not look inside them.
    Raises ProtocolViolation on an impossible length.
    """
    end = len(buf)
    pos = start
    while end - pos >= HEADER_SIZE:
        length = int.from_bytes(buf[pos + 1:pos + 5], "big")
        if length < 4 or length > max_size:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(buf[pos])!r}")
        nxt = pos + 1 + length
        if nxt > end:
            break
        pos = nxt
    return pos


@dataclass(slots=True)
class MessageBuffer:
    """Accumulates a byte stream and yields complete ``(tag, payload)`` messages.

    The coroutine-side code (startup, authentication, health checks) uses
    this; the relay hot path walks headers itself and never builds payloads.
    """

    max_size: int = DEFAULT_MAX_MESSAGE_SIZE
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_raw(self) -> bytes:
        """Remove and return everything buffered (used when switching to relay mode)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_message(self) -> tuple[int, bytes] | None:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        length = int.from_bytes(buf[1:5], "big")
        if length < 4 or length > self.max_size:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(buf[0])!r}")
        end = 1 + length
        if len(buf) < end:
            return None
        tag = buf[0]
        payload = bytes(buf[5:end])
        del buf[:end]
        return tag, payload

    def next_startup(self) -> StartupPacket | None:
        result = parse_startup_packet(self._buf)
        if result is None:
            return None
        packet, used = result
        del self._buf[:used]
        return packet
