"""What statements do to a pooled client's session (pypool/session/session_state.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypool.session import session_state as s


def matters(sql: str) -> bool:
    data = b"Q\0\0\0\0" + sql.encode() + b"\0"
    return s.might_matter(data, 5, len(data))


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1;",
    "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 2",
    "BEGIN;",
    "END;",
])
def test_everyday_statements_skip_the_analysis(sql):
    assert not matters(sql)


@pytest.mark.parametrize("sql", [
    "SET search_path = a", "  /* c */ reset all", "-- note\nSET x = 1", "BEGIN; SET LOCAL x = 1; COMMIT",
    "SELECT set_config('a', 'b', false)", "SELECT pg_advisory_lock(1)", "LISTEN x", "deallocate all",
    "ALTER TABLE t ADD COLUMN c int", "DROP TABLE t", "close all",
    "SELECT 1 INTO TEMP t", "select 1 into temp t", "Select 1 Into Temp t",
    "NOTIFY jobs, 'x'", "SELECT pg_notify('jobs', 'x')",
])
def test_session_statements_are_flagged(sql):
    assert matters(sql)


def _matters_by_regex_alone(data: bytes) -> bool:
    """might_matter without its quick rule-out of texts that cannot start with a session word."""
    semi = data.find(b";")
    return bool(s._LEADING.match(data)) or 0 <= semi < len(data) - 3 or s._INSIDE.search(data) is not None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["SET", "set", "sEt", "Select", "reset", "RESET", "dis", "Discard", "close", "CLO",
                                 " ", "\n", "\t", "/* c */", "-- c\n", "x", "1", "(", "DROP", "drop", "Cre", "ate",
                                 "NOTIFY", "unlisten", "se", "s"]), max_size=6))
def test_the_quick_rule_out_never_changes_the_answer(parts):
    data = "".join(parts).encode()
    assert s.might_matter(data, 0, len(data)) == _matters_by_regex_alone(data), data


def test_the_remembered_answer_is_the_answer_and_the_memory_stays_bounded():
    texts = ["SELECT abalance FROM pgbench_accounts WHERE aid = $1", "SET search_path = a",
             "SELECT pg_advisory_lock($1)", "select 1 into temp t", "UPDATE t SET v = $1"]
    for _ in range(2):  # the second round answers from memory
        for sql in texts:
            data = b"P\0\0\0\0\0" + sql.encode() + b"\0\0\0"
            assert s.text_might_matter(data, 6, len(data) - 3) == matters(sql), sql
    for aid in range(3 * s._KNOWN_TEXTS_KEPT):  # literals: every text new
        data = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}".encode()
        assert not s.text_might_matter(data, 0, len(data))
        assert len(s._KNOWN_TEXTS) <= s._KNOWN_TEXTS_KEPT
    assert s.text_might_matter(b"SET x = 1", 0, 9)


@pytest.mark.parametrize("sql, expected", [
    ("SET statement_timeout = '1s'", s.Effects(settings=True)),
    ("SET SESSION search_path TO a, b", s.Effects(settings=True)),
    ("RESET ALL", s.Effects(settings=True, resets=True)),
    ("SET work_mem TO DEFAULT", s.Effects(settings=True, resets=True)),
    ("SELECT set_config('search_path', 'a', false)", s.Effects(settings=True)),
    ("SET LOCAL statement_timeout = '1s'", s.NOTHING),
    ("SET LOCAL synchronous_commit = off", s.Effects(asynchronous_commit=True)),
    ("BEGIN; set local synchronous_commit to 'false'; INSERT INTO t VALUES (1)", s.Effects(asynchronous_commit=True)),
    ("SET LOCAL synchronous_commit = local", s.NOTHING),
    ("ALTER TABLE t ADD COLUMN b int", s.Effects(schema=True)),
    ("drop type mood; create type mood AS ENUM ('a')", s.Effects(may_release=True, schema=True)),
    ("CREATE TEMP TABLE x (a int) ON COMMIT DROP", s.NOTHING),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", s.NOTHING),
    ("UPDATE t SET v = 1", s.NOTHING),
    ("DISCARD ALL", s.Effects(settings=True, forget_all=True, may_release=True, resets=True)),
    ("DISCARD PLANS", s.NOTHING),
    ("DISCARD TEMP", s.Effects(may_release=True)),
    ("DEALLOCATE ALL", s.Effects(forget_all=True, may_release=True)),
    ("DEALLOCATE PREPARE _pg3_0", s.Effects(forget=("_pg3_0",), may_release=True)),
    ('DEALLOCATE "S_1"', s.Effects(forget=("S_1",), may_release=True)),
    ("DROP TABLE t", s.Effects(may_release=True, schema=True)),
    ("CLOSE ALL", s.Effects(may_release=True)),
    ("select pg_advisory_unlock_all()", s.Effects(may_release=True)),
    ("SELECT pg_advisory_unlock(1)", s.Effects(may_release=True)),
    # asyncpg's pool reset, as PostgreSQL runs it: nothing refused, the pooler notes each effect
    ("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
     s.Effects(settings=True, listen=(("UNLISTEN", "*"),), may_release=True, resets=True)),
    ("CLOSE ALL; RESET ALL; DISCARD TEMP", s.Effects(settings=True, may_release=True, resets=True)),
    ("LISTEN Jobs", s.Effects(listen=(("LISTEN", "jobs"),))),
    ('UNLISTEN "Jobs"', s.Effects(listen=(("UNLISTEN", "Jobs"),))),
    ("UNLISTEN *", s.Effects(listen=(("UNLISTEN", "*"),))),
    ("PREPARE TRANSACTION 'x'", s.NOTHING),
    ("CREATE TEMP TABLE t (id int) ON COMMIT DROP", s.NOTHING),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", s.NOTHING),
    ("SELECT pg_advisory_xact_lock(1)", s.NOTHING),
    ("SELECT 'SET x = 1; PREPARE p AS SELECT 1'", s.NOTHING),
    ("SELECT 1 INTO permanent", s.NOTHING),
    ("INSERT INTO temp VALUES (1)", s.NOTHING),
    ("WITH w AS (SELECT 1) INSERT INTO temp SELECT * FROM w", s.NOTHING),
    ('SELECT 1 INTO "temp"', s.NOTHING),
])
def test_analyze(sql, expected):
    assert s.analyze(sql) == expected


@pytest.mark.parametrize("sql, what", [
    ("PREPARE p AS SELECT 1", "SQL PREPARE"),
    ("EXECUTE p(1)", "SQL EXECUTE"),
    ("SELECT pg_try_advisory_lock(7)", "pg_try_advisory_lock"),
    ("CREATE TEMPORARY TABLE t (id int)", "temporary object"),
    ("CREATE GLOBAL TEMP TABLE t (id int) ON COMMIT DELETE ROWS", "temporary object"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD"),
    ("BEGIN; CREATE TEMP TABLE t (id int); COMMIT", "temporary object"),
    ("CREATE TEMP TABLE t AS SELECT 1", "temporary object"),
    ("SELECT 1 AS id INTO TEMP t", "SELECT ... INTO"),
    ("select * into temporary table t from x", "SELECT ... INTO"),
    ("Select 1 Into Local Temp t", "SELECT ... INTO"),
    ("WITH w AS (SELECT 1) SELECT * INTO GLOBAL TEMPORARY t FROM w", "SELECT ... INTO"),
    ("(SELECT 1 INTO TEMP t)", "SELECT ... INTO"),
])
def test_state_that_outlives_the_transaction_pins_or_is_refused_saying_what_and_how(sql, what):
    effects = s.analyze(sql)
    assert effects.pins is not None and effects.refusal is None
    message, hint = s.pin_refusal(effects.pins)
    assert what in message and hint
    message, hint = s.pin_refusal(effects.pins, "all 2 are pinned")
    assert hint.endswith("; all 2 are pinned")


@pytest.mark.parametrize("sql", ["SELECT 1; LISTEN x", "DEALLOCATE p; SELECT 1"])
def test_statements_the_pooler_replaces_must_come_alone(sql):
    message, hint = s.analyze(sql).refusal
    assert "on their own" in message and hint


def test_held_state_names_what_the_catalogs_report():
    assert s.held_state(["0", "0", "0", "0"]) == ""
    assert s.held_state(["2", "0", "1", "0"]) == "2 temporary relations, 1 SQL prepared statements"


def test_refusal_sql_raises_feature_not_supported_with_quotes_escaped():
    sql = s.refusal_sql("it's refused", "don't")
    assert "ERRCODE = '0A000'" in sql and "'it''s refused'" in sql and "'don''t'" in sql


def test_sync_statement_sets_differences_and_resets_leftovers():
    sql = s.sync_statement({"search_path": '"$user", public', "application_name": "a"},
                           {"application_name": "a", "statement_timeout": "5000"})
    assert sql == ("SELECT set_config('search_path', '\"$user\", public', false); "
                   'RESET "statement_timeout"')
    assert s.sync_statement({"a": "1"}, {"a": "1"}) is None


def test_startup_options_become_settings():
    assert s.startup_options(r"-c statement_timeout=5s -csearch_path=a,b --work-mem=8MB "
                             r"-c application_name=my\ app --datestyle=ISO-8601 -d 5") == {
        "statement_timeout": "5s", "search_path": "a,b", "work_mem": "8MB", "application_name": "my app",
        "datestyle": "ISO-8601"}
