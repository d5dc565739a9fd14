"""Bounded waits of the cluster tests that drive real processes from threads."""
from __future__ import annotations

import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it is true; after
    ``timeout`` seconds raise AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
