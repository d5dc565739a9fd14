"""Fixtures for the store tests: one per backend family, and log capture."""
from __future__ import annotations

import pytest

from .storehelpers import BACKENDS, DURABLE, StoreMaker


@pytest.fixture(params=BACKENDS)
def any_backend(request, tmp_path):
    return StoreMaker(request.param, str(tmp_path / "data"))


@pytest.fixture(params=DURABLE)
def durable_backend(request, tmp_path):
    return StoreMaker(request.param, str(tmp_path / "data"))


