"""Capture of twisted.logger events inside a block, for tests that count log lines."""
from __future__ import annotations

import contextlib
from typing import Iterator, List

from twisted.logger import LogLevel, globalLogPublisher


@contextlib.contextmanager
def logged(min_level: LogLevel = LogLevel.debug) -> Iterator[List[dict]]:
    """The events of ``min_level`` or above published while the block runs (a
    list, filled as they come); the observer is removed even if the block fails
    (``twisted.logger.capturedLogs`` leaves it on)."""
    events: List[dict] = []

    def observe(event):
        if event["log_level"] >= min_level:
            events.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)
