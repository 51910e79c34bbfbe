"""The statement table: which role each kind of statement must get (issue 3).

``replica`` means provably read-only, ``primary`` means anything else, and
``neutral`` is transaction control that decides nothing by itself (a bare
BEGIN is held back until the first real statement; ROLLBACK goes wherever the
transaction already is).  Each row is classified by the real classifier
(sqlglot underneath); nothing is mocked.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypool.routing import query_tree
from pypool.routing.cache import TOO_LONG, ClassificationCache, fingerprint
from pypool.routing.classify import classify, read_only_functions, role_hint

R, P, N = "replica", "primary", "neutral"


def role_of(sql: str, functions: frozenset[str] | None = None) -> str:
    c = classify(sql) if functions is None else classify(sql, functions)
    if not c.has_statement and not c.writes:
        return N
    return P if c.writes else R


TABLE: list[tuple[str, str]] = [
    # --- plain reads
    ("SELECT 1", R),
    ("select a, b from t join u using (id) where x > 3 order by a limit 10", R),
    ("SELECT * FROM t WHERE a = $1 AND b = $2", R),
    ("VALUES (1, 2), (3, 4)", R),
    ("TABLE t", R),
    ("(SELECT 1) UNION (SELECT 2) EXCEPT SELECT 3", R),
    ("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC FETCH FIRST 5 ROWS ONLY", R),
    ("SELECT row_number() OVER (PARTITION BY a ORDER BY b), count(*) FILTER (WHERE c) FROM t GROUP BY a, b, c", R),
    ("SELECT * FROM (VALUES (1), (2)) v(a), LATERAL (SELECT v.a + 1) l", R),
    ("SELECT EXISTS (SELECT 1 FROM t) AND b = ANY(ARRAY[1, 2])", R),
    ("SHOW search_path", R),
    ("COPY t TO STDOUT", R),
    ("COPY (SELECT a FROM t WHERE a > 1) TO STDOUT WITH (FORMAT csv)", R),
    ("EXPLAIN DELETE FROM t", R),  # plans only, runs nothing
    ("EXPLAIN ANALYZE SELECT * FROM t", R),
    ("DECLARE c CURSOR FOR SELECT * FROM t", R),
    # --- CTEs that only read
    ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", R),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT n FROM r", R),
    ("WITH x AS MATERIALIZED (SELECT * FROM t), y AS (SELECT * FROM x) SELECT * FROM y", R),
    # --- writing CTEs at the top level
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", P),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u", P),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", P),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", P),
    ("WITH x AS (SELECT 1) DELETE FROM t USING x", P),
    # --- writing CTEs nested inside a CTE or a subquery (PgCat misses these)
    ("WITH a AS (SELECT 1), b AS (WITH c AS (DELETE FROM t RETURNING 1) SELECT * FROM c) SELECT * FROM b", P),
    ("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s", P),
    ("SELECT (WITH d AS (UPDATE t SET a = 2 RETURNING a) SELECT max(a) FROM d)", P),
    ("SELECT * FROM t WHERE id IN (WITH i AS (INSERT INTO u DEFAULT VALUES RETURNING id) SELECT id FROM i)", P),
    ("WITH d AS (SELECT 1) SELECT * FROM d, LATERAL "
     "(WITH q AS (INSERT INTO t DEFAULT VALUES RETURNING 1) SELECT * FROM q) z", P),
    # --- locking reads, anywhere in the tree
    ("SELECT * FROM t FOR UPDATE", P),
    ("SELECT * FROM t FOR NO KEY UPDATE", P),
    ("SELECT * FROM t FOR SHARE", P),
    ("SELECT * FROM t FOR KEY SHARE", P),
    ("select * from t for   update skip locked", P),
    ("SELECT * FROM t FOR UPDATE OF t NOWAIT", P),
    ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u FOR UPDATE)", P),
    ("WITH x AS (SELECT * FROM t FOR SHARE) SELECT * FROM x", P),
    ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", P),
    # --- SELECT INTO creates a table
    ("SELECT * INTO newt FROM t", P),
    ("SELECT a INTO TEMP tmp FROM t", P),
    ("SELECT a INTO UNLOGGED TABLE tmp2 FROM t", P),
    # --- DML
    ("INSERT INTO t VALUES (1)", P),
    ("INSERT INTO t SELECT * FROM u ON CONFLICT DO NOTHING", P),
    ("UPDATE t SET a = a + 1", P),
    ("DELETE FROM t WHERE id = 3", P),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a", P),
    ("TRUNCATE t", P),
    # --- DDL and utility commands
    ("CREATE TABLE x (a int)", P),
    ("CREATE TEMP TABLE x (a int)", P),
    ("CREATE TABLE x AS SELECT 1", P),
    ("ALTER TABLE t ADD COLUMN b int", P),
    ("DROP TABLE t", P),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", P),
    ("GRANT SELECT ON t TO bob", P),
    ("VACUUM t", P),
    ("ANALYZE t", P),
    ("REFRESH MATERIALIZED VIEW v", P),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", P),
    ("DO $$ BEGIN PERFORM 1; END $$", P),
    ("CALL proc(1)", P),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END", P),
    ("EXPLAIN ANALYZE DELETE FROM t", P),  # ANALYZE runs it
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", P),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", P),  # outlives the transaction
    ("FETCH ALL FROM c", P),  # outside a transaction only a WITH HOLD cursor exists
    # --- functions on the read-only allow-list
    ("SELECT count(*), coalesce(max(a), 0), lower(b) FROM t GROUP BY b", R),
    ("SELECT now(), current_timestamp, current_date, length('abc'), upper('x')", R),
    ("SELECT date_trunc('day', now()) - interval '1 day', EXTRACT(epoch FROM now())", R),
    ("SELECT CASE WHEN a > 1 THEN 'x' ELSE 'y' END, a::text, b->>'k', c::regclass FROM t", R),
    ("SELECT substring('abc' from 1 for 2), trim(both ' ' from ' a '), position('b' in 'abc')", R),
    ("SELECT pg_catalog.lower('X')", R),
    ("SELECT * FROM generate_series(1, 10)", R),
    ("SELECT jsonb_build_object('a', 1) ? 'a'", R),
    ("SELECT inet_server_port(), pg_is_in_recovery(), version()", R),
    # --- functions off the allow-list: unknown, user-defined, quoted, qualified
    ("SELECT my_func(1)", P),
    ("SELECT public.my_func(1)", P),
    ('SELECT "Lower"(\'x\')', P),  # quoted: a different function than lower()
    ("SELECT * FROM my_srf(3)", P),
    ("WITH x AS (SELECT my_write_func()) SELECT * FROM x", P),
    ("SELECT 1 UNION SELECT audit_log('read')", P),
    ("SELECT pg_sleep(1)", P),
    ("SELECT set_config('a.b', 'c', false)", P),
    ("SELECT pg_terminate_backend(123)", P),
    ("SELECT lo_import('/etc/passwd')", P),
    ("SELECT txid_current()", P),
    # --- sequences
    ("SELECT nextval('s')", P),
    ("SELECT setval('s', 10)", P),
    ("SELECT pg_catalog.nextval('s')", P),
    ('SELECT "nextval"(\'s\')', P),
    ("VALUES (nextval('s'))", P),
    ("SELECT * FROM t WHERE a = (SELECT nextval('s'))", P),
    ("COPY (SELECT nextval('s')) TO STDOUT", P),
    # --- advisory locks
    ("SELECT pg_advisory_lock(1)", P),
    ("SELECT PG_TRY_ADVISORY_LOCK(1)", P),
    ("SELECT pg_advisory_xact_lock(1)", P),
    ("SELECT pg_advisory_unlock_all()", P),
    ("SELECT * FROM t, LATERAL (SELECT pg_advisory_lock_shared(t.id)) l", P),
    # --- LISTEN / NOTIFY / UNLISTEN
    ("LISTEN ch", P),
    ("NOTIFY ch, 'payload'", P),
    ("SELECT pg_notify('ch', 'x')", P),
    ("UNLISTEN *", P),
    ("UNLISTEN ch", P),
    # --- COPY FROM writes, COPY TO a server file too
    ("COPY t FROM STDIN", P),
    ("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", P),
    ("COPY t FROM '/tmp/x.csv'", P),
    ("COPY t TO '/tmp/out.csv'", P),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", P),
    # --- SET / RESET reach the session; SET LOCAL / SET TRANSACTION do not
    ("SET search_path TO public", P),
    ("SET statement_timeout = 1000", P),
    ("SET SESSION work_mem = '64MB'", P),
    ("SET TIME ZONE 'UTC'", P),
    ("RESET ALL", P),
    ("RESET search_path", P),
    ("DISCARD ALL", P),
    ("SET LOCAL statement_timeout = 1000", N),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", N),
    # --- PREPARE is a read only when its query is and it is gone by the end of the text: kept, it pins
    # its client to that connection (the primary, where later writes can run); EXECUTE/DEALLOCATE
    # cannot be proven
    ("PREPARE p AS SELECT * FROM t WHERE id = $1", P),
    ("PREPARE p (int, text) AS SELECT $1, $2", P),
    ("PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p", R),
    ("PREPARE p AS UPDATE t SET a = $1", P),
    ("PREPARE p AS SELECT nextval('s')", P),
    ("PREPARE p AS SELECT * FROM t FOR UPDATE", P),
    ("PREPARE p AS WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d", P),
    ("EXECUTE p(1)", P),
    ("DEALLOCATE p", P),
    ("DEALLOCATE ALL", P),
    ("PREPARE p (int) AS SELECT $1; EXECUTE p(1); DEALLOCATE PREPARE p", R),  # proven in the same text
    ("PREPARE p AS SELECT 1; EXECUTE q", P),
    ("PREPARE p AS SELECT 1; CREATE TABLE x AS EXECUTE p", P),
    # --- multi-statement simple queries: a write if any statement writes
    ("SELECT 1; SELECT 2", R),
    ("SELECT 1; UPDATE t SET a = 1", P),
    ("UPDATE t SET a = 1; SELECT 1", P),
    ("SELECT 1; ; SELECT 2;", R),
    ("SELECT 1; SELECT pg_advisory_lock(1)", P),
    ("BEGIN; SELECT 1; COMMIT", R),
    ("BEGIN; UPDATE t SET a = 1; COMMIT", P),
    ("BEGIN; DECLARE c CURSOR FOR SELECT 1; FETCH ALL FROM c; CLOSE c; COMMIT", R),
    # --- quoting and comments: what looks like a write but is not code
    ("SELECT 'a;b'; SELECT 2", R),
    ("SELECT 'DELETE FROM t'", R),
    ("SELECT E'a\\';DELETE FROM t;'", R),
    ("SELECT $$ ; DELETE FROM t; $$", R),
    ("SELECT $tag$ ; DROP TABLE t; $tag$", R),
    ('SELECT "delete" FROM t', R),
    ("SELECT 1 -- ; DELETE FROM t", R),
    ("/* DELETE FROM t; */ SELECT 1", R),
    ("/* nested /* DELETE */ still a comment ; DROP TABLE t */ SELECT 1", R),
    ("select/**/1", R),
    ("SELECT 1; DELETE FROM t -- trailing comment", P),
    ("/* pypool: role=replica */ UPDATE t SET a = 1", P),  # the hint is the router's business
    # --- parse failures: primary, never the previous role
    ("SELEC 1", P),
    ("SELECT FROM WHERE", P),
    ("SELECT (1", P),
    ("SELECT 1 1", P),
    ("SELECT 'unterminated", P),
    ("UPDATE t SET a =", P),
    # --- transaction control
    ("BEGIN", N),
    ("START TRANSACTION", N),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ", N),
    ("BEGIN READ ONLY", N),
    ("BEGIN READ WRITE", N),
    ("COMMIT", N),
    ("ROLLBACK", N),
    ("SAVEPOINT s", N),
    ("ROLLBACK TO SAVEPOINT s", N),
    ("COMMIT PREPARED 'x'", P),
    ("PREPARE TRANSACTION 'x'", P),
    ("", N),
    ("-- only a comment", N),
]


def test_table_is_large_and_covers_both_roles():
    roles = [role for _, role in TABLE]
    assert len(TABLE) >= 60
    assert roles.count(R) >= 30 and roles.count(P) >= 60 and roles.count(N) >= 8
    assert len({sql for sql, _ in TABLE}) == len(TABLE), "duplicate rows"


@pytest.mark.parametrize("sql,expected", TABLE, ids=[s[:60] or "<empty>" for s, _ in TABLE])
def test_statement_role(sql, expected):
    assert role_of(sql) == expected, classify(sql)


@pytest.mark.parametrize("sql,expected", TABLE, ids=[s[:60] or "<empty>" for s, _ in TABLE])
def test_cache_classifies_like_the_classifier(sql, expected):
    # Twice: the second answer comes from the fingerprint cache and must agree.
    cache = ClassificationCache()
    assert cache.classify(sql) == classify(sql)
    assert cache.classify(sql) == classify(sql)


@pytest.mark.parametrize("sql,mode", [
    ("BEGIN", "default"),
    ("BEGIN WORK", "default"),
    ("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", "read only"),
    ("START TRANSACTION READ ONLY", "read only"),
    ("begin read write", "read write"),
    ("START TRANSACTION ISOLATION LEVEL READ COMMITTED READ WRITE", "read write"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", "serializable"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", "serializable"),
    ("start transaction read only isolation level serializable", "serializable"),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", "read only"),
])
def test_begin_modes(sql, mode):
    c = classify(sql)
    assert c.begin == mode and not c.has_statement and not c.writes


def test_transaction_end_and_session_flags():
    assert classify("COMMIT").ends_transaction and classify("END").ends_transaction
    assert classify("ABORT").ends_transaction and classify("ROLLBACK").ends_transaction
    assert not classify("ROLLBACK TO SAVEPOINT s").ends_transaction
    assert not classify("COMMIT AND CHAIN").ends_transaction  # the next transaction starts at once
    assert classify("SET search_path TO x").sets_session
    assert classify("RESET ALL").sets_session
    assert not classify("SET LOCAL search_path TO x").sets_session


def test_reason_names_the_first_writer():
    assert classify("SELECT 1; SELECT nextval('s'); DELETE FROM t").reason == "function nextval"
    assert classify("SELECT * FROM t FOR NO KEY UPDATE").reason == "for no key update"
    assert classify("SELECT a INTO b FROM t").reason == "select into"
    assert classify("SELEC 1").reason == "unknown statement"
    assert classify("SELECT (1").reason == "parse error"


# ------------------------------------------------------------- allow-list


def test_configured_functions_join_the_allow_list():
    functions = read_only_functions(["My_Func", "reporting.score", "  "])
    assert "my_func" in functions and "" not in functions
    assert role_of("SELECT my_func(1)", functions) == R
    assert role_of("SELECT MY_FUNC(1)", functions) == R  # unquoted names fold to lower case
    assert role_of('SELECT "My_Func"(1)', functions) == P  # a quoted name is exact
    assert role_of("SELECT reporting.score(a) FROM t", functions) == R
    assert role_of("SELECT other.score(a) FROM t", functions) == P
    assert role_of("SELECT my_func(1)") == P  # not without the configuration


@pytest.mark.parametrize("name", ["nextval", "setval", "pg_advisory_lock", "pg_try_advisory_xact_lock",
                                  "pg_notify", "set_config", "lo_unlink"])
def test_writers_cannot_be_allow_listed(name):
    functions = read_only_functions([name])
    assert role_of(f"SELECT {name}(1)", functions) == P


# ------------------------------------------------------------------ hints


@pytest.mark.parametrize("sql,hint", [
    ("/* pypool: role=primary */ SELECT 1", "primary"),
    ("/*pypool:role=replica*/ SELECT 1", "replica"),
    ("SELECT 1 /* pypool: ROLE = Primary */", "primary"),
    ("/* PYPOOL: role=primary */ SELECT 1", None),  # the marker is lower-case
    ("-- pypool: role=replica\nSELECT 1", "replica"),
    ("/* outer /* pypool: role=primary */ still comment */ SELECT 1", "primary"),
    ("SELECT '/* pypool: role=primary */'", None),  # inside a string: not a comment
    ('SELECT 1 AS "/* pypool: role=primary */"', None),
    ("SELECT $$ -- pypool: role=primary $$", None),
    ("/* pypool: role=standby */ SELECT 1", None),
    ("SELECT 1", None),
])
def test_role_hint(sql, hint):
    assert role_hint(sql) == hint


# ------------------------------------------------------------------ cache


@pytest.fixture
def parses(monkeypatch):
    """Counts real sqlglot parses (the parser still runs)."""
    calls: list[str] = []
    real = query_tree.DIALECT.parse

    def counting(text, *args, **kwargs):
        calls.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(query_tree.DIALECT, "parse", counting)
    return calls


def test_same_fingerprint_parses_once(parses):
    cache = ClassificationCache()
    texts = [f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}" for aid in range(1, 201)]
    texts += ["SELECT  abalance FROM pgbench_accounts\n WHERE aid = 7 -- comment",
              "SELECT abalance FROM pgbench_accounts WHERE aid = 7.5e3"]
    results = {cache.classify(t) for t in texts}
    assert len(parses) == 1, parses[:3]
    assert results == {classify(texts[0])} and not classify(texts[0]).writes
    assert cache.misses == 1 and cache.hits == len(texts) - 1


def test_different_literals_never_change_a_role(parses):
    cache = ClassificationCache()
    assert not cache.classify("SELECT * FROM t WHERE a = 'DELETE FROM t'").writes
    assert not cache.classify("SELECT * FROM t WHERE a = 'x'").writes
    assert cache.classify("SELECT * FROM t WHERE a = 'x' FOR UPDATE").writes
    assert len(parses) == 2  # two shapes, two parses


def test_hit_and_miss_counters():
    cache = ClassificationCache()
    for i in range(10):
        cache.classify(f"SELECT {i}")
    cache.classify("UPDATE t SET a = 1")
    cache.classify("UPDATE t SET a = 2")
    assert (cache.hits, cache.misses) == (10, 2)


def test_cache_is_bounded_and_evicts_least_recently_used(parses):
    cache = ClassificationCache(maxsize=8)
    shapes = [f"SELECT c{i} FROM t WHERE id = 1" for i in range(50)]
    for sql in shapes:
        cache.classify(sql)
    assert len(cache) <= 8
    assert len(parses) == 50
    parses.clear()
    cache.classify(shapes[-1])  # recent: still cached
    assert parses == []
    cache.classify(shapes[0])  # evicted long ago: parsed again
    assert len(parses) == 1
    with pytest.raises(ValueError):
        ClassificationCache(maxsize=0)


def test_recently_used_entries_survive_eviction(parses):
    cache = ClassificationCache(maxsize=4)
    hot = "SELECT hot FROM t WHERE id = 1"
    cache.classify(hot)
    for i in range(20):
        cache.classify(f"SELECT cold{i} FROM t WHERE id = 1")
        cache.classify(hot.replace("1", str(i + 2)))  # same fingerprint, keeps it fresh
    parses.clear()
    cache.classify(hot)
    assert parses == []


def test_over_long_query_goes_to_the_primary_without_parsing(parses):
    cache = ClassificationCache(max_length=100)
    long_read = "SELECT " + ", ".join(f"c{i}" for i in range(40)) + " FROM t"
    assert len(long_read) > 100
    assert cache.classify(long_read) is TOO_LONG and TOO_LONG.writes
    assert parses == [] and cache.hits == cache.misses == 0
    assert not cache.classify("SELECT 1").writes  # short texts still parse


@pytest.mark.parametrize("a,b", [
    ("SELECT * FROM t WHERE a = 1", "select * from t where a = 1"),  # case is kept: distinct keys
])
def test_fingerprint_keeps_keywords_verbatim(a, b):
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.parametrize("sql,expected", [
    ("SELECT * FROM t WHERE a = 1 AND b = 'x'", "SELECT * FROM t WHERE a = ? AND b = ?"),
    ("SELECT  *\n FROM t1 -- c\n WHERE a = $1", "SELECT * FROM t1 WHERE a = $1"),
    ("SELECT $$a;b$$, E'\\'', 1.5e3, 0x1F", "SELECT ?, ?, ?, ?"),
    ('SELECT "a1" FROM t WHERE x IN (1, 2)', 'SELECT "a1" FROM t WHERE x IN (?, ?)'),
])
def test_fingerprint_replaces_literals_only(sql, expected):
    assert fingerprint(sql) == expected


@pytest.mark.parametrize("closed,unclosed", [
    ("SELECT 1", "SELECT 'unterminated"),
    ("SELECT 'a'", "SELECT E'a\\'"),
    ("SELECT 1", "SELECT $$ unterminated"),
    ("SELECT 1", "SELECT 1 /* unterminated"),
    ("SELECT 1 /* a /* b */ c */", "SELECT 1 /* a /* b */ c"),
    ('SELECT "a" FROM t', 'SELECT "a FROM t'),
])
def test_unclosed_quote_or_comment_is_a_parse_failure_even_after_its_closed_twin(closed, unclosed):
    # The server refuses the unclosed text; it must not inherit the cached read of a
    # text that differs from it only in a literal.
    cache = ClassificationCache()
    assert not cache.classify(closed).writes
    c = cache.classify(unclosed)
    assert c.writes and c.reason == "parse error", c


_FRAGMENTS = ["SELECT ", "1", "2.5", " ", "\n", "'", "''", "E'", "\\", "$$", "$a$", "/*", "*/", "--",
              '"', ";", "x", "t", " FOR UPDATE", "DELETE FROM t", "nextval(", ")", "(", ",", "WITH q AS ",
              "UPDATE t SET a = ", "BEGIN", "COMMIT"]


@given(st.lists(st.lists(st.sampled_from(_FRAGMENTS), max_size=12).map("".join), min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_cached_answer_always_equals_a_fresh_classification(texts):
    cache = ClassificationCache()
    for text in texts + texts:
        assert cache.classify(text) == classify(text), text
