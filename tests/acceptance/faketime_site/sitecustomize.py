"""Make ``time.sleep`` work in a Python process started under libfaketime.

Only processes that a test starts under libfaketime load this: their PYTHONPATH begins with this
directory. With ``FAKETIME_DONT_FAKE_MONOTONIC=1``, libfaketime 0.9.10 (Debian 12) shifts the
absolute CLOCK_MONOTONIC deadline of ``clock_nanosleep(TIMER_ABSTIME)`` as if it were a fake wall
time, the kernel rejects it, and ``time.sleep`` (which uses that call since Python 3.11) raises
``OSError(EINVAL)`` for any duration (wolfcw/libfaketime#426). Faking the monotonic clock instead
hangs every threading wait with a timeout. So when the probe below fails, sleeping waits in
``select()``, which libfaketime passes through unchanged and which, like ``time.sleep``, resumes
after a signal and lets a signal handler's exception through.
"""

from __future__ import annotations

import select
import time


def _select_sleep(seconds: float) -> None:
    select.select([], [], [], seconds)


try:
    time.sleep(0)
except OSError:
    time.sleep = _select_sleep
