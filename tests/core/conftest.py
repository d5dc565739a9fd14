"""Fixtures of the core tests."""
import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture
def log_events():
    """Every twisted.logger event emitted during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
