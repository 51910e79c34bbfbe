"""One error base for what clients see: each error renders as the ErrorResponse a client receives.

The responses are decoded with pypool's own protocol parser, as a client's driver would read them.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from pypool import limits, sqlstates
from pypool.admin import AdminError
from pypool.config import ServerAddress
from pypool.errors import FATAL, LoginRefused, PoolerError
from pypool.pool.pool import HealthCheckFailed, PoolSettings, PoolTimeout, ServerPool
from pypool.pool.server import Credentials, ServerError
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.protocol.frames import MessageBuffer, ProtocolViolation, parse_startup_packet
from pypool.routing.fanout import FanoutError
from pypool.routing.shard_key import ShardKeyError

PYPOOL = pathlib.Path(__file__).resolve().parents[2] / "pypool"


def received(error: PoolerError) -> dict[str, str]:
    """The fields of the one ErrorResponse a client receives for ``error``."""
    buf = MessageBuffer()
    buf.feed(m.error_response_for(error))
    tag, payload = buf.next_message()
    assert tag == m.ERROR_RESPONSE and len(buf) == 0
    return m.parse_error_fields(payload)


def raised(call, *args) -> PoolerError:
    with pytest.raises(PoolerError) as excinfo:
        call(*args)
    return excinfo.value


def _full_pool() -> ServerPool:
    settings = PoolSettings(pool_size=3, min_pool_size=0, connect_timeout=1, checkout_timeout=0.5,
                            idle_timeout=0, server_lifetime=0)
    return ServerPool(ServerAddress("127.0.0.1", 5433, "primary"), Credentials("u", "p", "db"), settings)


def _over_user_limit() -> None:
    counts = limits.UserConnectionCounts()
    counts.admit(("app", "u"), 1)
    counts.admit(("app", "u"), 1)


# (what raises it, expected SQLSTATE, expected severity): raised where pypool raises them where that is cheap.
CASES = {
    "startup packet too short": (lambda: raised(parse_startup_packet, b"\x00\x00\x00\x04\x00\x03\x00\x00"),
                                 "08P01", "FATAL"),
    "malformed SCRAM verifier": (lambda: raised(auth.ScramVerifier.parse, "SCRAM-SHA-256$x"), "28P01", "FATAL"),
    "wrong password": (lambda: auth.AuthError("password authentication failed"), "28P01", "FATAL"),
    "hba reject": (lambda: raised(limits.access_method, (), "md5", "10.0.0.1", "app", "u", False),
                   "28000", "FATAL"),
    "max_client_connections": (lambda: raised(_over_user_limit), "53300", "FATAL"),
    "checkout timeout": (lambda: _full_pool().timeout_error(), "53300", "ERROR"),
    "server error relayed": (lambda: ServerError("relation missing", {"C": "42P01", "M": "relation missing"}),
                             "42P01", "ERROR"),
    "server unreachable": (lambda: ServerError("could not connect"), "08006", "ERROR"),
    "health check failed": (lambda: HealthCheckFailed("health check failed", {"C": sqlstates.CONNECTION_FAILURE}),
                            "08006", "ERROR"),
    "admin syntax": (lambda: AdminError(sqlstates.SYNTAX_ERROR, "usage: BAN host seconds"), "42601", "ERROR"),
    "shutting down": (lambda: LoginRefused(sqlstates.ADMIN_SHUTDOWN, "pypool is shutting down"), "57P01", "FATAL"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_client_visible_error_renders_with_its_sqlstate_and_severity(case):
    make, sqlstate, severity = CASES[case]
    error = make()
    fields = received(error)
    assert (fields["C"], fields["S"], fields["V"]) == (sqlstate, severity, severity)
    assert fields["M"] == str(error) and fields["M"]
    assert "D" not in fields and "H" not in fields


def test_detail_and_hint_reach_the_client():
    error = AdminError(sqlstates.FEATURE_NOT_SUPPORTED, "simple protocol only", hint="use simple queries",
                       detail="Parse is not accepted")
    fields = received(error)
    assert fields["C"] == "0A000" and fields["S"] == "ERROR"
    assert fields["H"] == "use simple queries" and fields["D"] == "Parse is not accepted"


def test_a_severity_given_at_the_raise_site_wins_over_the_class_default():
    assert received(LoginRefused(sqlstates.TOO_MANY_CONNECTIONS, "x", severity="ERROR"))["S"] == "ERROR"
    assert LoginRefused(sqlstates.TOO_MANY_CONNECTIONS, "x").severity == FATAL


def test_server_error_keeps_the_servers_fields():
    fields = {"S": "ERROR", "C": "23505", "M": "duplicate key", "D": "Key (id)=(1) already exists."}
    error = ServerError("server pg1: duplicate key", fields)
    assert error.fields is fields and error.sqlstate == "23505"


@pytest.mark.parametrize("cls", [ProtocolViolation, auth.AuthError, auth.VerifierFormatError, ServerError,
                                 HealthCheckFailed, PoolTimeout, LoginRefused, AdminError, FanoutError,
                                 ShardKeyError])
def test_every_error_a_client_can_see_derives_from_the_base(cls):
    assert issubclass(cls, PoolerError)


def test_each_sqlstate_is_defined_once_under_one_name():
    codes = {name: value for name, value in vars(sqlstates).items() if name.isupper()}
    assert codes, "no codes found"
    for name, value in codes.items():
        assert re.fullmatch(r"[0-9A-Z]{5}", value), name
    duplicates = {v: [n for n in codes if codes[n] == v] for v in codes.values()}
    assert {v: ns for v, ns in duplicates.items() if len(ns) > 1} == {}


def test_sqlstates_are_spelled_only_in_the_sqlstates_module():
    """A code written out elsewhere, or an old ``SQLSTATE_*`` name, would be a second definition."""
    quoted_code = re.compile(r"""["'](?=[0-9A-Z]*[0-9])[0-9A-Z]{5}["']""")
    offenders = []
    for path in sorted(PYPOOL.rglob("*.py")):
        if path.name == "sqlstates.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if quoted_code.search(line) or "SQLSTATE_" in line:
                offenders.append(f"{path.relative_to(PYPOOL.parent)}:{number}: {line.strip()}")
    assert offenders == []


def test_every_defined_sqlstate_is_used():
    source = "\n".join(p.read_text() for p in PYPOOL.rglob("*.py") if p.name != "sqlstates.py")
    unused = [name for name in vars(sqlstates) if name.isupper() and f"sqlstates.{name}" not in source]
    assert unused == []
