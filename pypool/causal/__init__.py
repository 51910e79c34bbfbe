"""Causal reads: a read after a write runs only where that write is visible (issue 13).

``lsn``          pg_lsn text, positions (timeline, lsn)
``requirement``  what a read must see: one client's writes (session) or everyone's (global)
``shared``       the global commit positions shared by worker processes (mmap)
``positions``    what is known of each replica's replay position, and when it was learnt
``decide``       serve on this replica / check and wait / primary / error; no I/O
``stats``        counters for /metrics
"""

# True once the client session calls this package (turns on tests/integration/test_causal_reads.py).
WIRED = False
