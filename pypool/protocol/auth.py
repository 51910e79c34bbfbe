"""Password authentication, sans-IO: md5 and SCRAM-SHA-256, server and client side.

Nothing here touches a socket or an event loop. Every function and method takes
bytes (message payloads, without the PostgreSQL frame header) and returns
bytes; framing them into AuthenticationSASL / SASLResponse / PasswordMessage
messages is the job of ``messages.py``.

pypool uses this module in two directions:

* as a **server**, authenticating its own clients: :class:`ScramServerSession`
  (one per login attempt) against a :class:`ScramVerifier`, or
  :func:`md5_verify` against an md5 hash or plaintext password;
* as a **client**, authenticating to PostgreSQL: :class:`ScramClientSession`,
  :func:`md5_hash`, :func:`cleartext_response`; "trust" needs nothing at all.

SCRAM follows RFC 5802 with SHA-256 (RFC 7677) the way PostgreSQL uses it: the
user name inside the SCRAM messages is ignored (the startup packet already
named the user), no authorization identity, and no channel binding yet
(``SCRAM-SHA-256-PLUS`` is not offered; a client asking for ``p=...`` is
refused).

Every :class:`AuthError` message is safe to send to a client: it never contains
a password, a verifier, a key or a proof.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import os
import re
import secrets
import string
import stringprep
import unicodedata
from dataclasses import dataclass

from pypool import sqlstates
from pypool.errors import FATAL, FixedCodeError

__all__ = [
    "AuthError",
    "VerifierFormatError",
    "ScramVerifier",
    "ScramServerSession",
    "ScramClientSession",
    "SCRAM_SHA_256",
    "DEFAULT_ITERATIONS",
    "DEFAULT_MAX_ITERATIONS",
    "md5_hash",
    "md5_stored",
    "md5_verify",
    "cleartext_response",
    "random_salt",
    "saslprep",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
DEFAULT_SALT_LEN = 16  # bytes; what PostgreSQL generates for new verifiers
_KEY_LEN = 32  # SHA-256 digest size
_MAX_MESSAGE = 4096  # no legitimate SCRAM message comes anywhere near this
# The iteration count comes from the server we log in to and sets how much
# CPU one PBKDF2 call burns (on the event loop). PostgreSQL defaults to 4096;
# refuse absurd values rather than stall the pooler for minutes.
DEFAULT_MAX_ITERATIONS = 1_000_000


class AuthError(FixedCodeError):
    """Authentication failed or a message was malformed.

    The message is safe to show a client: it never contains a password, a
    SCRAM secret or a proof.
    """

    sqlstate = sqlstates.INVALID_PASSWORD
    severity = FATAL


class VerifierFormatError(AuthError, ValueError):
    """A stored SCRAM verifier string (or its fields) is not well formed.

    Also a ``ValueError`` so that config loading can treat it like any other
    bad value. The message never quotes the verifier itself.
    """


# --------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")  # one C call (hmac.new builds a Python object per call)


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")  # base64.b64encode, one call less


def _b64decode(text: str) -> bytes:
    """Strict base64 decode; raises ValueError (binascii.Error) on bad input."""
    if not text.isascii():
        raise binascii.Error("non-ASCII base64")
    return binascii.a2b_base64(text, strict_mode=True)  # what base64.b64decode(validate=True) runs


def random_salt(n: int = 4) -> bytes:
    """``n`` cryptographically random bytes (4 is the md5 salt size)."""
    return secrets.token_bytes(n)


def _random_nonce(nbytes: int) -> str:
    # Base64 of random bytes: printable, never contains ',' -- a valid SCRAM nonce.
    return _b64(os.urandom(nbytes))


# RFC 5802: printable = %x21-2B / %x2D-7E  (visible ASCII except ',')
_PRINTABLE_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


def _is_printable_nonce(text: str) -> bool:
    return _PRINTABLE_NONCE.fullmatch(text) is not None


# --------------------------------------------------------------------------
# SASLprep
# --------------------------------------------------------------------------


def _prohibited(ch: str) -> bool:
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)  # unassigned code points
    )


def _raw(password: str) -> bytes:
    # 'surrogatepass' so that even a str holding lone surrogates has *some*
    # deterministic byte form instead of raising in the middle of a login.
    return password.encode("utf-8", "surrogatepass")


def saslprep(password: str) -> bytes:
    """Prepare a password for SCRAM the way PostgreSQL does, returning bytes.

    PostgreSQL applies SASLprep (RFC 4013) when the password is valid for it,
    and otherwise silently uses the password's raw bytes rather than failing,
    so that passwords in any encoding keep working. We mirror that:

    * pure ASCII is used unchanged (PostgreSQL's fast path -- it does not
      even reject ASCII control characters);
    * otherwise: non-ASCII spaces -> ' ', "mapped to nothing" characters are
      dropped, the result is NFKC-normalised, and if it then contains a
      prohibited or unassigned character, breaks the bidi rules, or is empty,
      we fall back to the raw UTF-8 bytes of the original.

    The mapping/prohibition tables come from the stdlib ``stringprep`` module
    (Unicode 3.2, as RFC 3454 specifies); normalisation uses the current
    ``unicodedata``, as PostgreSQL uses its own current tables.
    """
    if password.isascii():
        return password.encode("ascii")
    try:
        mapped = "".join(
            " " if stringprep.in_table_c12(ch) else ch
            for ch in password
            if not stringprep.in_table_b1(ch)
        )
        normalized = unicodedata.normalize("NFKC", mapped)
        if not normalized or any(_prohibited(ch) for ch in normalized):
            return _raw(password)
        if any(stringprep.in_table_d1(ch) for ch in normalized):
            if any(stringprep.in_table_d2(ch) for ch in normalized):
                return _raw(password)
            if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
                return _raw(password)
        return normalized.encode("utf-8")
    except (UnicodeError, ValueError):
        # e.g. lone surrogates: not valid for SASLprep -> raw bytes, like PostgreSQL.
        return _raw(password)


# --------------------------------------------------------------------------
# Salted password (PBKDF2), with and without cache
# --------------------------------------------------------------------------


def _salted_password_uncached(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations, _KEY_LEN)


# Why a cache: as a client, pypool logs in to the same PostgreSQL servers over
# and over with the same configured credentials, and the server answers with
# the same salt and iteration count every time (they live in pg_authid). The
# PBKDF2 step is deliberately expensive -- 4096 HMAC-SHA-256 rounds, a few
# milliseconds of CPU -- and would dominate connection setup when pools churn,
# blocking the event loop while it runs. The result is a pure function of
# (password, salt, iterations), so caching it makes repeat logins cost
# microseconds. The cache only holds derived keys for passwords the process
# already has in its configuration, and is bounded. It is used only on the
# client side, where those inputs repeat; the server side never runs PBKDF2 per
# login (it works from stored keys), and building verifiers with fresh random
# salts would only pollute it.
@functools.lru_cache(maxsize=256)
def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return _salted_password_uncached(password, salt, iterations)


# Each byte XOR RFC 2104's ipad / opad, as translation tables: cheap enough for the fake
# verifier of an unknown user, built per attempt, to cost what a known user's costs.
_XOR_IPAD = bytes(b ^ 0x36 for b in range(256))
_XOR_OPAD = bytes(b ^ 0x5C for b in range(256))


class FixedKeyMac:
    """HMAC-SHA-256 under one key that serves many messages: the padded key's two blocks are hashed once.

    The HMAC construction of RFC 2104 on copies of the two prepared SHA-256
    states; the same bytes as ``hmac.digest(key, message, "sha256")`` at about
    half its cost (OpenSSL's one-shot HMAC looks the digest up on every call).
    A server verifier's StoredKey and ServerKey sign every login's messages.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # SHA-256's block size
            key = _h(key)
        key = key.ljust(64, b"\x00")
        self._inner = hashlib.sha256(key.translate(_XOR_IPAD))
        self._outer = hashlib.sha256(key.translate(_XOR_OPAD))

    def __repr__(self) -> str:
        return "FixedKeyMac(<key hidden>)"

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def _keys_from_salted(salted: bytes) -> tuple[bytes, bytes, bytes]:
    """SaltedPassword -> (ClientKey, StoredKey, ServerKey)."""
    client_key = _hmac(salted, b"Client Key")
    return client_key, _h(client_key), _hmac(salted, b"Server Key")


# --------------------------------------------------------------------------
# Verifier
# --------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ScramVerifier:
    """What PostgreSQL stores in ``pg_authid.rolpassword`` for a SCRAM user.

    ``str(v)`` gives ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``
    (a secret: anyone holding it can impersonate the *server*, and together
    with a sniffed exchange, the client); ``repr(v)`` never shows the keys.
    """

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            raise VerifierFormatError("invalid SCRAM verifier: iteration count must be a positive integer")
        if not isinstance(self.salt, bytes) or not self.salt:
            raise VerifierFormatError("invalid SCRAM verifier: salt must be non-empty bytes")
        for name in ("stored_key", "server_key"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != _KEY_LEN:
                raise VerifierFormatError(f"invalid SCRAM verifier: {name} must be {_KEY_LEN} bytes")

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> "ScramVerifier":
        """Derive a verifier as ``CREATE ROLE ... PASSWORD`` would (random 16-byte salt)."""
        if salt is None:
            salt = random_salt(DEFAULT_SALT_LEN)
        if not isinstance(iterations, int) or iterations < 1:
            raise VerifierFormatError("invalid SCRAM verifier: iteration count must be a positive integer")
        _, stored_key, server_key = _keys_from_salted(_salted_password_uncached(password, salt, iterations))
        return cls(iterations, salt, stored_key, server_key)

    @classmethod
    def parse(cls, text: str) -> "ScramVerifier":
        """Parse ``SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>``.

        Raises :class:`VerifierFormatError` (an ``AuthError`` and a
        ``ValueError``) naming what is wrong, never quoting the text.
        """
        if not isinstance(text, str):
            raise VerifierFormatError("invalid SCRAM verifier: expected a string")
        parts = text.strip().split("$")
        if len(parts) != 3 or parts[0] != SCRAM_SHA_256:
            raise VerifierFormatError(
                "invalid SCRAM verifier: expected 'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>'"
            )
        iter_salt = parts[1].split(":")
        keys = parts[2].split(":")
        if len(iter_salt) != 2 or len(keys) != 2:
            raise VerifierFormatError(
                "invalid SCRAM verifier: expected 'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>'"
            )
        iter_text, salt_text = iter_salt
        if not (iter_text.isascii() and iter_text.isdigit()) or len(iter_text) > 10 or int(iter_text) < 1:
            raise VerifierFormatError("invalid SCRAM verifier: iteration count must be a positive integer")
        try:
            salt = _b64decode(salt_text)
        except ValueError:
            raise VerifierFormatError("invalid SCRAM verifier: salt is not valid base64") from None
        try:
            stored_key = _b64decode(keys[0])
            server_key = _b64decode(keys[1])
        except ValueError:
            raise VerifierFormatError("invalid SCRAM verifier: keys are not valid base64") from None
        return cls(int(iter_text), salt, stored_key, server_key)

    # Worked out once per verifier (pypool keeps one per user), not once per login.
    @functools.cached_property
    def first_message_tail(self) -> str:
        """The server-first-message after the nonce: ``,s=<salt>,i=<iterations>``."""
        return f",s={_b64(self.salt)},i={self.iterations}"

    @functools.cached_property
    def stored_mac(self) -> FixedKeyMac:
        return FixedKeyMac(self.stored_key)

    @functools.cached_property
    def server_mac(self) -> FixedKeyMac:
        return FixedKeyMac(self.server_key)

    def __str__(self) -> str:
        return (
            f"{SCRAM_SHA_256}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    def __repr__(self) -> str:
        return f"ScramVerifier(iterations={self.iterations}, salt=<{len(self.salt)} bytes>, keys=<hidden>)"


# A key that lives only as long as this process. Fake verifiers for unknown
# users are derived from it, so the same unknown name gets the same salt on
# every attempt (a salt that changed per attempt would give the game away),
# yet nobody outside the process can predict or recognise it.
_FAKE_VERIFIER_KEY = secrets.token_bytes(32)


def _fake_verifier(username: str) -> ScramVerifier:
    name = _raw(username)
    salt = _hmac(_FAKE_VERIFIER_KEY, b"salt\x00" + name)[:DEFAULT_SALT_LEN]
    stored_key = _hmac(_FAKE_VERIFIER_KEY, b"stored\x00" + name)
    server_key = _hmac(_FAKE_VERIFIER_KEY, b"server\x00" + name)
    return ScramVerifier(DEFAULT_ITERATIONS, salt, stored_key, server_key)


# --------------------------------------------------------------------------
# SCRAM message parsing helpers
# --------------------------------------------------------------------------


def _decode_message(data: bytes, what: str) -> str:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AuthError(f"malformed SCRAM {what}: expected bytes")
    data = bytes(data)
    if not data:
        raise AuthError(f"malformed SCRAM {what}: empty message")
    if len(data) > _MAX_MESSAGE:
        raise AuthError(f"malformed SCRAM {what}: message too long")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError(f"malformed SCRAM {what}: not valid UTF-8") from None
    if "\x00" in text:
        raise AuthError(f"malformed SCRAM {what}: contains a NUL byte")
    return text


def _attr(part: str, name: str, what: str) -> str:
    """Value of ``<name>=<value>``; AuthError if ``part`` is another attribute."""
    if len(part) < 2 or part[0] != name or part[1] != "=":
        raise AuthError(f"malformed SCRAM {what}: expected attribute '{name}='")
    return part[2:]


def _check_extensions(parts: list[str], what: str) -> None:
    # extensions = attr-val *("," attr-val); attr-val = ALPHA "=" value
    for part in parts:
        if len(part) < 2 or part[0] not in string.ascii_letters or part[1] != "=":
            raise AuthError(f"malformed SCRAM {what}: unexpected data after the expected attributes")


def _check_saslname(name: str, what: str) -> None:
    # saslname: any chars except ',' and '='; '=' only as '=2C' or '=3D'.
    i = 0
    while i < len(name):
        if name[i] == "=":
            if name[i + 1 : i + 3] not in ("2C", "3D"):
                raise AuthError(f"malformed SCRAM {what}: invalid '=' escape in user name")
            i += 3
        else:
            i += 1


def _escape_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


# --------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------


class ScramServerSession:
    """One SCRAM-SHA-256 login attempt of a client against pypool.

    ``verifier=None`` means the user is unknown. The exchange then runs
    against a fake verifier derived from ``username`` and a process-random
    key, so it looks exactly like a real one (same salt on every attempt,
    same iteration count, same message shapes) and then fails with the very
    same error as a wrong password. Pass the startup packet's user name as
    ``username``: PostgreSQL clients leave the SCRAM user name empty, so
    without it every unknown user would share one fake salt.

    ``nonce_suffix`` fixes the server half of the nonce; it exists for test
    vectors only -- leave it alone in production.
    """

    MECHANISMS: tuple[str, ...] = (SCRAM_SHA_256,)

    def __init__(
        self,
        verifier: ScramVerifier | None,
        nonce_bytes: int = 18,
        *,
        username: str = "",
        nonce_suffix: str | None = None,
    ) -> None:
        if nonce_bytes < 1:
            raise ValueError("nonce_bytes must be positive")
        if nonce_suffix is not None and not _is_printable_nonce(nonce_suffix):
            raise ValueError("nonce_suffix must be printable ASCII without ','")
        self._known = verifier is not None
        self._verifier = verifier if verifier is not None else _fake_verifier(username)
        self._nonce_suffix = nonce_suffix if nonce_suffix is not None else _random_nonce(nonce_bytes)
        self._state = "start"
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    @property
    def done(self) -> bool:
        """True once the exchange has finished, successfully or not."""
        return self._state in ("done", "failed")

    def handle_client_first(self, mechanism: str, data: bytes) -> bytes:
        """SASLInitialResponse (mechanism, payload) -> server-first-message."""
        if self._state != "start":
            self._state = "failed"
            raise AuthError("SCRAM exchange out of order: client-first-message already received")
        self._state = "failed"  # until proven otherwise
        what = "client-first-message"
        if mechanism not in self.MECHANISMS:
            if mechanism == SCRAM_SHA_256 + "-PLUS":
                raise AuthError("SASL mechanism SCRAM-SHA-256-PLUS is not supported: no channel binding available")
            raise AuthError("unsupported SASL mechanism: only SCRAM-SHA-256 is offered")
        text = _decode_message(data, what)
        parts = text.split(",")
        if len(parts) < 4:
            raise AuthError(f"malformed SCRAM {what}: expected '<gs2-header>n=<user>,r=<nonce>'")

        # gs2-header: cbind-flag "," [authzid] ","
        flag, authzid = parts[0], parts[1]
        if flag.startswith("p="):
            raise AuthError(
                "SCRAM channel binding was requested but is not supported by this server "
                "(it offers only SCRAM-SHA-256)"
            )
        if flag not in ("n", "y"):
            raise AuthError(f"malformed SCRAM {what}: expected channel-binding flag 'n', 'y' or 'p='")
        # "y": the client could do channel binding but thinks we cannot. We
        # indeed do not advertise SCRAM-SHA-256-PLUS, so that is no downgrade.
        if authzid:
            if authzid.startswith("a="):
                raise AuthError("SCRAM authorization identity (a=) is not supported")
            raise AuthError(f"malformed SCRAM {what}: invalid authorization identity field")

        bare = parts[2:]
        if bare[0].startswith("m="):
            raise AuthError("SCRAM mandatory extensions (m=) are not supported")
        # The user name is ignored, as PostgreSQL does: the startup packet
        # already named the user. Only its syntax is checked.
        _check_saslname(_attr(bare[0], "n", what), what)
        client_nonce = _attr(bare[1], "r", what)
        if not _is_printable_nonce(client_nonce):
            raise AuthError(f"malformed SCRAM {what}: nonce is empty or not printable ASCII")
        _check_extensions(bare[2:], what)

        self._gs2_header = f"{flag},,"
        self._client_first_bare = ",".join(bare)
        self._nonce = client_nonce + self._nonce_suffix
        self._server_first = f"r={self._nonce}{self._verifier.first_message_tail}"
        self._state = "first"
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        """client-final-message -> server-final-message (``v=...``).

        Raises ``AuthError("password authentication failed")`` on a wrong
        proof or an unknown user (indistinguishably).
        """
        if self._state != "first":
            self._state = "failed"
            raise AuthError("SCRAM exchange out of order: client-final-message before client-first-message")
        self._state = "failed"
        what = "client-final-message"
        text = _decode_message(data, what)
        parts = text.split(",")
        if len(parts) < 3:
            raise AuthError(f"malformed SCRAM {what}: expected 'c=<binding>,r=<nonce>,p=<proof>'")

        cbind_text = _attr(parts[0], "c", what)
        try:
            cbind = _b64decode(cbind_text)
        except ValueError:
            raise AuthError(f"malformed SCRAM {what}: channel-binding data is not valid base64") from None
        if not hmac.compare_digest(cbind, self._gs2_header.encode("ascii")):
            raise AuthError(f"malformed SCRAM {what}: channel-binding data does not match the gs2 header")

        nonce = _attr(parts[1], "r", what)
        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("ascii")):
            raise AuthError(f"malformed SCRAM {what}: nonce does not match")

        proof_part = parts[-1]
        if not proof_part.startswith("p="):
            raise AuthError(f"malformed SCRAM {what}: the proof (p=) must be the last attribute")
        _check_extensions(parts[2:-1], what)
        try:
            proof = _b64decode(proof_part[2:])
        except ValueError:
            raise AuthError(f"malformed SCRAM {what}: proof is not valid base64") from None
        if len(proof) != _KEY_LEN:
            raise AuthError(f"malformed SCRAM {what}: proof has the wrong length")

        without_proof = ",".join(parts[:-1])
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof)).encode("utf-8")
        v = self._verifier
        client_signature = v.stored_mac.digest(auth_message)
        client_key = _xor(proof, client_signature)
        # Always run the comparison, even for an unknown user, so both paths
        # do the same work before failing with the same message.
        ok = hmac.compare_digest(_h(client_key), v.stored_key)
        if not (ok and self._known):
            raise AuthError("password authentication failed")
        self._state = "done"
        return ("v=" + _b64(v.server_mac.digest(auth_message))).encode("ascii")


