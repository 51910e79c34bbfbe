"""The admin console: the virtual databases ``pgcat``, ``pgbouncer`` and ``pypool``.

A client that logs in to one of them with ``[general] admin_username`` /
``admin_password`` (SCRAM-SHA-256 or md5, the same exchange as any client)
talks to pypool itself; no server is involved. It speaks the simple query
protocol only, like PgCat's and PgBouncer's consoles, and answers:

``SHOW POOLS | STATS | SERVERS | CLIENTS | DATABASES | CONFIG | LISTS | USERS |
VERSION | BANS | HELP | STATS_TOTALS | STATS_AVERAGES``, ``RELOAD``,
``PAUSE [db[,user]]``, ``RESUME [db[,user]]``, ``SHUTDOWN``,
``BAN host[:port] seconds``, ``UNBAN host[:port]`` and ``SET ...`` (ignored).

Column names and order are PgCat's (``src/admin.rs``); ``STATS_TOTALS`` and
``STATS_AVERAGES``, which PgCat lacks, follow PgBouncer. Where PgCat leaves a
column at 0 and pypool knows the value, pypool fills it in: ``total_xact_time``,
``total_query_time``, ``avg_query_time`` (microseconds, as PgBouncer's), ``sv_used``,
``sv_tested``, ``cl_cancel_req``. Admins may log in during the shutdown drain. ``BAN``/``UNBAN``/``SHOW BANS``
add a trailing ``port`` column and accept ``host:port``, because several
servers may share a host (all of them do in the local cluster).

Every SHOW renders from a ``pypool.snapshot.Snapshot`` (plain data, taken
once per statement through ``Application.stats_snapshot()``), never from live
pool objects, so the same tables can be built from several processes' merged
snapshots. Every error is an ErrorResponse with a SQLSTATE; the session stays
usable.

Modules: ``login`` (the hand-off from a client login), ``console`` (the
session loop), ``commands`` (parse and run one statement), ``tables`` (rows
from snapshots).
"""

from pypool.admin.commands import AdminCommands, AdminError
from pypool.admin.console import AdminConsole
from pypool.admin.login import ADMIN_DATABASES, login

__all__ = ["ADMIN_DATABASES", "AdminCommands", "AdminConsole", "AdminError", "login"]
