"""Causal reads: a read after a write runs only where that write is visible (issue 13).

``lsn``          pg_lsn text, positions (timeline, lsn), a commit's record end
``requirement``  what a read must see: one client's writes (session) or everyone's (global)
``shared``       the global commit positions shared by worker processes (mmap, seqlock slots)
``positions``    what is known of each replica's replay position, and when it was learnt
``decide``       serve on this replica / check and wait / primary / error; no I/O
``wait``         runs the checks ``decide`` asks for (asyncio) and counts outcomes
``pool_causal``  ``PoolCausal``: the calls the client session makes, in order
``stats``        counters and the wait histogram for /metrics

Wiring (one ``PoolCausal`` per PoolGroup, built from the pool's ``causal_reads``
and ``causal_reads_timeout``; in ``global`` mode one ``CommitLog`` per pool shard,
``CommitLog(worker.commit_slots(name))`` under workers, shared by that shard's
groups; a sharded pool's client keeps one ``ClientCausal`` per shard, since each
shard's primary has its own WAL):

* the group passes ``causal.positions`` to each ServerMonitor it starts, gives
  ``check`` = that replica's ``monitor.check_position()`` and
  ``primary_position`` = the primary monitor's, and calls
  ``causal.reads.notify()`` from ``health_result``;
* a client gets ``causal.client()`` at login in ``global`` mode, with its
  first write in ``session`` mode (never: off, or a session pool), so reads of
  a client that never wrote cost one attribute test;
* when a transaction on the primary ends and it was not read-only:
  ``ticket = causal.write_ended(c)`` as the server's ReadyForQuery 'I' is seen,
  *before* it is written to the client (else, with workers, the client's next
  read on another connection can reach another worker before the lookup is
  published: measured, 3 stale reads in 1,000); once the reply is written,
  detach the server, send ``requirement.COMMIT_POSITION_QUERY`` on it, then
  ``ticket.learnt(row)`` (or ``ticket.failed()`` on an error) and check it in. The client is never held for this; its next write
  goes ahead at once, its next read waits for the answer only if it comes first;
* before a read takes a replica: ``causal.must_wait(c, candidates)`` (False:
  the fast path, unchanged); True: in the checkout coroutine,
  ``await causal.choose(c, lambda: candidates, pick=balancer.pick,
  primary=<primary pool if the role is "any" else None>)`` -> ``Serve(pool)``
  (check out there), ``UsePrimary`` (check out the primary), ``Fail`` (an
  ErrorResponse with its SQLSTATE and message), None (route as ever).
"""

# The client session calls this package (turns on the mode tests of tests/integration/test_causal_reads.py).
WIRED = True