# --------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------


class ScramClientSession:
    """pypool logging in to PostgreSQL with SCRAM-SHA-256.

    ``nonce`` fixes the client nonce (tests only). ``send_username`` puts the
    user name in the client-first-message; PostgreSQL ignores it and libpq
    sends ``n=`` empty, which is the default here -- the option exists to
    reproduce the RFC 7677 test vector. ``gs2_flag`` is ``"n"`` (no channel
    binding support) or ``"y"`` (supported by the client, believed unsupported
    by the server -- what libpq sends over TLS when the server does not offer
    SCRAM-SHA-256-PLUS). ``max_iterations`` bounds the PBKDF2 work a server
    can demand (see ``DEFAULT_MAX_ITERATIONS``).
    """

    def __init__(
        self,
        username: str,
        password: str,
        nonce: str | None = None,
        *,
        send_username: bool = False,
        gs2_flag: str = "n",
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
    ) -> None:
        if nonce is not None and not _is_printable_nonce(nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        if gs2_flag not in ("n", "y"):
            raise ValueError("gs2_flag must be 'n' or 'y'")
        self._username = username
        self._password = password
        self._max_iterations = max_iterations
        self._nonce = nonce if nonce is not None else _random_nonce(18)
        self._gs2_header = f"{gs2_flag},,"
        user = _escape_saslname(username) if send_username else ""
        self._client_first_bare = f"n={user},r={self._nonce}"
        self._server_signature: bytes | None = None
        self._state = "start"

    def __repr__(self) -> str:
        return f"ScramClientSession(username={self._username!r}, state={self._state!r})"

    def client_first(self) -> bytes:
        """The SASLInitialResponse payload, e.g. ``n,,n=,r=<nonce>``."""
        if self._state != "start":
            raise AuthError("SCRAM exchange out of order: client-first-message already sent")
        self._state = "first"
        return (self._gs2_header + self._client_first_bare).encode("utf-8")

    def handle_server_first(self, data: bytes) -> bytes:
        """server-first-message -> client-final-message (with proof)."""
        if self._state != "first":
            self._state = "failed"
            raise AuthError("SCRAM exchange out of order: server-first-message not expected now")
        self._state = "failed"
        what = "server-first-message"
        text = _decode_message(data, what)
        parts = text.split(",")
        if parts[0].startswith("m="):
            raise AuthError("SCRAM mandatory extensions (m=) are not supported")
        if len(parts) < 3:
            raise AuthError(f"malformed SCRAM {what}: expected 'r=<nonce>,s=<salt>,i=<iterations>'")
        nonce = _attr(parts[0], "r", what)
        if not _is_printable_nonce(nonce):
            raise AuthError(f"malformed SCRAM {what}: nonce is not printable ASCII")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise AuthError(f"invalid SCRAM {what}: server nonce does not extend the client nonce")
        try:
            salt = _b64decode(_attr(parts[1], "s", what))
        except ValueError:
            raise AuthError(f"malformed SCRAM {what}: salt is not valid base64") from None
        if not salt:
            raise AuthError(f"malformed SCRAM {what}: empty salt")
        iter_text = _attr(parts[2], "i", what)
        if not (iter_text.isascii() and iter_text.isdigit()) or len(iter_text) > 10:
            raise AuthError(f"malformed SCRAM {what}: iteration count is not a number")
        iterations = int(iter_text)
        if iterations < 1:
            raise AuthError(f"invalid SCRAM {what}: iteration count must be at least 1")
        if iterations > self._max_iterations:
            raise AuthError(
                f"invalid SCRAM {what}: iteration count {iterations} exceeds the limit of {self._max_iterations}"
            )
        _check_extensions(parts[3:], what)

        client_key, stored_key, server_key = _keys_from_salted(_salted_password(self._password, salt, iterations))
        cbind = _b64(self._gs2_header.encode("ascii"))
        without_proof = f"c={cbind},r={nonce}"
        auth_message = ",".join((self._client_first_bare, text, without_proof)).encode("utf-8")
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "final"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, data: bytes) -> None:
        """Check the server-final-message; AuthError unless the server proved it knows our verifier."""
        if self._state != "final" or self._server_signature is None:
            self._state = "failed"
            raise AuthError("SCRAM exchange out of order: server-final-message not expected now")
        self._state = "failed"
        what = "server-final-message"
        text = _decode_message(data, what)
        parts = text.split(",")
        if parts[0].startswith("e="):
            reason = parts[0][2:]
            # server-error-value is a short token like "invalid-proof"; quote
            # it only if it looks like one.
            if reason and len(reason) <= 64 and all(c.isascii() and (c.isalnum() or c == "-") for c in reason):
                raise AuthError(f"SCRAM authentication rejected by the server: {reason}")
            raise AuthError("SCRAM authentication rejected by the server")
        try:
            signature = _b64decode(_attr(parts[0], "v", what))
        except ValueError:
            raise AuthError(f"malformed SCRAM {what}: server signature is not valid base64") from None
        _check_extensions(parts[1:], what)
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthError("SCRAM server signature is invalid: the server does not know the password")
        self._state = "done"


