"""Failure injection for the failure-propagation tests: `DIST_RESHARD_FAULT=RANK:POINT:ACTION`.

POINT is `read`, `exchange` or `write` (after the rank's first file); ACTION is `raise` (an unexpected
exception), `kill` (SIGKILL, as an OOM killer would) or `hang` (stop responding). Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal
import time


def maybe_fail(rank: int, point: str) -> None:
    spec = os.environ.get("DIST_RESHARD_FAULT")
    if not spec:
        return
    want_rank, want_point, action = spec.split(":")
    if int(want_rank) != rank or want_point != point:
        return
    if action == "raise":
        raise RuntimeError(f"injected fault at {point}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        time.sleep(3600)
