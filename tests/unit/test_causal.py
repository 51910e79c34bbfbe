"""Causal reads without sockets: LSNs, the replica position table, the decision, requirements, shared slots."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pypool import sqlstates
from pypool.causal import shared
from pypool.causal.decide import Fail, Serve, UsePrimary, Wait, decide
from pypool.causal.lsn import (Position, format_lsn, parse_lsn, parse_position, record_end,
                               timeline_from_walfile)
from pypool.causal.positions import RECHECK_INTERVAL, ReplicaPositions
from pypool.causal.requirement import ClientCausal, CommitLog, parse_commit_row
from pypool.causal.stats import CausalStats


# ------------------------------------------------------------------- LSN text


@pytest.mark.parametrize("text, value", [("0/0", 0), ("16/B374D848", 0x16B374D848), ("0/1F6D2FB0", 0x1F6D2FB0),
                                         ("FFFFFFFF/FFFFFFFF", 2**64 - 1), ("a/b", 0xA0000000B)])
def test_lsn_text_round_trips_as_postgresql_prints_it(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text.upper()


@pytest.mark.parametrize("text", ["", "0", "/1", "1/", "x/1", "1/2/3", "123456789/0", "-1/0", "1/+2"])
def test_malformed_lsn_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)


def test_lsn_order_is_numeric_not_textual() -> None:
    assert parse_lsn("0/A0000000") > parse_lsn("0/9FFFFFFF")
    assert parse_lsn("1/0") > parse_lsn("0/FFFFFFFF")


def test_timeline_comes_from_the_wal_file_name_and_orders_first() -> None:
    assert timeline_from_walfile("00000002000000000000001F") == 2
    assert parse_position("0/5", "0000000A0000000000000000") == Position(10, 5)
    assert parse_position("0/5", "3") == Position(3, 5)
    assert parse_position(None, "1") is None
    assert Position(2, 0) > Position(1, 2**40)  # a promotion moves every later write after the switch
    with pytest.raises(ValueError):
        timeline_from_walfile("0000000Z000000000000001F")
    assert commit_row(0x3000060, 0x3000040) == Position(1, 0x3000040)  # flushed before the reply: flush position
    assert commit_row(0x3000060, 0x3000040, "off") == Position(1, 0x3000060)  # asynchronous: insert position
    assert commit_row(0x3000060, 0x3000040, "on", asynchronous=True) == Position(1, 0x3000060)  # SET LOCAL off
    assert commit_row(0x3000060, 0x3000040, "remote_apply") == Position(1, 0x3000040)
    with pytest.raises(ValueError):
        parse_commit_row(["0/3000060", None, "0/3000060", "000000010000000000000003", "96", "8192", "on"])


def commit_row(insert: int, flush: int, synchronous_commit: str = "on", asynchronous: bool = False) -> Position:
    segment = 16 << 20
    return parse_commit_row([format_lsn(insert), str(insert % segment), format_lsn(flush),
                             "000000010000000000000003", str(flush % segment), "8192", synchronous_commit],
                            asynchronous)


@pytest.mark.parametrize("lsn, offset, expected", [
    (0x3002018, 0x2018, 0x3002000),  # just past a page header: the last record ended at the page's start
    (0x3000028, 0x28, 0x3000000),  # just past a segment's first (long) header
    (0x3000018, 0x18, 0x3000018),  # 24 bytes into a segment's first page: record data, not a header
    (0x3002019, 0x2019, 0x3002019),
    (0x3002030, 0x2030, 0x3002030),
])
def test_a_commit_position_is_where_a_replica_that_replayed_it_stands(lsn, offset, expected) -> None:
    assert record_end(lsn, offset, 8192) == expected
    assert commit_row(lsn, lsn).lsn == expected
    assert commit_row(lsn, 0, "off").lsn == expected


# ----------------------------------------------------------------- the decision


def first(candidates):
    return candidates[0]


def make(**known: Position | None) -> ReplicaPositions[str]:
    table: ReplicaPositions[str] = ReplicaPositions()
    for name, position in known.items():
        table.observe(name, position, now=0.0)
    table.observe_primary(Position(1, 0))
    return table


def ask(table, required, replicas=("r1", "r2"), now=0.0, deadline=1.0, primary=None, pick=first):
    return decide(required, list(replicas), table, now=now, deadline=deadline, timeout_ms=1000, pick=pick,
                  primary=primary)


def test_a_replica_known_past_the_write_serves_at_once() -> None:
    table = make(r1=Position(1, 100), r2=Position(1, 300))
    assert ask(table, Position(1, 200)) == Serve("r2")
    assert ask(table, Position(1, 300)) == Serve("r2")  # replayed exactly up to the commit's end: enough


def test_choice_among_caught_up_replicas_is_the_balancers() -> None:
    table = make(r1=Position(1, 500), r2=Position(1, 300), r3=Position(1, 100))
    seen = []

    def pick(candidates):
        seen.append(list(candidates))
        return candidates[-1]

    assert ask(table, Position(1, 200), replicas=("r1", "r2", "r3"), pick=pick) == Serve("r2")
    assert seen == [["r1", "r2"]]


def test_no_replica_caught_up_means_check_them_and_wait() -> None:
    table = make(r1=Position(1, 100), r2=None)
    decision = ask(table, Position(1, 200), now=0.01)
    assert decision == Wait(("r1", "r2"), until=1.0)
    for r in decision.check:
        table.check_started(r, now=0.01)
    # Checks in flight: nobody is asked twice; their answers (or the deadline) wake the read.
    assert ask(table, Position(1, 200), now=0.011) == Wait((), until=1.0)
    table.observe("r1", Position(1, 150), now=0.012)
    assert ask(table, Position(1, 200), now=0.012) == Wait((), until=0.012 + RECHECK_INTERVAL)
    assert ask(table, Position(1, 200), now=0.012 + RECHECK_INTERVAL) == Wait(("r1",), until=1.0)
    table.observe("r1", Position(1, 250), now=0.02)
    assert ask(table, Position(1, 200), now=0.02) == Serve("r1")


def test_deadline_without_primary_reads_fails_naming_the_lag() -> None:
    table = make(r1=Position(1, 0x1000), r2=None)
    decision = ask(table, Position(1, 0x1800), now=1.0, deadline=1.0)
    assert isinstance(decision, Fail)
    assert decision.sqlstate == sqlstates.QUERY_CANCELED
    assert "0/1800" in decision.message and "r1 2.0 kB behind at 0/1000" in decision.message
    assert "r2 position unknown" in decision.message and "1000 ms" in decision.message


def test_with_primary_reads_the_primary_is_always_caught_up_and_shares_the_load() -> None:
    table = make(r1=Position(1, 100), r2=Position(1, 300))
    assert ask(table, Position(1, 200), primary="p", pick=lambda c: c) == Serve(["r2", "p"])
    assert ask(table, Position(1, 400), primary="p") == Serve("p")  # nobody else: no wait at all


def test_after_a_promotion_reads_use_the_primary_until_a_replica_follows() -> None:
    table = make(r1=Position(1, 900), r2=Position(1, 900))
    table.observe_primary(Position(2, 1000))  # promoted: timeline 2 starts around 1000
    # A write from before the promotion must now be seen on timeline 2 past where it began.
    assert table.normalize(Position(1, 800)) == Position(2, 1000)
    assert ask(table, Position(1, 800)) == UsePrimary(
        "every replica is on another timeline than 0/3E8 (timeline 2) (after a promotion)")
    table.observe("r1", Position(2, 999), now=0.5)
    assert isinstance(ask(table, Position(1, 800), now=0.5), Wait)
    table.observe("r1", Position(2, 1000), now=0.6)
    assert ask(table, Position(1, 800), now=0.6) == Serve("r1")


def test_a_stuck_check_no_longer_blocks_the_next_after_a_while() -> None:
    table = make(r1=Position(1, 0))
    table.check_started("r1", now=0.0)
    assert not table.needs_check("r1", now=0.5)
    assert table.needs_check("r1", now=5.0)
    table.check_failed("r1", now=5.0)
    assert not table.needs_check("r1", now=5.0)
    assert table.needs_check("r1", now=5.0 + 2 * RECHECK_INTERVAL)


def test_no_usable_replica_waits_and_fails_rather_than_reading_stale() -> None:
    table = make()
    assert ask(table, Position(1, 1), replicas=(), now=0.0) == Wait((), until=1.0)
    decision = ask(table, Position(1, 1), replicas=(), now=1.0)
    assert isinstance(decision, Fail) and "no replica is usable" in decision.message


# ------------------------------------------------------------------ requirements


def test_a_client_requires_its_highest_write_and_waits_while_one_is_pending() -> None:
    client = ClientCausal()
    assert client.required is None and str(client) == ""
    client.begin_lookup()
    assert client.pending and str(client) == "pending"
    client.end_lookup(Position(1, 500))
    client.begin_lookup()
    client.end_lookup(Position(1, 300))  # answers may arrive out of order
    assert client.required == Position(1, 500) and not client.pending
    client.begin_lookup()
    client.end_lookup(None)  # nobody could say where that write ended: primary until a later one is known
    assert client.unknown and str(client) == "unknown (primary)" and not client.pending
    client.begin_lookup()
    client.end_lookup(Position(1, 800))
    assert not client.unknown and client.required == Position(1, 800)


def test_a_global_read_waits_for_lookups_in_flight_when_it_began() -> None:
    log = CommitLog()
    assert log.read_barrier() == (None, ())
    a = log.begin_lookup()
    b = log.begin_lookup()
    position, barrier = log.read_barrier()
    assert position is None and barrier
    log.end_lookup(b, Position(1, 700))
    assert not log.barrier_passed(barrier)  # ``a`` is still out
    c = log.begin_lookup()  # began after the read: not waited for
    log.end_lookup(a, Position(1, 600))
    assert log.barrier_passed(barrier)
    assert log.read_barrier() == (Position(1, 700), ((0, 3),))
    log.end_lookup(c, None)
    assert log.read_barrier() == (Position(1, 700), ())


def test_wait_histogram_buckets() -> None:
    stats = CausalStats()
    for seconds in (0.0005, 0.2, 7.0):
        stats.observe_wait(seconds)
    assert sum(stats.wait_counts) == 3
    assert stats.wait_counts[0] == 1 and stats.wait_counts[5] == 1 and stats.wait_counts[-1] == 1


# -------------------------------------------------------- shared across processes


def test_shared_slots_combine_workers_and_a_restart_resumes(tmp_path) -> None:
    path = str(tmp_path / shared.FILE_NAME)
    shared.create_table(path, workers=2)
    w0, w1 = shared.CommitTable(path, 0), shared.CommitTable(path, 1)
    log0, log1 = CommitLog(w0.slots("app")), CommitLog(w1.slots("app"))
    other = CommitLog(w1.slots("other"))  # another pool, another cluster: never mixed in
    other.end_lookup(other.begin_lookup(), Position(9, 9))
    t = log0.begin_lookup()
    position, barrier = log1.read_barrier()
    assert position is None and barrier == ((0, 1),)
    log0.end_lookup(t, Position(1, 42))
    assert log1.barrier_passed(barrier)
    assert log1.read_barrier() == (Position(1, 42), ())
    log0.begin_lookup()  # worker 0 dies with this lookup in flight
    w0.close()
    restarted = CommitLog(shared.CommitTable(path, 0).slots("app"))
    assert restarted.position == Position(1, 42)
    assert log1.read_barrier() == (Position(1, 42), ())


def test_shared_table_between_two_real_processes(tmp_path) -> None:
    """Two interpreters, as the supervisor starts workers: each sees the other's commits, none torn."""
    path = str(tmp_path / shared.FILE_NAME)
    shared.create_table(path, workers=2)
    script = textwrap.dedent("""
        import sys
        from pypool.causal import shared
        from pypool.causal.lsn import Position
        from pypool.causal.requirement import CommitLog
        index, count = int(sys.argv[2]), int(sys.argv[3])
        log = CommitLog(shared.CommitTable(sys.argv[1], index).slots("app"))
        peer_seen = 0
        for i in range(1, count + 1):
            ticket = log.begin_lookup()
            log.end_lookup(ticket, Position(1, i * 2 + index))  # worker 0 even, worker 1 odd LSNs
            position, _ = log.read_barrier()
            assert position.timeline == 1 and position.lsn >= i * 2 + index, position  # never torn, never back
        print(log.read_barrier()[0].lsn)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", script, path, str(i), "5000"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    final = CommitLog(shared.CommitTable(path, 0).slots("app")).read_barrier()
    assert final == (Position(1, 10001), ())
    assert max(int(out) for out, _ in outs) == 10001
