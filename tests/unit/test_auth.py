"""Unit tests for pypool.protocol.auth (sans-IO md5 and SCRAM-SHA-256)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypool.protocol import auth
from pypool.protocol.auth import (
    AuthError,
    ScramClientSession,
    ScramServerSession,
    ScramVerifier,
    VerifierFormatError,
    md5_hash,
    md5_stored,
    md5_verify,
    random_salt,
    saslprep,
)

# --- RFC 7677 section 3 test vector ------------------------------------------

RFC_USER = "user"
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_SUFFIX = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT_B64 = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_rfc7677_vector_client_side():
    client = ScramClientSession(RFC_USER, RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, send_username=True)
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)  # does not raise


def test_rfc7677_vector_server_side():
    verifier = ScramVerifier.from_password(RFC_PASSWORD, salt=base64.b64decode(RFC_SALT_B64), iterations=4096)
    server = ScramServerSession(verifier, nonce_suffix=RFC_SERVER_SUFFIX)
    assert server.handle_client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.done


def test_rfc7677_vector_wrong_server_signature_rejected():
    client = ScramClientSession(RFC_USER, RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, send_username=True)
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    bad = base64.b64encode(bytes(32)).decode()
    with pytest.raises(AuthError, match="server signature is invalid"):
        client.verify_server_final(f"v={bad}".encode())


def test_client_first_default_shape():
    client = ScramClientSession("alice", "secret")
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")
    nonce = first[len(b"n,,n=,r="):]
    assert len(nonce) >= 24 and b"," not in nonce


# --- round trips ---------------------------------------------------------------


def _exchange(verifier, password, *, username="alice", server_username="alice"):
    client = ScramClientSession(username, password)
    server = ScramServerSession(verifier, username=server_username)
    server_first = server.handle_client_first("SCRAM-SHA-256", client.client_first())
    client_final = client.handle_server_first(server_first)
    server_final = server.handle_client_final(client_final)
    client.verify_server_final(server_final)
    return server_first


def test_round_trip_right_password():
    verifier = ScramVerifier.from_password("correct horse")
    _exchange(verifier, "correct horse")


def test_round_trip_wrong_password():
    verifier = ScramVerifier.from_password("correct horse")
    with pytest.raises(AuthError) as exc:
        _exchange(verifier, "battery staple")
    assert str(exc.value) == "password authentication failed"


def test_round_trip_y_flag():
    verifier = ScramVerifier.from_password("pw")
    client = ScramClientSession("u", "pw", gs2_flag="y")
    server = ScramServerSession(verifier)
    first = client.client_first()
    assert first.startswith(b"y,,")
    final = client.handle_server_first(server.handle_client_first("SCRAM-SHA-256", first))
    assert final.startswith(b"c=eSws,")  # base64("y,,")
    client.verify_server_final(server.handle_client_final(final))


def test_round_trip_non_ascii_password_uses_saslprep():
    # U+00AA (feminine ordinal) NFKC-normalises to "a"; the same password
    # typed either way must authenticate.
    verifier = ScramVerifier.from_password("p\u00aass")
    _exchange(verifier, "pass")


def test_unknown_user_fails_identically():
    verifier = ScramVerifier.from_password("right")
    with pytest.raises(AuthError) as wrong_password:
        _exchange(verifier, "wrong")
    with pytest.raises(AuthError) as unknown_user:
        _exchange(None, "whatever", server_username="nobody")
    assert type(unknown_user.value) is type(wrong_password.value)
    assert str(unknown_user.value) == str(wrong_password.value)


def _parse_server_first(data: bytes) -> dict[str, str]:
    return dict(part.split("=", 1) for part in data.decode().split(","))


def test_unknown_user_server_first_looks_normal():
    real = ScramServerSession(ScramVerifier.from_password("x"), username="alice")
    fake = ScramServerSession(None, username="mallory")
    first = b"n,,n=,r=clientnonce123"
    real_msg = _parse_server_first(real.handle_client_first("SCRAM-SHA-256", first))
    fake_msg = _parse_server_first(fake.handle_client_first("SCRAM-SHA-256", first))
    assert real_msg.keys() == fake_msg.keys() == {"r", "s", "i"}
    assert len(real_msg["r"]) == len(fake_msg["r"])
    assert fake_msg["r"].startswith("clientnonce123")
    assert len(base64.b64decode(real_msg["s"])) == len(base64.b64decode(fake_msg["s"])) == 16
    assert real_msg["i"] == fake_msg["i"] == "4096"


def test_unknown_user_salt_is_stable_per_username():
    def salt_for(name: str) -> str:
        s = ScramServerSession(None, username=name)
        return _parse_server_first(s.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=abc"))["s"]

    assert salt_for("mallory") == salt_for("mallory")
    assert salt_for("mallory") != salt_for("eve")


# --- verifier ------------------------------------------------------------------


def test_verifier_str_parse_round_trip():
    v = ScramVerifier.from_password("hunter2", salt=b"0123456789abcdef", iterations=4096)
    text = str(v)
    assert text.startswith("SCRAM-SHA-256$4096:")
    assert ScramVerifier.parse(text) == v
    assert str(ScramVerifier.parse(text)) == text


def test_verifier_matches_rfc_keys():
    # StoredKey/ServerKey for the RFC 7677 password and salt, checked against
    # a from-scratch computation with hashlib/hmac.
    import hmac

    salt = base64.b64decode(RFC_SALT_B64)
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    v = ScramVerifier.from_password("pencil", salt=salt)
    assert v.stored_key == hashlib.sha256(client_key).digest()
    assert v.server_key == server_key


def test_verifier_repr_hides_keys():
    v = ScramVerifier.from_password("hunter2")
    r = repr(v)
    for secret in (v.stored_key, v.server_key):
        assert base64.b64encode(secret).decode() not in r
        assert secret.hex() not in r
        assert repr(secret) not in r
    assert "4096" in r


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abcdef",
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
        "SCRAM-SHA-256$abc:c2FsdA==$AAAA:AAAA",
        "SCRAM-SHA-256$4096:!!!$AAAA:AAAA",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",  # keys too short
    ],
)
def test_verifier_parse_rejects(text):
    with pytest.raises(VerifierFormatError) as exc:
        ScramVerifier.parse(text)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, AuthError)
    assert str(exc.value).startswith("invalid SCRAM verifier")


def test_verifier_parse_error_does_not_echo_secret():
    good = str(ScramVerifier.from_password("pw"))
    broken = good[:-3] + "!!!"
    with pytest.raises(VerifierFormatError) as exc:
        ScramVerifier.parse(broken)
    stored_b64 = good.split("$")[2].split(":")[0]
    assert stored_b64 not in str(exc.value)


# --- malformed messages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed SCRAM client-first-message: empty message"),
        (b"\xff\xfe", "malformed SCRAM client-first-message: not valid UTF-8"),
        (b"n,,n=", "malformed SCRAM client-first-message: expected"),
        (b"x,,n=,r=abc", "malformed SCRAM client-first-message: expected channel-binding flag"),
        (b"n,,r=abc,n=", "malformed SCRAM client-first-message: expected attribute 'n='"),
        (b"n,,n=,r=", "malformed SCRAM client-first-message: nonce is empty"),
        (b"n,,n=,r=ab cd", "malformed SCRAM client-first-message: nonce is empty or not printable"),
        ("n,,n=,r=abcé".encode(), "malformed SCRAM client-first-message: nonce is empty or not printable"),
        (b"n,,n=,r=ab\x7f", "malformed SCRAM client-first-message: nonce is empty or not printable"),
        (b"n,,n=,r=a\x00b", "malformed SCRAM client-first-message: contains a NUL byte"),
        (b"n,,n=bad=user,r=abc", "malformed SCRAM client-first-message: invalid '=' escape"),
        (b"n,,n=,r=abc,123", "malformed SCRAM client-first-message: unexpected data"),
        (b"n,a=admin,n=,r=abc", "authorization identity (a=) is not supported"),
        (b"n,,m=ext,n=,r=abc", "mandatory extensions (m=) are not supported"),
        (b"p=tls-server-end-point,,n=,r=abc", "channel binding was requested but is not supported"),
    ],
)
def test_malformed_client_first(data, reason):
    server = ScramServerSession(ScramVerifier.from_password("pw"))
    with pytest.raises(AuthError) as exc:
        server.handle_client_first("SCRAM-SHA-256", data)
    assert reason in str(exc.value)


def test_unsupported_mechanisms():
    with pytest.raises(AuthError, match="unsupported SASL mechanism"):
        ScramServerSession(None).handle_client_first("SCRAM-SHA-1", b"n,,n=,r=abc")
    with pytest.raises(AuthError, match="SCRAM-SHA-256-PLUS is not supported"):
        ScramServerSession(None).handle_client_first("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc")


_PW_VERIFIER = ScramVerifier.from_password("pw")


def _server_after_first(nonce="abc"):
    server = ScramServerSession(_PW_VERIFIER, nonce_suffix="XYZ")
    server.handle_client_first("SCRAM-SHA-256", f"n,,n=,r={nonce}".encode())
    return server


_PROOF = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed SCRAM client-final-message: empty message"),
        (b"c=biws,r=abcXYZ", "malformed SCRAM client-final-message: expected"),
        (f"r=abcXYZ,c=biws,p={_PROOF}".encode(), "expected attribute 'c='"),
        (f"c=%%%,r=abcXYZ,p={_PROOF}".encode(), "channel-binding data is not valid base64"),
        (f"c=eSws,r=abcXYZ,p={_PROOF}".encode(), "channel-binding data does not match"),
        (f"c=biws,r=abcXYW,p={_PROOF}".encode(), "nonce does not match"),
        (f"c=biws,r=abcXYZ,p={_PROOF},x=1".encode(), "the proof (p=) must be the last attribute"),
        (b"c=biws,r=abcXYZ,p=not*base64", "proof is not valid base64"),
        (b"c=biws,r=abcXYZ,p=AAAA", "proof has the wrong length"),
        (f"c=biws,r=abcXYZ,9,p={_PROOF}".encode(), "unexpected data"),
    ],
)
def test_malformed_client_final(data, reason):
    server = _server_after_first()
    with pytest.raises(AuthError) as exc:
        server.handle_client_final(data)
    assert str(exc.value).startswith("malformed SCRAM client-final-message: ")
    assert reason in str(exc.value)


def test_client_final_with_zero_proof_is_wrong_password():
    server = _server_after_first()
    with pytest.raises(AuthError, match="^password authentication failed$"):
        server.handle_client_final(f"c=biws,r=abcXYZ,p={_PROOF}".encode())


def test_out_of_order_calls():
    server = ScramServerSession(ScramVerifier.from_password("pw"))
    with pytest.raises(AuthError, match="out of order"):
        server.handle_client_final(b"c=biws,r=x,p=" + _PROOF.encode())
    client = ScramClientSession("u", "pw")
    with pytest.raises(AuthError, match="out of order"):
        client.handle_server_first(b"r=x,s=c2FsdA==,i=1")


def test_session_is_single_use():
    server = _server_after_first()
    with pytest.raises(AuthError):
        server.handle_client_first("SCRAM-SHA-256", b"n,,n=,r=abc")


# --- client side validation ------------------------------------------------------


@pytest.mark.parametrize(
    ("server_first", "reason"),
    [
        (b"r=someoneelse123,s=c2FsdA==,i=4096", "server nonce does not extend the client nonce"),
        (b"r=CLIENTNONCE,s=c2FsdA==,i=4096", "server nonce does not extend the client nonce"),
        (b"r=CLIENTNONCEsrv,s=c2FsdA==,i=0", "iteration count must be at least 1"),
        (b"r=CLIENTNONCEsrv,s=c2FsdA==,i=-5", "iteration count is not a number"),
        (b"r=CLIENTNONCEsrv,s=c2FsdA==,i=lots", "iteration count is not a number"),
        (b"r=CLIENTNONCEsrv,s=***,i=4096", "salt is not valid base64"),
        (b"r=CLIENTNONCEsrv,s=,i=4096", "empty salt"),
        (b"r=CLIENTNONCEsrv,s=c2FsdA==", "malformed SCRAM server-first-message"),
        (b"m=x,r=CLIENTNONCEsrv,s=c2FsdA==,i=4096", "mandatory extensions"),
        (b"r=CLIENTNONCEsrv,s=c2FsdA==,i=1000001", "exceeds the limit of 1000000"),
    ],
)
def test_client_rejects_bad_server_first(server_first, reason):
    client = ScramClientSession("u", "pw", nonce="CLIENTNONCE")
    client.client_first()
    with pytest.raises(AuthError) as exc:
        client.handle_server_first(server_first)
    assert reason in str(exc.value)


def test_client_server_error_final():
    client = ScramClientSession("u", "pw", nonce="CLIENTNONCE")
    client.client_first()
    client.handle_server_first(b"r=CLIENTNONCEsrv,s=c2FsdA==,i=1")
    with pytest.raises(AuthError, match="rejected by the server: invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_salted_password_is_cached():
    auth._salted_password.cache_clear()
    for _ in range(3):
        client = ScramClientSession("u", "cached-pw", nonce="N")
        client.client_first()
        client.handle_server_first(b"r=Nsrv,s=c2FsdA==,i=4096")
    info = auth._salted_password.cache_info()
    assert info.misses == 1 and info.hits == 2


# --- SASLprep --------------------------------------------------------------------


def test_saslprep():
    assert saslprep("pencil") == b"pencil"
    assert saslprep("\x07ascii-control") == b"\x07ascii-control"  # ASCII passes through, as in PostgreSQL
    assert saslprep("I\u00adX") == b"IX"  # soft hyphen: mapped to nothing
    assert saslprep("a\u00a0b") == b"a b"  # non-ASCII space -> space
    assert saslprep("\u2168") == b"IX"  # NFKC
    # Prohibited after preparation (a non-ASCII control char): raw bytes are used.
    assert saslprep("x\u0080y") == "x\u0080y".encode()
    # Bidi violation (RandALCat mixed with LCat): raw bytes.
    assert saslprep("\u0627a") == "\u0627a".encode()
    # Lone surrogate: cannot be SASLprep'd; still yields deterministic bytes.
    assert saslprep("\udc80x") == "\udc80x".encode("utf-8", "surrogatepass")


# --- md5 ---------------------------------------------------------------------------


def test_md5_formula_from_hashlib():
    user, password, salt = "alice", "s3cret", b"\xde\xad\xbe\xef"
    inner = hashlib.md5((password + user).encode()).hexdigest()
    outer = hashlib.md5(inner.encode() + salt).hexdigest()
    assert md5_stored(user, password) == "md5" + inner
    assert md5_hash(user, password, salt) == b"md5" + outer.encode()


def test_md5_known_value():
    # Computed independently (coreutils md5sum) for user "postgres",
    # password "mysecretpassword", salt 01 02 03 04.
    assert md5_stored("postgres", "mysecretpassword") == "md5f669773c3bc40401c00685cf2f9c4ca2"
    assert md5_hash("postgres", "mysecretpassword", b"\x01\x02\x03\x04") == b"md5fcaca560c5033473d7fa8b692f010941"


def test_md5_verify():
    salt = random_salt()
    assert len(salt) == 4
    response = md5_hash("bob", "pw", salt)
    assert md5_verify("bob", "pw", salt, response)  # plaintext password configured
    assert md5_verify("bob", md5_stored("bob", "pw"), salt, response)  # md5 hash configured
    assert md5_verify("bob", "pw", salt, response + b"\x00")  # PasswordMessage NUL tolerated
    assert not md5_verify("bob", "wrong", salt, response)
    assert not md5_verify("bob", "pw", b"\x00\x00\x00\x00", response)
    assert not md5_verify("carol", "pw", salt, response)  # the user name is part of the hash
    assert not md5_verify("bob", str(ScramVerifier.from_password("pw")), salt, response)


# --- fuzzing: only AuthError ever escapes -------------------------------------------


_FRAGMENTS = st.sampled_from(
    ["n", "y", "p=x", "", "n=", "r=", "c=", "p=", "s=", "i=", "m=", "a=", "biws", "abc", "=2C", "=", ",",
     "XYZ", _PROOF, "\x00", "é", "4096"]
)
_STRUCTURED = st.lists(_FRAGMENTS, max_size=12).map(lambda xs: "".join(xs).encode("utf-8", "surrogatepass"))
_INPUTS = st.one_of(st.binary(max_size=300), _STRUCTURED)


@settings(max_examples=300, deadline=None)
@given(mechanism=st.one_of(st.just("SCRAM-SHA-256"), st.text(max_size=20)), data=_INPUTS)
def test_fuzz_client_first_only_auth_error(mechanism, data):
    server = ScramServerSession(_PW_VERIFIER)
    try:
        server.handle_client_first(mechanism, data)
    except AuthError:
        pass


@settings(max_examples=300, deadline=None)
@given(data=_INPUTS)
def test_fuzz_client_final_only_auth_error(data):
    server = _server_after_first()
    try:
        server.handle_client_final(data)
    except AuthError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=_INPUTS)
def test_fuzz_server_messages_to_client_only_auth_error(data):
    client = ScramClientSession("u", "pw", nonce="abc", max_iterations=10_000)
    client.client_first()
    try:
        client.handle_server_first(data)
    except AuthError:
        return
    try:
        client.verify_server_final(data)
    except AuthError:
        pass


@pytest.mark.parametrize("key_len", [0, 1, 32, 64, 65, 200])
def test_fixed_key_mac_is_hmac_sha256(key_len):
    key = bytes(i % 251 for i in range(key_len))
    mac = auth.FixedKeyMac(key)
    for message in (b"", b"n=,r=abc", bytes(range(256)) * 3):
        assert mac.digest(message) == hmac.digest(key, message, "sha256")
