"""The calls the client session makes (``PoolCausal``), played as a session would, with fake servers."""

from __future__ import annotations

import asyncio

from pypool.causal.decide import Serve, UsePrimary
from pypool.causal.lsn import Position
from pypool.causal.pool_causal import PoolCausal


def first(candidates):
    return candidates[0]


class Cluster:
    """A primary whose insert position advances with each write, and replicas replaying at will."""

    def __init__(self) -> None:
        self.insert = 0x1000
        self.replay = {"r1": 0x1000, "r2": 0x1000}
        self.primary_down = False
        self.primary_asked = 0

    def write(self) -> list[str | None]:
        self.insert += 0x100
        position = [f"0/{self.insert:X}", str(self.insert)]
        return [*position, *position[:1], "000000010000000000000001", *position[1:], "8192", "on"]

    async def check(self, name: str) -> Position:
        await asyncio.sleep(0)
        return Position(1, self.replay[name])

    async def primary_position(self) -> Position:
        self.primary_asked += 1
        if self.primary_down:
            raise OSError("primary unreachable")
        return Position(1, self.insert)


def test_session_mode_the_writer_waits_its_own_write_others_do_not() -> None:
    async def go():
        cluster = Cluster()
        pool = PoolCausal("session", 1000, cluster.check, cluster.primary_position)
        writer, reader = pool.client(), pool.client()
        replicas = ["r1", "r2"]
        assert not pool.must_wait(writer, replicas) and not pool.must_wait(reader, replicas)
        ticket = pool.write_ended(writer)
        assert pool.must_wait(writer, replicas)  # pending: the reply went out before the position came back
        loop = asyncio.get_running_loop()
        loop.call_soon(ticket.learnt, cluster.write())
        loop.call_later(0.01, cluster.replay.__setitem__, "r2", 0x1100)
        decision = await pool.choose(writer, lambda: replicas, pick=first)
        still_behind = pool.must_wait(writer, replicas)  # r1 has not replayed it: choose again next time
        pool.positions.observe("r1", Position(1, 0x1100), loop.time())
        caught_up = pool.must_wait(writer, replicas)  # both have: the fast path again
        return decision, pool.must_wait(reader, replicas), str(writer), cluster.primary_asked, still_behind, caught_up

    decision, reader_waits, shown, primary_asked, still_behind, caught_up = asyncio.run(go())
    assert decision == Serve("r2") and primary_asked == 0
    assert still_behind and not caught_up
    assert not reader_waits
    assert shown == "0/1100 (timeline 1)"


def test_global_mode_every_client_waits_for_every_write() -> None:
    async def go():
        cluster = Cluster()
        pool = PoolCausal("global", 1000, cluster.check, cluster.primary_position)
        writer, reader = pool.client(), pool.client()
        ticket = pool.write_ended(writer)
        assert pool.must_wait(reader, ["r1", "r2"])  # a lookup in flight anywhere
        asyncio.get_running_loop().call_soon(ticket.learnt, cluster.write())
        cluster.replay["r1"] = 0x1100
        return await pool.choose(reader, lambda: ["r1", "r2"], pick=lambda c: c[-1])

    assert asyncio.run(go()) == Serve("r1")


def test_a_failed_lookup_asks_the_primary_and_else_reads_go_there() -> None:
    async def go():
        cluster = Cluster()
        pool = PoolCausal("session", 1000, cluster.check, cluster.primary_position)
        client = pool.client()
        cluster.write()
        cluster.replay["r1"] = 0x1100
        pool.write_ended(client).failed()
        learnt = await pool.choose(client, lambda: ["r1"], pick=first)
        required = client.required
        cluster.primary_down = True
        pool.write_ended(client).failed()
        fallback = await pool.choose(client, lambda: ["r1"], pick=first)
        await pool.close()
        return learnt, required, fallback

    learnt, required, fallback = asyncio.run(go())
    assert required == Position(1, 0x1100)  # the primary's position covers the write
    assert learnt == Serve("r1")
    assert isinstance(fallback, UsePrimary) and "could not be learnt" in fallback.reason


def test_off_gives_no_client_state_and_never_waits() -> None:
    async def go():
        cluster = Cluster()
        pool = PoolCausal("off", 1000, cluster.check, cluster.primary_position)
        return pool.client(), pool.must_wait(None, ["r1"])

    assert asyncio.run(go()) == (None, False)


def test_with_no_usable_replica_a_read_after_a_write_is_not_waved_through() -> None:
    """Every replica banned: the read must not take the fast path to whichever replica the bans clear."""
    async def go():
        cluster = Cluster()
        pool = PoolCausal("session", 20, cluster.check, cluster.primary_position)
        writer = pool.client()
        pool.write_ended(writer).learnt(cluster.write())
        waits = pool.must_wait(writer, [])
        with_primary = await pool.choose(writer, lambda: [], pick=first, primary="p")
        return waits, with_primary, pool.stats.at_once

    waits, with_primary, at_once = asyncio.run(go())
    assert waits and with_primary == Serve("p") and at_once == 0
