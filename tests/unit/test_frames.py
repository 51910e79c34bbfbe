"""pypool.protocol.frames: stream splitting, scanning and startup packets.

The property tests build valid message streams with the messages.py builders,
cut them at random places and check that the framing layer hands back exactly
what went in; the fuzz tests check that nothing but ProtocolViolation ever
escapes, whatever bytes arrive.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pypool.protocol import frames as f
from pypool.protocol import messages as m
from pypool.protocol.frames import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET,
    PROTOCOL_VERSION_3,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSEncRequest,
    MessageBuffer,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
    first_message,
    parse_startup_packet,
)

# ------------------------------------------------------------------ strategies

# Text that can travel in a C string: no NUL, no lone surrogates.
cstring_text = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=30,
)
nonempty_cstring_text = cstring_text.filter(bool)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)


def split_message(raw: bytes) -> tuple[int, bytes]:
    """(tag, payload) of one built message, read straight from its header."""
    length = int.from_bytes(raw[1:5], "big")
    assert length == len(raw) - 1, "builder produced an inconsistent length"
    return raw[0], raw[5:]


@st.composite
def parse_messages(draw) -> bytes:
    name = draw(cstring_text)
    sql = draw(cstring_text)
    oids = draw(st.lists(uint32, max_size=3))
    payload = m.cstr(name) + m.cstr(sql) + struct.pack(f"!H{len(oids)}I", len(oids), *oids)
    return m.message(m.PARSE, payload)


@st.composite
def bind_messages(draw) -> bytes:
    portal = draw(cstring_text)
    stmt = draw(cstring_text)
    params = draw(st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=3))
    body = [m.cstr(portal), m.cstr(stmt), struct.pack("!H", 0), struct.pack("!H", len(params))]
    for p in params:
        body.append(struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p)
    body.append(struct.pack("!H", 0))
    return m.message(m.BIND, b"".join(body))


row_values = st.lists(
    st.one_of(st.none(), st.booleans(), st.integers(), cstring_text),
    max_size=5,
)

any_message = st.one_of(
    cstring_text.map(m.query),
    parse_messages(),
    bind_messages(),
    row_values.map(m.data_row),
    st.builds(m.error_response, st.text(alphabet="0123456789ABCDEFP", min_size=5, max_size=5),
              cstring_text, detail=st.none() | cstring_text, hint=st.none() | cstring_text),
    st.builds(m.parameter_status, cstring_text, cstring_text),
    st.builds(m.command_complete, cstring_text),
    st.sampled_from([b"I", b"T", b"E"]).map(m.ready_for_query),
    st.builds(m.backend_key_data, uint32, uint32),
    st.just(m.terminate()),
    st.just(m.empty_query_response()),
    # random tags and payloads, including empty and NUL-filled ones
    st.builds(m.message, st.integers(min_value=0, max_value=255), st.binary(max_size=300)),
)

streams = st.lists(any_message, max_size=25)


def chunks_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(set(c for c in cuts if 0 < c < len(data)))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def drain(buf: MessageBuffer) -> list[tuple[int, bytes]]:
    out = []
    while (msg := buf.next_message()) is not None:
        out.append(msg)
    return out


# ------------------------------------------------------- MessageBuffer splits

@given(msgs=streams, data=st.data())
def test_message_buffer_returns_the_same_messages_whatever_the_split(msgs, data):
    stream = b"".join(msgs)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=max(len(stream), 1)), max_size=30))
    buf = MessageBuffer()
    got: list[tuple[int, bytes]] = []
    for chunk in chunks_at(stream, cuts):
        buf.feed(chunk)
        got.extend(drain(buf))
    assert got == [split_message(raw) for raw in msgs]
    assert len(buf) == 0
    assert buf.next_message() is None


@given(msgs=st.lists(any_message, min_size=1, max_size=8))
def test_message_buffer_byte_at_a_time(msgs):
    stream = b"".join(msgs)
    buf = MessageBuffer()
    got = []
    for i in range(len(stream)):
        buf.feed(stream[i:i + 1])
        got.extend(drain(buf))
    assert got == [split_message(raw) for raw in msgs]


@given(msgs=st.lists(any_message, min_size=1, max_size=8), data=st.data())
def test_incomplete_tail_stays_buffered(msgs, data):
    stream = b"".join(msgs)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    boundaries = _boundaries(msgs)
    complete = [b for b in boundaries if b <= cut]
    buf = MessageBuffer()
    buf.feed(stream[:cut])
    got = drain(buf)
    assert got == [split_message(raw) for raw in msgs[:len(complete) - 1]]
    assert len(buf) == cut - complete[-1]
    # take_raw hands back exactly the unconsumed tail and empties the buffer
    assert buf.take_raw() == stream[complete[-1]:cut]
    assert len(buf) == 0


def test_message_buffer_payload_is_bytes_not_a_view():
    buf = MessageBuffer()
    buf.feed(m.query("SELECT 1") + m.query("SELECT 2"))
    tag, payload = buf.next_message()
    assert (tag, payload) == (m.QUERY, b"SELECT 1\x00")
    assert type(payload) is bytes
    buf.feed(b"junk")  # must not disturb the payload already handed out
    assert payload == b"SELECT 1\x00"


# --------------------------------------------------------------- first_message

def _boundaries(msgs: list[bytes]) -> list[int]:
    out = [0]
    for raw in msgs:
        out.append(out[-1] + len(raw))
    return out


@given(msgs=streams, data=st.data())
def test_first_message_is_found_once_its_last_byte_arrived(msgs, data):
    stream = b"".join(msgs)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    prefix = stream[:cut]
    expected = (msgs[0][0], len(msgs[0])) if msgs and cut >= len(msgs[0]) else None
    assert first_message(prefix) == expected
    assert first_message(bytearray(prefix)) == expected  # the session's pending buffer is a bytearray


def test_first_message_rejects_impossible_lengths():
    for length in (0, 1, 2, 3):
        with pytest.raises(ProtocolViolation, match=r"invalid message length \d+ for message type 'Q'"):
            first_message(b"Q" + struct.pack("!I", length))
    # A length past the limit is refused before the body arrives.
    with pytest.raises(ProtocolViolation, match="invalid message length 101"):
        first_message(bytearray(b"D" + struct.pack("!I", 101)), max_size=100)
    assert first_message(b"D" + struct.pack("!I", 100), max_size=100) is None


def test_message_buffer_rejects_impossible_lengths():
    buf = MessageBuffer(max_size=1000)
    buf.feed(b"Q" + struct.pack("!I", 3))
    with pytest.raises(ProtocolViolation, match="invalid message length 3 for message type 'Q'"):
        buf.next_message()
    buf = MessageBuffer(max_size=1000)
    buf.feed(b"d" + struct.pack("!I", 1001))
    with pytest.raises(ProtocolViolation, match="invalid message length 1001"):
        buf.next_message()
    buf = MessageBuffer()
    buf.feed(b"Q" + struct.pack("!I", 0xFFFFFFFF))
    with pytest.raises(ProtocolViolation):
        buf.next_message()


@given(raw=st.binary(max_size=200), max_size=st.integers(min_value=4, max_value=300))
def test_tagged_framing_on_random_bytes_raises_only_protocol_violation(raw, max_size):
    buf = MessageBuffer(max_size=max_size)
    buf.feed(raw)
    first_length = None
    try:
        if (msg := buf.next_message()) is not None:
            first_length = 5 + len(msg[1])
        while buf.next_message() is not None:
            pass
    except ProtocolViolation as exc:
        assert str(exc)
    try:
        first = first_message(raw, max_size=max_size)
    except ProtocolViolation as exc:
        assert str(exc) and first_length is None
    else:
        # Both agree on the first message when it frames cleanly.
        assert first == (None if first_length is None else (raw[0], first_length))


# ------------------------------------------------------------- startup packets

startup_params = st.dictionaries(
    nonempty_cstring_text.filter(lambda k: k != "user"),
    cstring_text,  # values may be empty
    max_size=6,
).flatmap(lambda extra: nonempty_cstring_text.map(lambda user: {"user": user, **extra}))


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return struct.pack("!II", 8, GSSENC_REQUEST_CODE)


def raw_startup(body: bytes, code: int = PROTOCOL_VERSION_3) -> bytes:
    return struct.pack("!II", len(body) + 8, code) + body


startup_packets = st.one_of(
    startup_params.map(lambda p: (m.startup_message(p), StartupMessage(PROTOCOL_VERSION_3, p))),
    st.just((ssl_request(), SSLRequest())),
    st.just((gssenc_request(), GSSEncRequest())),
    st.builds(lambda pid, key: (m.cancel_request(pid, key), CancelRequest(pid, key)), uint32, uint32),
)


@given(packet=startup_packets, data=st.data())
def test_startup_packets_parse_when_split_anywhere(packet, data):
    raw, expected = packet
    assert len(raw) <= MAX_STARTUP_PACKET
    assert parse_startup_packet(raw) == (expected, len(raw))
    # Every proper prefix is "not yet", never an error.
    for cut in range(len(raw)):
        assert parse_startup_packet(raw[:cut]) is None
    # Fed in random pieces to a MessageBuffer, it comes out once, whole.
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(raw)), max_size=10))
    buf = MessageBuffer()
    got = []
    for chunk in chunks_at(raw, cuts):
        buf.feed(chunk)
        if (pkt := buf.next_startup()) is not None:
            got.append(pkt)
    assert got == [expected]
    assert len(buf) == 0


@given(params=startup_params, msgs=st.lists(any_message, max_size=5))
def test_startup_packet_then_tagged_messages(params, msgs):
    """SSLRequest, then StartupMessage, then the first tagged messages in one read."""
    buf = MessageBuffer()
    buf.feed(ssl_request() + m.startup_message(params) + b"".join(msgs))
    assert buf.next_startup() == SSLRequest()
    assert buf.next_startup() == StartupMessage(PROTOCOL_VERSION_3, params)
    assert drain(buf) == [split_message(raw) for raw in msgs]


def test_startup_with_empty_values_and_options():
    params = {"user": "alice", "database": "", "application_name": "",
              "options": "-c search_path=x", "client_encoding": "UTF8"}
    raw = m.startup_message(params)
    pkt, used = parse_startup_packet(raw)
    assert used == len(raw)
    assert pkt.params == params
    assert list(pkt.params) == list(params)  # order is kept
    assert pkt.protocol == PROTOCOL_VERSION_3


def test_startup_non_ascii_parameters():
    params = {"user": "jörg", "application_name": "пул 🐘"}
    assert parse_startup_packet(m.startup_message(params))[0].params == params


def test_startup_minor_version_of_protocol_3_is_accepted():
    pkt, _ = parse_startup_packet(raw_startup(b"user\x00u\x00\x00", code=(3 << 16) | 2))
    assert pkt == StartupMessage((3 << 16) | 2, {"user": "u"})


def test_startup_packet_only_consumes_its_own_length():
    raw = m.startup_message({"user": "u"})
    pkt, used = parse_startup_packet(bytearray(raw + b"Qtrailing"))
    assert used == len(raw)


# ------------------------------------------------------ malformed startup input

def _violation(raw: bytes) -> str:
    with pytest.raises(ProtocolViolation) as info:
        parse_startup_packet(raw)
    return str(info.value)


@pytest.mark.parametrize("length", [0, 1, 4, 7])
def test_startup_length_too_small(length):
    assert _violation(struct.pack("!I", length) + b"\x00" * 12) == f"invalid startup packet length {length}"


@pytest.mark.parametrize("length", [MAX_STARTUP_PACKET + 1, 2**31, 2**32 - 1])
def test_startup_length_too_large_is_refused_before_the_body(length):
    # Only the 4 length bytes are there: the pooler must not wait for 4 GB.
    assert _violation(struct.pack("!I", length)) == f"invalid startup packet length {length}"


def test_startup_largest_allowed_length_waits_for_the_body():
    assert parse_startup_packet(struct.pack("!II", MAX_STARTUP_PACKET, PROTOCOL_VERSION_3)) is None


@pytest.mark.parametrize("code,name", [(SSL_REQUEST_CODE, "SSLRequest"), (GSSENC_REQUEST_CODE, "GSSENCRequest")])
def test_encryption_requests_with_a_body(code, name):
    assert _violation(struct.pack("!III", 12, code, 0)) == f"invalid {name} length"


@pytest.mark.parametrize("length", [8, 12, 20])
def test_cancel_request_with_wrong_length(length):
    raw = struct.pack("!II", length, CANCEL_REQUEST_CODE) + b"\x01" * (length - 8)
    assert _violation(raw) == "invalid CancelRequest length"


def test_protocol_2_is_refused():
    msg = _violation(raw_startup(b"user\x00u\x00\x00", code=2 << 16))
    assert msg == "unsupported frontend protocol 2.0: server supports 3.0"


@pytest.mark.parametrize("code", [0, 1 << 16, 4 << 16, (1234 << 16) | 5677, (1234 << 16) | 9999])
def test_unknown_protocol_codes_are_refused(code):
    assert _violation(raw_startup(b"user\x00u\x00\x00", code=code)).startswith("unsupported frontend protocol")


@pytest.mark.parametrize("body", [
    b"",                        # no parameters and no terminator
    b"user\x00u\x00",           # list terminator missing
    b"user\x00u",               # value not terminated
    b"user",                    # name not terminated
    b"user\x00u\x00\x00x",      # bytes after the terminator
    b"user\x00u\x00\x00y\x00\x00",  # an empty name in the middle of the list
    b"user\x00u\x00\x00\x00",   # two terminators
])
def test_malformed_parameter_list(body):
    assert _violation(raw_startup(body)).startswith("invalid startup packet layout")


def test_missing_terminator_says_so():
    assert _violation(raw_startup(b"user\x00u\x00")) == \
        "invalid startup packet layout: expected terminator as last byte"


def test_unpaired_parameter_says_so():
    assert _violation(raw_startup(b"user\x00u\x00database\x00db")) == \
        "invalid startup packet layout: unpaired parameter"


@pytest.mark.parametrize("body", [b"user\x00\xff\xfe\x00\x00", b"\xc3\x28\x00u\x00user\x00u\x00\x00"])
def test_non_utf8_parameters(body):
    assert _violation(raw_startup(body)) == "invalid startup packet: parameters are not valid UTF-8"


@pytest.mark.parametrize("params", [{}, {"database": "db"}, {"user": ""}, {"user": "", "database": "db"}])
def test_no_user(params):
    assert _violation(m.startup_message(params)) == "no PostgreSQL user name specified in startup packet"


def test_message_buffer_next_startup_propagates_violations():
    buf = MessageBuffer()
    buf.feed(struct.pack("!I", 3))
    with pytest.raises(ProtocolViolation):
        buf.next_startup()


startup_codes = st.one_of(
    st.sampled_from([PROTOCOL_VERSION_3, 2 << 16, SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE]),
    uint32,
)

startup_fuzz = st.one_of(
    st.binary(max_size=64),
    # a plausible header with a random body, so the body parser is reached
    st.builds(lambda code, body: raw_startup(body, code), startup_codes, st.binary(max_size=64)),
    # a valid-looking parameter list with random bytes spliced in
    st.builds(lambda parts: raw_startup(b"\x00".join(parts)),
              st.lists(st.binary(max_size=8), max_size=8)),
    # a random length word in front of random bytes
    st.builds(lambda n, body: struct.pack("!I", n) + body,
              st.integers(min_value=0, max_value=MAX_STARTUP_PACKET + 10), st.binary(max_size=64)),
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(raw=startup_fuzz)
def test_startup_parser_on_random_bytes_raises_only_protocol_violation(raw):
    try:
        result = parse_startup_packet(raw)
    except ProtocolViolation as exc:
        assert str(exc)
        return
    if result is None:
        assert len(raw) < 4 or len(raw) < int.from_bytes(raw[:4], "big")
        return
    pkt, used = result
    assert 8 <= used <= min(len(raw), MAX_STARTUP_PACKET)
    assert used == int.from_bytes(raw[:4], "big")
    if isinstance(pkt, StartupMessage):
        assert pkt.protocol >> 16 == 3
        assert pkt.params["user"]
        assert all(name for name in pkt.params)
        # What parsed is exactly what a client would have sent for these parameters
        # (unless a name was repeated, where the last value wins as in PostgreSQL).
        rebuilt = m.startup_message(pkt.params)
        if len(rebuilt) == used:
            assert rebuilt[8:] == bytes(raw[8:used])
    else:
        assert isinstance(pkt, (SSLRequest, GSSEncRequest, CancelRequest))


def test_module_exports_match_frames_constants():
    # The builders in messages.py use the same codes as the parser here.
    assert m.cancel_request(1, 2)[4:8] == struct.pack("!I", f.CANCEL_REQUEST_CODE)
    assert m.startup_message({"user": "u"})[4:8] == struct.pack("!I", f.PROTOCOL_VERSION_3)
