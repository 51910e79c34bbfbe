"""WAL positions: PostgreSQL's ``pg_lsn`` text ('16/B374D848') and the timeline it belongs to.

An LSN is a 64-bit byte offset into the WAL; its text form is the high and low
32 bits in hex, split by '/'. LSNs only order writes within one WAL history:
after a promotion the new primary continues on a new timeline, so a position
here is the pair (timeline, lsn). Ordering pairs by timeline first is what a
promotion does: every position of the new timeline comes after the switch.
"""

from __future__ import annotations

from typing import NamedTuple

_MAX_HALF = 0xFFFFFFFF


class Position(NamedTuple):
    """A point in one cluster's WAL history; tuples compare (timeline, lsn) in that order."""

    timeline: int
    lsn: int

    def __str__(self) -> str:
        return f"{format_lsn(self.lsn)} (timeline {self.timeline})"


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> its 64-bit value. ValueError for anything else."""
    high, sep, low = text.strip().partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise ValueError(f"not a pg_lsn: {text!r}")
    try:
        hi, lo = int(high, 16), int(low, 16)
    except ValueError:
        raise ValueError(f"not a pg_lsn: {text!r}") from None
    if hi < 0 or lo < 0 or "-" in text or "+" in text:
        raise ValueError(f"not a pg_lsn: {text!r}")
    return (hi << 32) | lo


def format_lsn(lsn: int) -> str:
    """64-bit value -> PostgreSQL's text form ('16/B374D848', upper-case, no padding)."""
    if not 0 <= lsn <= (_MAX_HALF << 32 | _MAX_HALF):
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & _MAX_HALF:X}"


def timeline_from_walfile(name: str) -> int:
    """The timeline in a WAL segment name ('00000002000000000000001F' -> 2), from pg_walfile_name()."""
    name = name.strip()
    if len(name) != 24:
        raise ValueError(f"not a WAL segment name: {name!r}")
    try:
        timeline = int(name[:8], 16)
    except ValueError:
        raise ValueError(f"not a WAL segment name: {name!r}") from None
    if timeline < 1:
        raise ValueError(f"not a WAL segment name: {name!r}")
    return timeline


def parse_position(lsn_text: str | None, timeline_text: str | None) -> Position | None:
    """A position from a query row (LSN text, timeline as digits or a WAL file name); None if unknown."""
    if lsn_text is None or timeline_text is None:
        return None
    timeline_text = timeline_text.strip()
    timeline = timeline_from_walfile(timeline_text) if len(timeline_text) == 24 else int(timeline_text)
    return Position(timeline, parse_lsn(lsn_text))


# WAL page headers (MAXALIGNed): the first page of a segment carries the long one.
SHORT_PAGE_HEADER = 24
LONG_PAGE_HEADER = 40


def record_end(lsn: int, segment_offset: int, block_size: int) -> int:
    """The end of the last WAL record, from an insert position (``pg_current_wal_insert_lsn()``).

    When the last record filled its page to the end, the insert position
    already points past the next page's header, where nothing is written
    yet; a replica that replayed everything reports the page boundary. The
    boundary is the position to wait for.
    """
    if segment_offset == LONG_PAGE_HEADER:
        return lsn - LONG_PAGE_HEADER
    if segment_offset >= block_size and segment_offset % block_size == SHORT_PAGE_HEADER:
        return lsn - SHORT_PAGE_HEADER
    return lsn


def lag_bytes(behind: Position | None, ahead: Position) -> int | None:
    """How many bytes of WAL ``behind`` still has to replay to reach ``ahead`` (None: not comparable)."""
    if behind is None or behind.timeline != ahead.timeline:
        return None
    return max(0, ahead.lsn - behind.lsn)


def describe_bytes(n: int) -> str:
    for unit, size in (("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
