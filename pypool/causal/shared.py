"""Commit positions shared by the worker processes of one pypool (``global`` causal reads).

The supervisor creates a small file in its private run directory before it
starts the workers; every worker maps it (``mmap``, MAP_SHARED: one page cache
copy, coherent between processes). The file holds one row per pool (claimed by
pool name under an ``flock``, the only lock here) and, in each row, one slot
per worker. A worker writes only its own slot, so no lock is needed to
update it: a sequence counter around each write (a seqlock) lets readers
retry the rare read that overlapped a write instead of seeing half of one.

Slot: seq, timeline, lsn, lookups started, all lookups below this ticket done.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct

from pypool.causal.lsn import Position

FILE_NAME = "causal-commits"
MAGIC = b"PYPCAUS1"
ROWS = 128  # pools with global causal reads per instance; more fall back to per-worker positions
_HEADER = struct.Struct("<8sII")  # magic, workers, rows
HEADER_SIZE = 64
KEY_SIZE = 32  # sha256 of the pool name
_SLOT = struct.Struct("<QQQQQ")  # seq, timeline, lsn, started, done_below
_SEQ = struct.Struct("<Q")
READ_TRIES = 10_000  # a write takes well under a microsecond; only a dead writer exhausts these
SLOT_SIZE = 48  # _SLOT.size (40) rounded up to 8-byte multiples with room for one more field


def table_path(rundir: str) -> str:
    return os.path.join(rundir, FILE_NAME)


def row_size(workers: int) -> int:
    return KEY_SIZE + SLOT_SIZE * workers


def create_table(path: str, workers: int, rows: int = ROWS) -> None:
    """The supervisor's part: an all-zero table for ``workers`` processes (mode 0600)."""
    size = HEADER_SIZE + rows * row_size(workers)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, _HEADER.pack(MAGIC, workers, rows), 0)
    finally:
        os.close(fd)


class TableFull(Exception):
    pass


class CommitTable:
    """One worker's view of the shared table."""

    def __init__(self, path: str, worker_index: int) -> None:
        self._fd = os.open(path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, size)
        magic, self.workers, self.rows = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or size < HEADER_SIZE + self.rows * row_size(self.workers):
            self.close()
            raise ValueError(f"{path} is not a pypool commit table")
        if not 0 <= worker_index < self.workers:
            self.close()
            raise ValueError(f"worker index {worker_index} outside 0..{self.workers - 1}")
        self.index = worker_index

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def slots(self, pool_name: str) -> "SharedSlots":
        """The row of ``pool_name`` (claimed if no worker did yet). TableFull past ROWS pools."""
        key = hashlib.sha256(pool_name.encode()).digest()
        size = row_size(self.workers)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for row in range(self.rows):
                offset = HEADER_SIZE + row * size
                stored = self._map[offset:offset + KEY_SIZE]
                if stored == key:
                    break
                if stored == bytes(KEY_SIZE):
                    self._map[offset:offset + KEY_SIZE] = key
                    break
            else:
                raise TableFull(f"more than {self.rows} pools use global causal reads")
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return SharedSlots(self._map, offset + KEY_SIZE, self.workers, self.index)


class SharedSlots:
    """A pool's row: this worker writes its slot, reads everyone's (``requirement.Slots``)."""

    def __init__(self, buffer: mmap.mmap, offset: int, workers: int, index: int) -> None:
        self._buf = buffer
        self._base = offset
        self._workers = workers
        self.index = index
        self._own = offset + index * SLOT_SIZE

    def initial(self) -> tuple[Position | None, int]:
        """What a predecessor of this worker left: lookups it started are never finished by anyone else."""
        position, started, _done = self._read(self._own)
        return position, started

    def publish(self, position: Position | None, started: int, done_below: int) -> None:
        buf, own = self._buf, self._own
        seq = _SEQ.unpack_from(buf, own)[0]
        _SEQ.pack_into(buf, own, seq + 1)  # odd: a write is under way
        timeline, lsn = position if position is not None else (0, 0)
        _SLOT.pack_into(buf, own, seq + 1, timeline, lsn, started, done_below)
        _SEQ.pack_into(buf, own, seq + 2)

    def _read(self, offset: int) -> tuple[Position | None, int, int]:
        buf = self._buf
        for _ in range(READ_TRIES):
            seq, timeline, lsn, started, done_below = _SLOT.unpack_from(buf, offset)
            if seq & 1 == 0 and _SEQ.unpack_from(buf, offset)[0] == seq:
                return (Position(timeline, lsn) if timeline else None), started, done_below
        # A writer killed half-way leaves the sequence odd: the slot holds nothing trustworthy.
        return None, 0, 0

    def read_all(self) -> list[tuple[Position | None, int, int]]:
        return [self._read(self._base + i * SLOT_SIZE) for i in range(self._workers)]
