"""pypool.process_signals in a child interpreter of its own (the signals go to that process, not pytest's)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_child(body: str) -> subprocess.CompletedProcess:
    script = "import os, signal\nfrom pypool import process_signals\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)


def test_deferred_signals_are_recorded_in_order_and_handed_over_once():
    out = run_child("""
        process_signals.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        print([s.name for s in process_signals.take_pending()], process_signals.take_pending())
    """)
    assert out.returncode == 0 and out.stdout.split("\n")[0] == "['SIGTERM', 'SIGHUP'] []", out


def test_restore_gives_a_recorded_signal_its_default_action():
    """`pypool config ...` after `python -m pypool` deferred the signals: a SIGTERM ends it as it would have."""
    out = run_child("""
        process_signals.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        process_signals.restore()
        print("still running")
    """)
    assert out.returncode == -15 and "still running" not in out.stdout, out
    out = run_child("""
        process_signals.defer()
        process_signals.restore()
        os.kill(os.getpid(), signal.SIGINT)
    """)
    assert out.returncode == -2 and "KeyboardInterrupt" in out.stderr, out


SENDER = """
import os, signal, sys, time
target = os.pidfd_open(int(sys.argv[1]))  # that process and no other, even once its pid is reused
signal.pidfd_send_signal(target, signal.SIGTERM)
print("sending", flush=True)
try:
    while True:
        signal.pidfd_send_signal(target, signal.SIGTERM)
        time.sleep(0.001)
except ProcessLookupError:
    pass
"""


def exit_status_under_sigterms(setup: str) -> subprocess.CompletedProcess:
    """``setup``, then SIGTERM after SIGTERM from another process until this one is gone."""
    return run_child(setup + f"""
import subprocess, sys
sender = subprocess.Popen([sys.executable, "-c", {SENDER!r}, str(os.getpid())],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
sender.stdout.readline()
import sqlglot  # a large heap: the interpreter's exit takes a while to free it
""")


def test_ignored_signals_leave_the_exit_status_alone_through_the_interpreters_exit():
    """The interpreter's exit puts the default action back for a Python handler (the window in which a
    late SIGTERM killed a stopped pypool), but not for SIG_IGN."""
    assert exit_status_under_sigterms("signal.signal(signal.SIGTERM, lambda *args: None)\n").returncode == -15
    out = exit_status_under_sigterms("process_signals.ignore()\n")
    assert out.returncode == 0, out
