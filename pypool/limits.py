"""Admission limits on client connections: who may log in, and how many at once.

``max_client_conn`` caps all clients together (checked by the application
when the startup packet arrives); ``max_client_connections`` on a pool's user
caps that user's clients in that pool, counted here from a successful login
to the disconnect, like PostgreSQL's per-role connection limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pypool import hba, sqlstates
from pypool.errors import LoginRefused

if TYPE_CHECKING:
    from pypool.config import General, User


class UserConnectionCounts:
    """Logged-in clients per (database, user)."""

    def __init__(self) -> None:
        # A plain dict, not a Counter: Counter's __missing__ and __delitem__ are Python calls, one per login each.
        self._counts: dict[tuple[str, str], int] = {}

    def admit(self, key: tuple[str, str], limit: int) -> None:
        """Count one more client of ``key``, or raise LoginRefused when ``limit`` (0 = none) is reached."""
        count = self._counts.get(key, 0)
        if limit and count >= limit:
            raise LoginRefused(sqlstates.TOO_MANY_CONNECTIONS,
                               f'too many connections for user "{key[1]}" to pool "{key[0]}": '
                               f"max_client_connections is {limit}")
        self._counts[key] = count + 1

    def release(self, key: tuple[str, str]) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)

    def __getitem__(self, key: tuple[str, str]) -> int:
        return self._counts.get(key, 0)


def admin_method(general: "General", hba_method: str) -> str:
    """How the admin logs in: hba trust does not open the console, only admin_auth_type = "trust" does."""
    if general.admin_auth_type is not None:
        return general.admin_auth_type
    return general.client_auth_method if hba_method == "trust" else hba_method


def user_method(general: "General", hba_method: str, user: "User") -> str:
    """A user's auth_type (PgCat's key) applies where no hba rules decide."""
    return user.auth_type if general.hba is None and user.auth_type is not None else hba_method


def access_method(rules: tuple[hba.HbaRule, ...] | None, default_method: str, address: str,
                  database: str, user: str, tls: bool) -> str:
    """The authentication method for a login, or LoginRefused when the access rules turn it away."""
    if rules is None:
        return default_method
    rule = hba.first_match(rules, address, database, user, tls)
    encryption = "TLS" if tls else "no encryption"
    if rule is None:
        raise LoginRefused(sqlstates.INVALID_AUTHORIZATION_SPECIFICATION,
                           f'no pypool hba entry for host "{address}", user "{user}", database "{database}", '
                           f"{encryption}")
    if rule.method == "reject":
        raise LoginRefused(sqlstates.INVALID_AUTHORIZATION_SPECIFICATION,
                           f'pypool hba rejects connection for host "{address}", user "{user}", '
                           f'database "{database}", {encryption}')
    return rule.method
