"""Failure injection for the failure-propagation tests: `DIST_RESHARD_FAULT=RANK:POINT:ACTION`.

POINT is `allocate`, `read`, `exchange` (before the all-to-all), `unpack` (after it), `write` (after the rank's first file) or `publish` (every file written, before
the output is published); RANK is a rank or `*` (every rank); ACTION is `raise` (an unexpected exception),
`kill` (SIGKILL, as an OOM killer would), `hang` (stop responding) or `pause` (say so on stderr, then wait
5 s: time for a test to act at that point). Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def maybe_fail(rank: int, point: str) -> None:
    spec = os.environ.get("DIST_RESHARD_FAULT")
    if not spec:
        return
    want_rank, want_point, action = spec.split(":")
    if (want_rank != "*" and int(want_rank) != rank) or want_point != point:
        return
    if action == "raise":
        raise RuntimeError(f"injected fault at {point}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "pause":
        sys.stderr.write(f"dist_reshard: fault: rank {rank} pausing at {point}\n")
        sys.stderr.flush()
        time.sleep(5)
    if action == "hang":
        time.sleep(3600)
