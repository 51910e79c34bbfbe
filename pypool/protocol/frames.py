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

import struct
from dataclasses import dataclass, field
from typing import Iterable

from pypool.errors import ProtocolViolation  # imported from here by most modules

HEADER_SIZE = 5  # tag + int32 length
# A message's length field at an offset, read in place: int.from_bytes needs a slice first, and the
# walker reads one per relayed message (micro_relay --extended: about 1.5 us per transaction less).
length_at = struct.Struct("!I").unpack_from

PROTOCOL_VERSION_3 = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# A startup packet larger than this is garbage, not a client (PostgreSQL uses 10000).
MAX_STARTUP_PACKET = 10_000
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


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


def tag_table(tags: "Iterable[int]") -> bytes:
    """A lookup table of message types for ``FrameWalker.next``: byte ``t`` is 1 when ``t`` is in ``tags``."""
    table = bytearray(256)
    for tag in tags:
        table[tag] = 1
    return bytes(table)


ALL_TAGS = bytes((1,)) * 256
NO_TAGS = bytes(256)


class FrameWalker:
    """Finds message boundaries in one direction of a connection, whatever the chunking.

    The one header walk of pypool: the relays in both directions, the error
    paths and the tests use it. A caller starts each chunk with ``start``
    (only needed when ``held`` or ``skip`` is set), then asks ``next`` for the
    next message whose tag it cares about, and forwards the bytes in between
    untouched, so a large result streams through without being buffered.
    Across chunks the walker keeps a split header (or a message wanted whole)
    in ``held`` and the unread body of the last message as ``skip``.
    """

    __slots__ = ("held", "_need", "skip", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.held = bytearray()  # bytes of a message whose header (or whole body) is still arriving
        self._need = 0  # how many bytes ``held`` must reach before it can be walked
        self.skip = 0  # body bytes of the current message still to come
        self.max_size = max_size

    def reset(self) -> None:
        self.held.clear()
        self._need = 0
        self.skip = 0

    def take_held(self) -> bytes:
        """Hand over the start of a message not walked yet (another reader takes the stream over)."""
        held = bytes(self.held)
        self.held.clear()
        self._need = 0
        return held

    @property
    def mid_message(self) -> bool:
        """The stream stopped inside a message."""
        return bool(self.held) or self.skip > 0

    def start(self, data: bytes) -> tuple[bytes, int]:
        """The bytes to walk for a new chunk, and where its first header is (``len`` of them: none)."""
        held = self.held
        if held:
            held += data
            if len(held) < self._need:
                return b"", 0
            data = bytes(held)
            held.clear()
            self._need = 0
            return data, 0
        skip = self.skip
        n = len(data)
        if skip >= n:
            self.skip = skip - n
            return data, n
        self.skip = 0
        return data, skip

    def next(self, data: bytes, pos: int, n: int, stops: bytes, whole: bytes = NO_TAGS) -> tuple[int, int]:
        """``(offset, end)`` of the first message in ``data[pos:n]`` whose tag is in ``stops``.

        ``stops`` and ``whole`` are tables made by ``tag_table`` (an index is
        cheaper than a search, per message). ``n`` is ``len(data)`` (the relays
        know it already). A tag in ``whole`` is only returned once the whole message is in
        ``data``. When the chunk ends first, returns ``(offset, -1)``: the
        bytes before ``offset`` are complete and can be forwarded, the walker
        keeps the rest. Raises ProtocolViolation on an impossible length.
        """
        max_size = self.max_size
        while True:
            if n - pos < HEADER_SIZE:
                if pos >= n:
                    if pos > n:  # (at n, ``skip`` is what ``start`` left: the chunk may be all body)
                        self.skip = pos - n
                    return n, -1
                self.held += data[pos:]
                self._need = HEADER_SIZE
                return pos, -1
            tag = data[pos]
            length = length_at(data, pos + 1)[0]
            if length < 4 or length > max_size:
                raise ProtocolViolation(f"invalid message length {length} for message type {chr(tag)!r}")
            end = pos + 1 + length
            if stops[tag]:
                if end > n and whole[tag]:
                    self.held += data[pos:]
                    self._need = end - pos
                    return pos, -1
                return pos, end
            pos = end



def first_message(buf: bytes | bytearray, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> tuple[int, int] | None:
    """``(tag, end)`` of the message at the front of ``buf`` once it is whole, else None.

    Raises ProtocolViolation on an impossible length.
    """
    if len(buf) < HEADER_SIZE:
        return None
    tag = buf[0]
    length = int.from_bytes(buf[1:HEADER_SIZE], "big")
    if length < 4 or length > max_size:
        raise ProtocolViolation(f"invalid message length {length} for message type {chr(tag)!r}")
    end = 1 + length
    return (tag, end) if end <= len(buf) else None


@dataclass(slots=True)
class MessageBuffer:
    """Accumulates a byte stream and yields complete ``(tag, payload)`` messages.

    The coroutine-side code (startup, authentication, health checks) uses
    this; the relay hot path walks headers itself and never builds payloads.
    """

    max_size: int = DEFAULT_MAX_MESSAGE_SIZE
    buffered: bytearray = field(default_factory=bytearray)  # read by the relay: empty or not

    def feed(self, data: bytes) -> None:
        self.buffered += data

    def __len__(self) -> int:
        return len(self.buffered)

    def take_raw(self) -> bytes:
        """Remove and return everything buffered (used when switching to relay mode)."""
        data = bytes(self.buffered)
        self.buffered.clear()
        return data

    def next_message(self) -> tuple[int, bytes] | None:
        buf = self.buffered
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
        result = parse_startup_packet(self.buffered)
        if result is None:
            return None
        packet, used = result
        del self.buffered[:used]
        return packet
