"""The asyncio driver of causal reads with fake replicas: checks asked, answers waited for, counted."""

from __future__ import annotations

import asyncio

from pypool.causal.decide import Fail, Serve, UsePrimary
from pypool.causal.lsn import Position
from pypool.causal.requirement import CommitLog
from pypool.causal.wait import CausalReads


class FakeReplicas:
    """Replicas whose replay moves on by ``step`` bytes each time they are asked."""

    def __init__(self, positions: dict[str, int], step: int = 0) -> None:
        self.replay = dict(positions)
        self.step = step
        self.asked: list[str] = []
        self.in_flight: dict[str, int] = {name: 0 for name in positions}
        self.most_in_flight = 0

    async def check(self, name: str) -> Position:
        self.asked.append(name)
        self.in_flight[name] += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight[name])
        await asyncio.sleep(0)
        self.in_flight[name] -= 1
        self.replay[name] += self.step
        return Position(1, self.replay[name])


def first(candidates):
    return candidates[0]


def test_a_known_caught_up_replica_serves_without_a_check() -> None:
    async def go():
        fake = FakeReplicas({"r1": 100})
        reads = CausalReads(fake.check, timeout_ms=1000)
        reads.positions.observe("r1", Position(1, 100), 0.0)
        decision = await reads.choose(Position(1, 100), lambda: ["r1"], deadline=reads.deadline(), pick=first)
        return decision, fake.asked, reads.stats

    decision, asked, stats = asyncio.run(go())
    assert decision == Serve("r1") and asked == []
    assert (stats.at_once, stats.after_wait, sum(stats.wait_counts)) == (1, 0, 0)


def test_a_read_waits_for_the_replica_to_replay_its_write() -> None:
    async def go():
        fake = FakeReplicas({"r1": 0, "r2": 0}, step=10)
        reads = CausalReads(fake.check, timeout_ms=60_000)
        decisions = await asyncio.gather(*(reads.choose(Position(1, 100), lambda: ["r1", "r2"],
                                                        deadline=reads.deadline(), pick=first)
                                           for _ in range(20)))
        return decisions, fake, reads.stats

    decisions, fake, stats = asyncio.run(go())
    assert all(isinstance(d, Serve) and fake.replay[d.server] >= 100 for d in decisions)
    assert stats.after_wait == 20 and sum(stats.wait_counts) == 20
    # Twenty waiting reads share the checks: never two at once on one replica.
    assert fake.most_in_flight == 1
    assert len(fake.asked) < 20 * 10


def test_a_replica_that_never_catches_up_ends_in_an_error_naming_the_lag() -> None:
    async def go():
        fake = FakeReplicas({"r1": 0x100})
        reads = CausalReads(fake.check, timeout_ms=20)
        decision = await reads.choose(Position(1, 0x500), lambda: ["r1"], deadline=reads.deadline(), pick=first)
        return decision, reads.stats

    decision, stats = asyncio.run(go())
    assert isinstance(decision, Fail) and "r1 1.0 kB behind at 0/100" in decision.message
    assert stats.timed_out == 1


def test_a_failing_check_does_not_end_the_wait_and_the_primary_takes_reads_when_allowed() -> None:
    async def go():
        async def broken(name: str) -> Position:
            raise OSError("connection refused")

        reads = CausalReads(broken, timeout_ms=20)
        failed = await reads.choose(Position(1, 5), lambda: ["r1"], deadline=reads.deadline(), pick=first)
        primary = await reads.choose(Position(1, 5), lambda: ["r1"], deadline=reads.deadline(), pick=first,
                                     primary="p")
        for _ in range(100):  # the poller notices nobody waits any more at its next turn
            if not reads.polling:
                break
            await asyncio.sleep(0.01)
        return failed, primary, reads.stats, reads.polling

    failed, primary, stats, polling = asyncio.run(go())
    assert isinstance(failed, Fail) and "r1 position unknown" in failed.message
    assert primary == Serve("p") and stats.to_primary == 1
    assert polling == 0


def test_a_global_read_waits_for_a_commit_lookup_in_flight() -> None:
    async def go():
        log = CommitLog()
        reads = CausalReads(FakeReplicas({}).check, timeout_ms=1000)
        ticket = log.begin_lookup()
        _, barrier = log.read_barrier()
        loop = asyncio.get_running_loop()
        loop.call_soon(log.end_lookup, ticket, Position(1, 9))
        passed = await reads.wait_for_commits(lambda: log.barrier_passed(barrier), reads.deadline())
        stuck = log.begin_lookup()
        _, barrier = log.read_barrier()
        expired = await reads.wait_for_commits(lambda: log.barrier_passed(barrier), loop.time())
        log.end_lookup(stuck, None)
        return passed, expired, log.read_barrier()

    passed, expired, after = asyncio.run(go())
    assert passed and not expired
    assert after == (Position(1, 9), ())


def test_a_monitor_tick_makes_a_waiting_read_decide_again_with_the_servers_it_reports() -> None:
    """After a promotion: r1 (the old primary, down) has no position, r2 is on the old timeline. Once the
    monitor bans r1, the read goes to the new primary at once instead of waiting out its timeout."""
    async def go():
        async def down_or_old(name: str) -> Position:
            if name == "r1":
                raise OSError("connection refused")
            return Position(1, 0x900)

        reads = CausalReads(down_or_old, timeout_ms=60_000)
        reads.positions.observe_primary(Position(2, 0x1000))
        candidates = ["r1", "r2"]
        read = asyncio.ensure_future(reads.choose(Position(2, 0x1100), lambda: candidates,
                                                  deadline=reads.deadline(), pick=first))
        await asyncio.sleep(0.05)
        waiting = not read.done()
        candidates.remove("r1")  # the monitor banned it ...
        reads.notify()  # ... and reported the tick
        decision = await asyncio.wait_for(read, 1)
        await reads.close()
        return waiting, decision

    waiting, decision = asyncio.run(go())
    assert waiting, "r1's position is unknown: the read cannot tell yet that no replica can serve it"
    assert isinstance(decision, UsePrimary)
