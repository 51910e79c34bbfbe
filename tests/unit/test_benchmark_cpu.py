"""The benchmark's CPU figures: user and system time of a process tree."""

from __future__ import annotations

import os

from benchmarks.targets import cpu_time


def test_kernel_work_counts_as_system_time_and_python_work_as_user_time():
    before = cpu_time(os.getpid())
    buffer = bytearray(1 << 20)
    with open("/dev/zero", "rb", buffering=0) as zero:
        for _ in range(5_000):
            zero.readinto(buffer)  # the kernel fills 1 MiB each time
    middle = cpu_time(os.getpid())
    total = 0
    for i in range(3_000_000):
        total += i
    after = cpu_time(os.getpid())
    assert middle.system - before.system > middle.user - before.user
    assert after.user - middle.user > after.system - middle.system
    assert after.total == after.user + after.system

