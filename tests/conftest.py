"""Suite-wide test settings.

Hypothesis: the ``mqttd`` profile is loaded for every test.  ``deadline=None``:
a property test's example is never failed for taking longer than 200 ms, which
on a loaded 2-core CI machine (several suites at once, PyPy warming up) says
nothing about the code; pytest-timeout still bounds every test (setup.cfg).
``max_examples`` stays bounded (100; a test that wants more or fewer says so
in its own ``@settings``), and the ``too_slow`` health check, which fails a
slow *generator* under load, is off.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

settings.register_profile(
    "mqttd", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mqttd")


@pytest.fixture
def log_events():
    """Every twisted.logger event emitted during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
