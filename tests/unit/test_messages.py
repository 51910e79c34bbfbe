"""pypool.protocol.messages: what the builders write, the parsers read back.

Where messages.py has no parser (RowDescription, DataRow), the test decodes
the bytes itself, following the PostgreSQL protocol documentation, so the
builders are checked against the wire format rather than against themselves.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pypool.protocol import messages as m
from pypool.protocol.frames import (
    PROTOCOL_VERSION_3,
    CancelRequest,
    MessageBuffer,
    ProtocolViolation,
    StartupMessage,
    parse_startup_packet,
)

cstring_text = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=40,
)
nonempty_cstring_text = cstring_text.filter(bool)
sqlstates = st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)


def one(raw: bytes) -> tuple[int, bytes]:
    """The single (tag, payload) in ``raw``; fails if there is more or less."""
    buf = MessageBuffer()
    buf.feed(raw)
    msg = buf.next_message()
    assert msg is not None and len(buf) == 0
    return msg


def all_messages(raw: bytes) -> list[tuple[int, bytes]]:
    buf = MessageBuffer()
    buf.feed(raw)
    out = []
    while (msg := buf.next_message()) is not None:
        out.append(msg)
    assert len(buf) == 0
    return out


# --------------------------------------------------------------------- framing

@given(tag=st.integers(min_value=0, max_value=255), payload=st.binary(max_size=500))
def test_message_header(tag, payload):
    raw = m.message(tag, payload)
    assert raw[0] == tag
    assert struct.unpack("!I", raw[1:5])[0] == len(payload) + 4
    assert raw[5:] == payload


@given(text=cstring_text)
def test_cstr(text):
    raw = m.cstr(text)
    assert raw.endswith(b"\x00") and raw.count(b"\x00") == 1
    assert m.read_cstring(raw) == (text, len(raw))


def test_read_cstring_positions_and_errors():
    payload = b"ab\x00\x00cd\x00"
    assert m.read_cstring(payload) == ("ab", 3)
    assert m.read_cstring(payload, 3) == ("", 4)
    assert m.read_cstring(payload, 4) == ("cd", 7)
    with pytest.raises(ProtocolViolation, match="unterminated string"):
        m.read_cstring(payload, 7)
    with pytest.raises(ProtocolViolation, match="invalid UTF-8"):
        m.read_cstring(b"\xff\x00")


# ---------------------------------------------------------- errors and notices

@given(sqlstate=sqlstates, text=cstring_text, severity=st.sampled_from(["ERROR", "FATAL", "PANIC"]),
       detail=st.none() | cstring_text, hint=st.none() | cstring_text)
def test_error_response_fields_round_trip(sqlstate, text, severity, detail, hint):
    tag, payload = one(m.error_response(sqlstate, text, severity=severity, detail=detail, hint=hint))
    assert tag == m.ERROR_RESPONSE
    expected = {"S": severity, "V": severity, "C": sqlstate, "M": text}
    if detail:
        expected["D"] = detail
    if hint:
        expected["H"] = hint
    assert m.parse_error_fields(payload) == expected
    assert payload.endswith(b"\x00\x00")  # last field's terminator + the list terminator


def test_error_response_field_order_and_bytes():
    _, payload = one(m.error_response("53300", "too many clients", hint="later"))
    assert payload == b"SERROR\x00VERROR\x00C53300\x00Mtoo many clients\x00Hlater\x00\x00"


@given(text=cstring_text, sqlstate=sqlstates)
def test_notice_response_round_trip(text, sqlstate):
    tag, payload = one(m.notice_response(text, severity="WARNING", sqlstate=sqlstate))
    assert tag == m.NOTICE_RESPONSE
    assert m.parse_error_fields(payload) == {"S": "WARNING", "V": "WARNING", "C": sqlstate, "M": text}


def test_parse_error_fields_from_a_real_server_shape():
    payload = (b"SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed for user \"x\"\x00"
               b"Fauth.c\x00L335\x00Rauth_failed\x00\x00")
    fields = m.parse_error_fields(payload)
    assert fields["C"] == "28P01"
    assert fields["M"] == 'password authentication failed for user "x"'
    assert fields["R"] == "auth_failed"


@given(payload=st.binary(max_size=200))
def test_parse_error_fields_never_raises(payload):
    fields = m.parse_error_fields(payload)
    assert all(len(code) == 1 for code in fields)


# --------------------------------------------------------------- backend side

@given(name=nonempty_cstring_text, value=cstring_text)
def test_parameter_status_round_trip(name, value):
    tag, payload = one(m.parameter_status(name, value))
    assert tag == m.PARAMETER_STATUS
    assert m.parse_parameter_status(payload) == (name, value)


@given(pid=uint32, key=uint32)
def test_backend_key_data(pid, key):
    tag, payload = one(m.backend_key_data(pid, key))
    assert tag == m.BACKEND_KEY_DATA
    assert struct.unpack("!II", payload) == (pid, key)


@pytest.mark.parametrize("status", [b"I", b"T", b"E"])
def test_ready_for_query(status):
    assert one(m.ready_for_query(status)) == (m.READY_FOR_QUERY, status)


def test_small_fixed_messages():
    assert m.ready_for_query() == b"Z\x00\x00\x00\x05I"
    assert m.empty_query_response() == b"I\x00\x00\x00\x04"
    assert m.terminate() == b"X\x00\x00\x00\x04"
    assert one(m.command_complete("SET")) == (m.COMMAND_COMPLETE, b"SET\x00")


def test_authentication_requests():
    assert m.parse_auth_request(one(m.authentication_ok())[1]) == (m.AUTH_OK, b"")
    cleartext = m.message(m.AUTHENTICATION, struct.pack("!i", m.AUTH_CLEARTEXT))
    assert m.parse_auth_request(one(cleartext)[1]) == (m.AUTH_CLEARTEXT, b"")
    assert m.parse_auth_request(one(m.authentication_md5(b"salt"))[1]) == (m.AUTH_MD5, b"salt")
    assert m.parse_auth_request(one(m.authentication_sasl_continue(b"r=abc"))[1]) == (m.AUTH_SASL_CONTINUE, b"r=abc")
    assert m.parse_auth_request(one(m.authentication_sasl_final(b"v=xyz"))[1]) == (m.AUTH_SASL_FINAL, b"v=xyz")
    assert all(t == m.AUTHENTICATION for t, _ in all_messages(m.authentication_ok() + m.authentication_md5(b"abcd")))


@given(mechanisms=st.lists(nonempty_cstring_text, min_size=1, max_size=4))
def test_authentication_sasl_mechanisms_round_trip(mechanisms):
    code, data = m.parse_auth_request(one(m.authentication_sasl(mechanisms))[1])
    assert code == m.AUTH_SASL
    assert data.endswith(b"\x00\x00")
    assert m.parse_sasl_mechanisms(data) == mechanisms


def test_parse_sasl_mechanisms_rejects_non_utf8():
    with pytest.raises(ProtocolViolation, match="SASL mechanism"):
        m.parse_sasl_mechanisms(b"SCRAM-SHA-256\x00\xff\x00\x00")


def test_parse_auth_request_truncated():
    with pytest.raises(ProtocolViolation, match="truncated authentication request"):
        m.parse_auth_request(b"\x00\x00\x00")


# ----------------------------------------------------------------- result sets

def decode_row_description(payload: bytes) -> list[tuple[str, int, int, int]]:
    """[(name, type_oid, type_size, format)] per the RowDescription layout."""
    (count,) = struct.unpack_from("!H", payload, 0)
    pos = 2
    cols = []
    for _ in range(count):
        name, pos = m.read_cstring(payload, pos)
        _table, _attr, oid, size, _mod, fmt = struct.unpack_from("!IhIhih", payload, pos)
        pos += 18
        cols.append((name, oid, size, fmt))
    assert pos == len(payload)
    return cols


def decode_data_row(payload: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!H", payload, 0)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if length == -1:
            values.append(None)
        else:
            values.append(payload[pos:pos + length].decode("utf-8"))
            pos += length
    assert pos == len(payload)
    return values


def as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


cell = st.one_of(st.none(), st.booleans(), st.integers(), cstring_text)


@given(names=st.lists(nonempty_cstring_text, min_size=1, max_size=5), data=st.data())
def test_result_set_round_trip(names, data):
    rows = data.draw(st.lists(st.lists(cell, min_size=len(names), max_size=len(names)), max_size=6))
    msgs = all_messages(m.result_set(names, rows))
    assert [t for t, _ in msgs] == [m.ROW_DESCRIPTION] + [m.DATA_ROW] * len(rows) + [m.COMMAND_COMPLETE]
    assert decode_row_description(msgs[0][1]) == [(n, 25, -1, 0) for n in names]
    for (_, payload), row in zip(msgs[1:-1], rows):
        assert decode_data_row(payload) == [as_text(v) for v in row]
    assert msgs[-1][1] == m.cstr(f"SELECT {len(rows)}")


def test_result_set_nulls_and_custom_tag():
    msgs = all_messages(m.result_set(["a", "b"], [[None, "x"], ["", None], [None, None]], tag="SHOW"))
    rows = [decode_data_row(p) for t, p in msgs if t == m.DATA_ROW]
    assert rows == [[None, "x"], ["", None], [None, None]]  # NULL and '' stay distinct
    assert msgs[-1] == (m.COMMAND_COMPLETE, b"SHOW\x00")
    # NULL is length -1 with no bytes after it
    assert msgs[1][1] == struct.pack("!H", 2) + struct.pack("!i", -1) + struct.pack("!i", 1) + b"x"


def test_result_set_accepts_an_iterator_of_rows():
    msgs = all_messages(m.result_set(["n"], ([i] for i in range(3))))
    assert [decode_data_row(p) for t, p in msgs if t == m.DATA_ROW] == [["0"], ["1"], ["2"]]
    assert msgs[-1][1] == b"SELECT 3\x00"


def test_row_description_typed_columns():
    _, payload = one(m.row_description([("id", 20), ("n", 23), ("ok", 16), "name", ("ts", 1184)]))
    assert decode_row_description(payload) == [
        ("id", 20, 8, 0), ("n", 23, 4, 0), ("ok", 16, 1, 0), ("name", 25, -1, 0), ("ts", 1184, -1, 0),
    ]


def test_empty_result_set():
    msgs = all_messages(m.result_set(["a"], []))
    assert [t for t, _ in msgs] == [m.ROW_DESCRIPTION, m.COMMAND_COMPLETE]
    assert msgs[-1][1] == b"SELECT 0\x00"


# --------------------------------------------------------------- frontend side

@given(sql=cstring_text)
def test_query_round_trip(sql):
    tag, payload = one(m.query(sql))
    assert tag == m.QUERY
    assert m.parse_query(payload) == sql


@given(name=cstring_text, sql=cstring_text, oids=st.lists(uint32, max_size=4))
def test_parse_message_round_trip(name, sql, oids):
    payload = m.cstr(name) + m.cstr(sql) + struct.pack(f"!H{len(oids)}I", len(oids), *oids)
    tag, got = one(m.message(m.PARSE, payload))
    assert tag == m.PARSE
    assert m.parse_parse(got) == (name, sql)


@given(params=st.dictionaries(nonempty_cstring_text, cstring_text, max_size=5), user=nonempty_cstring_text)
def test_startup_message_round_trip(params, user):
    params = {**params, "user": user}
    raw = m.startup_message(params)
    assert struct.unpack("!I", raw[:4])[0] == len(raw)
    assert parse_startup_packet(raw) == (StartupMessage(PROTOCOL_VERSION_3, params), len(raw))


@given(pid=uint32, key=uint32)
def test_cancel_request_round_trip(pid, key):
    raw = m.cancel_request(pid, key)
    assert parse_startup_packet(raw) == (CancelRequest(pid, key), 16)


@given(password=st.binary(max_size=100).filter(lambda b: b"\x00" not in b))
def test_password_message_round_trip(password):
    tag, payload = one(m.password_message(password))
    assert tag == m.PASSWORD
    assert m.parse_password(payload) == password


def test_parse_password_unterminated():
    with pytest.raises(ProtocolViolation, match="not terminated"):
        m.parse_password(b"secret")


@given(mechanism=nonempty_cstring_text, data=st.binary(max_size=200))
def test_sasl_initial_response_round_trip(mechanism, data):
    tag, payload = one(m.sasl_initial_response(mechanism, data))
    assert tag == m.PASSWORD
    assert m.parse_sasl_initial_response(payload) == (mechanism, data)


def test_sasl_initial_response_layout():
    raw = m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert raw[5:] == b"SCRAM-SHA-256\x00" + struct.pack("!i", 11) + b"n,,n=,r=abc"


def test_sasl_initial_response_without_data():
    # Length -1 means "no initial response".
    assert m.parse_sasl_initial_response(b"SCRAM-SHA-256\x00" + struct.pack("!i", -1)) == ("SCRAM-SHA-256", b"")
    with pytest.raises(ProtocolViolation, match="does not match"):
        m.parse_sasl_initial_response(b"SCRAM-SHA-256\x00" + struct.pack("!i", -1) + b"extra")


@pytest.mark.parametrize("payload,match", [
    (b"SCRAM-SHA-256", "unterminated string"),
    (b"SCRAM-SHA-256\x00\x00\x00", "truncated SASLInitialResponse"),
    (b"SCRAM-SHA-256\x00" + struct.pack("!i", 5) + b"abc", "does not match"),
    (b"SCRAM-SHA-256\x00" + struct.pack("!i", 2) + b"abc", "does not match"),
    (b"SCRAM-SHA-256\x00" + struct.pack("!i", -2), "does not match"),
    (b"\xff\x00" + struct.pack("!i", 0), "invalid UTF-8"),
])
def test_sasl_initial_response_malformed(payload, match):
    with pytest.raises(ProtocolViolation, match=match):
        m.parse_sasl_initial_response(payload)


def test_sasl_response_is_raw():
    assert one(m.sasl_response(b"c=biws,r=x,p=y")) == (m.PASSWORD, b"c=biws,r=x,p=y")


# ------------------------------------------------------ parsers on random bytes

PARSERS = [
    m.parse_query,
    m.parse_parse,
    m.parse_sasl_initial_response,
    m.parse_password,
    m.parse_parameter_status,
    m.parse_auth_request,
    m.parse_sasl_mechanisms,
    m.read_cstring,
]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@given(payload=st.one_of(
    st.binary(max_size=100),
    st.lists(st.binary(max_size=10), max_size=5).map(b"\x00".join),
))
def test_parsers_raise_only_protocol_violation(parser, payload):
    try:
        parser(payload)
    except ProtocolViolation as exc:
        assert str(exc)
