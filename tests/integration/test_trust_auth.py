"""PgCat's `auth_type = "trust"` per user and `admin_auth_type = "trust"`: logins without a password check."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import DATABASE, USER, user_overrides
from tests.integration._ops import admin, show
from tests.integration._support import PRIMARY_ONLY, merge

pytestmark = pytest.mark.integration

WRONG = "not-the-password"


def login(pypool, user: str = USER, password: str = WRONG, dbname: str = DATABASE) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=pypool.port, user=user, password=password, dbname=dbname,
                           sslmode="disable", autocommit=True, connect_timeout=10)


def test_a_trust_user_logs_in_without_its_password(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(auth_type="trust")))
    with login(pypool) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == USER
    # Trust admits a configured user only, and does not open the admin console.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(pypool, user="nobody")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        admin(pypool, password=WRONG)


def test_without_auth_type_the_password_is_checked(start_pypool):
    pypool = start_pypool(PRIMARY_ONLY)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(pypool)


def test_admin_auth_type_trust_opens_the_console_to_the_admin_user_only(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, {"general": {"admin_auth_type": "trust"}}))
    with admin(pypool, password=WRONG) as conn:
        assert show(conn, "VERSION")
    with pytest.raises(psycopg.OperationalError):
        admin(pypool, user=USER, password=WRONG)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(pypool)  # the pools still check passwords