# --------------------------------------------------------------------------
# md5 and cleartext
# --------------------------------------------------------------------------


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_stored(username: str, password: str) -> str:
    """``"md5" + hex(md5(password + username))``: the pg_authid form of an md5 password."""
    return "md5" + _md5_hex(_raw(password) + _raw(username))


def _md5_salted(stored: str, salt: bytes) -> bytes:
    return b"md5" + _md5_hex(stored[3:].encode("ascii") + bytes(salt)).encode("ascii")


def md5_hash(username: str, password: str, salt: bytes) -> bytes:
    """What a client sends for AuthenticationMD5Password (without the trailing NUL):
    ``b"md5" + hex(md5(hex(md5(password + username)) + salt))``."""
    return _md5_salted(md5_stored(username, password), salt)


def _looks_like_md5_stored(text: str) -> bool:
    return (
        len(text) == 35
        and text.startswith("md5")
        and all(c in "0123456789abcdef" for c in text[3:])
    )


def md5_verify(username: str, stored_or_password: str, salt: bytes, client_response: bytes) -> bool:
    """Check a client's md5 PasswordMessage payload in constant time.

    ``stored_or_password`` is either an md5 hash as stored by PostgreSQL
    (``md5`` + 32 lowercase hex digits) or a plaintext password; like
    PostgreSQL, anything of the first shape is taken as a hash. A SCRAM
    verifier cannot serve md5 logins; pass one and this returns False.
    ``client_response`` may carry the PasswordMessage's terminating NUL.
    """
    if stored_or_password.startswith(SCRAM_SHA_256 + "$"):
        return False
    response = bytes(client_response)
    if response.endswith(b"\x00"):
        response = response[:-1]
    if _looks_like_md5_stored(stored_or_password):
        stored = stored_or_password
    else:
        stored = md5_stored(username, stored_or_password)
    return hmac.compare_digest(_md5_salted(stored, salt), response)


def cleartext_response(password: str) -> bytes:
    """The PasswordMessage payload for AuthenticationCleartextPassword (without the NUL)."""
    return _raw(password)
