"""The hand-off from a client login to the admin console: authenticate the admin user, greet, console."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from pypool.admin.console import AdminConsole, ConsoleClient
from pypool.protocol import auth
from pypool.protocol import messages as m

log = logging.getLogger("pypool.admin")

# Logging in to one of these databases opens the console instead of a pool.
ADMIN_DATABASES = frozenset({"pgcat", "pgbouncer", "pypool"})


async def login(client: ConsoleClient) -> AdminConsole:
    """Authenticate an admin-database login and greet it; raises auth.AuthError on a bad login."""
    general = client.app.config.general
    identity = None
    session = client.session
    if session.user == general.admin_username:
        identity = SimpleNamespace(user=SimpleNamespace(username=general.admin_username,
                                                        password=general.admin_password))
    await client.authenticate(identity)
    if identity is None:
        raise auth.AuthError("not the admin user")
    console = AdminConsole(client)
    _greet(console)
    log.info("admin console: %s logged in as %s to %s", session.peer, session.user, session.database)
    return console


def _greet(console: AdminConsole) -> None:
    """AuthenticationOk, the server parameters a driver expects, the cancel key, ReadyForQuery."""
    client = console.client
    server_version = "15.0"
    for group in client.app.groups.values():
        if group.server_parameters and group.server_parameters.get("server_version"):
            server_version = group.server_parameters["server_version"]
            break
    params = {
        "server_version": server_version, "server_encoding": "UTF8", "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY", "TimeZone": "UTC", "integer_datetimes": "on", "IntervalStyle": "postgres",
        "standard_conforming_strings": "on", "is_superuser": "off",
        "application_name": "",
    }
    session = client.session
    session.process_id, session.secret_key = client.app.register_cancel_key(session)
    out = [m.authentication_ok()]
    out.extend(m.parameter_status(k, v) for k, v in params.items())
    out.append(m.backend_key_data(session.process_id, session.secret_key))
    out.append(m.ready_for_query())
    client.greet(b"".join(out))
