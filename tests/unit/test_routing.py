"""Router and PoolGroup decisions without a server (issue 3).

The Router and the PoolGroup are built from real PgCat-format TOML through
``parse_config``; only the choice of role and server is looked at here, the
integration tests prove where statements really run.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pypool.config import parse_config
from pypool.pool.balancer import Balancer
from pypool.pool.group import PoolGroup
from pypool.roles import ANY, PRIMARY, REPLICA
from pypool.protocol import messages as m
from pypool.routing.router import Router, RoutingState
from tests.unit._minimal_config import minimal_config

SERVERS = '[["db1", 5432, "primary"], ["db2", 5432, "replica"], ["db3", 5432, "replica"]]'


def config(servers: str = SERVERS, **pool: object):
    lines = []
    for key, value in pool.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, str):
            value = f'"{value}"'
        lines.append(f"{key} = {value}")
    return parse_config(minimal_config("ban_time = 60", "\n".join(lines), servers), "test.toml")


def router(**pool: object) -> Router:
    return Router(config(**pool).pools["app"])


SPLIT = dict(query_parser_enabled=True, query_parser_read_write_splitting=True)


def route(r: Router, sql: str, state: RoutingState | None = None, **kw):
    return r.route(state or RoutingState(), m.QUERY, m.cstr(sql), **kw)


def parse_message(sql: str) -> bytes:
    return m.message(m.PARSE, m.cstr("") + m.cstr(sql) + b"\x00\x00")


# ----------------------------------------------------------------- roles


def test_splitting_sends_reads_to_replicas_and_writes_to_the_primary():
    r = router(**SPLIT)
    assert route(r, "SELECT 1").role == REPLICA
    assert route(r, "UPDATE t SET a = 1").role == PRIMARY
    assert route(r, "WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d").role == PRIMARY
    assert route(r, "SELEC 1").role == PRIMARY  # parse failure


def test_parse_failure_goes_to_the_primary_even_after_a_read():
    # PgCat reuses the previous role for an unparsable query; pypool never does.
    r = router(**SPLIT)
    state = RoutingState()
    assert route(r, "SELECT 1", state).role == REPLICA
    assert route(r, "SELECT (1", state).role == PRIMARY
    assert route(r, "SELECT 'unterminated", state).role == PRIMARY


def test_primary_reads_enabled_lets_reads_use_any_server():
    assert route(router(**SPLIT, primary_reads_enabled=True), "SELECT 1").role == ANY
    assert route(router(**SPLIT, primary_reads_enabled=False), "SELECT 1").role == REPLICA


@pytest.mark.parametrize("default_role,expected", [("any", ANY), ("replica", REPLICA), ("primary", PRIMARY)])
def test_default_role_without_the_parser(default_role, expected):
    r = router(default_role=default_role)
    for sql in ("SELECT 1", "UPDATE t SET a = 1", "BEGIN"):
        assert route(r, sql).role == expected
    # The hot path agrees.
    assert r.route_default(m.query("DELETE FROM t")).role == expected


def test_default_role_with_the_parser_but_no_splitting():
    r = router(query_parser_enabled=True, default_role="replica")
    assert route(r, "UPDATE t SET a = 1").role == REPLICA


def test_query_parser_max_length():
    r = router(**SPLIT, query_parser_max_length=50)
    short = "SELECT a FROM t"
    long = "SELECT " + ", ".join(f"col{i}" for i in range(20)) + " FROM t"
    assert len(long) > 50
    assert route(r, short).role == REPLICA
    decision = route(r, long)
    assert decision.role == PRIMARY and decision.reason == "too long"
    assert r.route_default(m.query(long)).role == PRIMARY


def test_hint_comment_forces_one_statement():
    r = router(**SPLIT)
    state = RoutingState()
    assert route(r, "/* pypool: role=primary */ SELECT 1", state).role == PRIMARY
    assert route(r, "SELECT 1", state).role == REPLICA  # only that statement
    assert route(r, "/* pypool: role=replica */ SELECT my_function()", state).role == REPLICA
    # Also without the parser.
    assert route(router(default_role="primary"), "/* pypool: role=replica */ SELECT 1").role == REPLICA


# ------------------------------------------------------ BEGIN hold-back


def test_bare_begin_is_held_back_and_read_only_begin_decides():
    r = router(**SPLIT)
    held = route(r, "BEGIN")
    assert held.hold_begin and held.statement == "BEGIN"
    assert route(r, "BEGIN READ ONLY").role == REPLICA
    assert route(r, "BEGIN READ WRITE").role == PRIMARY
    assert route(r, "BEGIN READ WRITE; SELECT 1").role == PRIMARY
    # A hot standby refuses serializable transactions, even read-only ones.
    assert route(r, "BEGIN ISOLATION LEVEL SERIALIZABLE").role == PRIMARY
    assert route(r, "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY; SELECT 1; COMMIT").role == PRIMARY
    assert route(r, "START TRANSACTION ISOLATION LEVEL REPEATABLE READ").hold_begin
    # The statement after a held BEGIN decides; an immediate COMMIT/ROLLBACK is answered locally.
    assert route(r, "SELECT 1", held_begin=True).role == REPLICA
    assert route(r, "INSERT INTO t VALUES (1)", held_begin=True).role == PRIMARY
    commit = route(r, "COMMIT", held_begin=True)
    assert commit.ends_empty_transaction and commit.end_tag == "COMMIT"
    assert route(r, "rollback;", held_begin=True).end_tag == "ROLLBACK"


# ------------------------------------------------ extended protocol path


def test_extended_protocol_routes_by_parse():
    r = router(**SPLIT)
    state = RoutingState()
    assert r.route(state, m.PARSE, parse_message("SELECT $1::int")[5:]).role == REPLICA
    assert r.route(state, m.PARSE, parse_message("INSERT INTO t VALUES ($1)")[5:]).role == PRIMARY
    # A Bind of a statement prepared earlier has no text at hand: primary, never a guess.
    bind = m.cstr("") + m.cstr("stmt1") + b"\x00\x00\x00\x00\x00\x00"
    assert r.route(state, m.BIND, bind).role == PRIMARY


def test_memoised_decisions_match_the_full_path_and_count_as_cache_hits():
    r = router(**SPLIT)
    select = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    first = r.route_default(select)
    hits = r.cache.hits
    for _ in range(5):
        assert r.route_default(select) is first
    assert first.role == REPLICA
    assert r.cache.hits == hits + 5  # the memo is part of the cache: no sqlglot ran
    assert r.route_default(parse_message("UPDATE t SET a = $1")).role == PRIMARY
    assert r.route_default(m.query("BEGIN")) is None  # needs the client's state
    assert r.route_default(m.query("SET SERVER ROLE TO 'primary'")) is None


def test_texts_that_differ_only_in_numbers_are_decided_once():
    r = router(**SPLIT, query_parser_max_length=60)
    texts = [f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};" for aid in range(1, 101)]
    decisions = [r.route_default(m.query(t)) for t in texts]
    assert {d.role for d in decisions} == {REPLICA}
    # pgbench -S: one decision for every account (each decision made is a new object).
    assert len({id(d) for d in decisions}) == 1
    assert r.cache.hits >= 99
    # A hint comment, quotes or a text over query_parser_max_length are never taken for the shape.
    assert r.route_default(m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 7 "
                                   "/* pypool: role=primary */")).role == PRIMARY
    assert r.route_default(m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 123456789012")).role == PRIMARY
    assert r.route_default(m.query("UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 5;")).role == PRIMARY
    assert r.route_default(m.query("SET SHARDING KEY TO 5")) is None  # custom commands: never remembered
    assert r.route_default(m.query("SET SHARDING KEY TO 6")) is None


def test_a_pool_without_replicas_takes_the_plain_path():
    def no_replica_router(**pool: object) -> Router:
        return Router(config('[["db1", 5432, "primary"]]', **pool).pools["app"])

    r = no_replica_router(**SPLIT, primary_reads_enabled=True)
    for sql in ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", "UPDATE t SET a = 1", "BEGIN"):
        assert r.route_default(m.query(sql)).role == PRIMARY
    assert r.cache.misses == 0 and len(r.cache) == 0  # nothing was classified
    assert r.route_default(m.query("/* pypool: role=replica */ SELECT 1")) is not None  # hints still looked at
    # Reads that must not go to the primary still fail as before (no server can serve them).
    strict = no_replica_router(**SPLIT, primary_reads_enabled=False)
    assert strict.route_default(m.query("SELECT 1")).role == REPLICA


# ------------------------------------------------------- custom commands


def test_pgcat_custom_commands():
    r = router(**SPLIT)
    state = RoutingState()
    assert route(r, "SHOW SERVER ROLE", state).reply is not None
    assert r.describe_role(state) == "auto"
    assert route(r, "set server role to 'replica';", state).reply is not None
    assert route(r, "UPDATE t SET a = 1", state).role == REPLICA  # forced, PostgreSQL will refuse it
    route(r, "SET SERVER ROLE TO 'primary'", state)
    assert route(r, "SELECT 1", state).role == PRIMARY
    route(r, "SET SERVER ROLE TO 'any'", state)
    assert route(r, "SELECT 1", state).role == ANY
    route(r, "SET SERVER ROLE TO 'auto'", state)
    assert route(r, "SELECT 1", state).role == REPLICA
    route(r, "SET PRIMARY READS TO on", state)
    assert r.primary_reads(state) and route(r, "SELECT 1", state).role == ANY
    route(r, "SET PRIMARY READS TO default", state)
    assert not r.primary_reads(state)
    # Not custom commands: ordinary SETs go to the server.
    assert route(r, "SET search_path TO x", state).reply is None


def test_auto_without_read_write_splitting_means_any_server_as_in_pgcat():
    r = router(default_role="primary")
    state = RoutingState()
    assert route(r, "SELECT 1", state).role == PRIMARY
    route(r, "SET SERVER ROLE TO 'auto'", state)
    assert r.describe_role(state) == "auto"
    assert route(r, "UPDATE t SET a = 1", state).role == ANY
    route(r, "SET SERVER ROLE TO 'default'", state)
    assert r.describe_role(state) == "primary"
    assert route(r, "SELECT 1", state).role == PRIMARY


def test_show_server_role_without_the_parser_reports_default_role():
    r = router(default_role="replica")
    state = RoutingState()
    reply = route(r, "SHOW SERVER ROLE", state).reply
    assert b"replica" in reply


# ------------------------------------------------------- groups and bans


def group(**pool: object) -> PoolGroup:
    cfg = config(**pool)
    p = cfg.pools["app"]
    return PoolGroup(p, p.users["u"], cfg.general)


def test_banned_replica_gets_no_reads_until_ban_time_passes():
    g = group(load_balancing_mode="round_robin")
    db2, db3 = g.replicas
    g.ban(db2, "connect failed")
    assert {g.choose(REPLICA) for _ in range(10)} == {db3}
    assert db2.ban_reason == "connect failed" and db2.bans == 1
    g.ban(db2, "again")  # already banned: not extended, not counted
    assert db2.bans == 1
    db2.banned_until = time.monotonic() - 1  # ban_time over
    g.refresh_candidates()
    assert {g.choose(REPLICA) for _ in range(10)} == {db2, db3}


def test_primary_is_never_banned():
    g = group()
    g.ban(g.primary, "whatever")
    assert not g.is_banned(g.primary)


def test_every_replica_banned_reads_go_to_primary_when_primary_reads_enabled():
    g = group(primary_reads_enabled=True)
    for r in g.replicas:
        g.ban(r, "down")
    assert g._read_candidates(ANY) == [g.primary]
    assert all(g.is_banned(r) for r in g.replicas)  # bans stay


def test_every_replica_banned_clears_bans_when_primary_reads_disabled():
    g = group(primary_reads_enabled=False)
    for r in g.replicas:
        g.ban(r, "down")
    assert g.choose(REPLICA) is None  # the hot path steps aside to the checkout coroutine
    assert set(g._read_candidates(REPLICA)) == set(g.replicas)
    assert not any(g.is_banned(r) for r in g.replicas)


def test_lagging_replica_is_skipped():
    g = group(max_replica_lag_ms=100)
    db2, db3 = g.replicas
    db2.lag_ms = 5000.0
    g.refresh_candidates()
    assert {g.choose(REPLICA) for _ in range(20)} == {db3}


# ------------------------------------------------------------- balancer


class _Server:
    def __init__(self, name: str, active: int = 0) -> None:
        self.name, self.active = name, active


def test_round_robin_alternates():
    b = Balancer("round_robin")
    servers = [_Server("a"), _Server("b"), _Server("c")]
    assert [b.pick(servers).name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_loc_picks_least_outstanding_and_breaks_ties_at_random():
    b = Balancer("loc")
    busy, idle = _Server("busy", active=3), _Server("idle", active=1)
    assert {b.pick([busy, idle]).name for _ in range(50)} == {"idle"}
    tied = [_Server("a", 2), _Server("b", 2)]
    counts = collections.Counter(b.pick(tied).name for _ in range(2000))
    assert 800 < counts["a"] < 1200


def test_random_spreads_evenly():
    b = Balancer("random")
    servers = [_Server("a"), _Server("b")]
    counts = collections.Counter(b.pick(servers).name for _ in range(4000))
    assert 1700 < counts["a"] < 2300


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="load_balancing_mode"):
        Balancer("fastest")


def test_sqlglot_is_loaded_only_by_a_pool_that_parses():
    """sqlglot costs about 30 MiB per process: a plain pooler (every worker of it) never imports it."""
    probe = """
import sys
import pypool.app, pypool.cli
from tests.unit.test_routing import SPLIT, route, router
plain = router(default_role="primary")
route(plain, "SELECT abalance FROM pgbench_accounts WHERE aid = 1")
print("sqlglot" in sys.modules)
route(router(**SPLIT), "SELECT abalance FROM pgbench_accounts WHERE aid = 1")
print("sqlglot" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
