"""The durable store is the broker user's only: data directory 0700, files 0600, whatever the
umask (REVIEW-SEC2 N18: queued and retained payloads were world-readable, 0644/0755)."""
from __future__ import annotations

import os
import stat

import pytest

from mqttd.persistence.records import PutRetained

from .storehelpers import message, outbound, result_of, session


@pytest.fixture
def open_umask():
    old = os.umask(0o022)          # the common default: files 0644, directories 0755
    yield
    os.umask(old)


def _modes(path):
    return {name: stat.S_IMODE(os.lstat(os.path.join(path, name)).st_mode)
            for name in os.listdir(path)}


def test_store_directory_and_every_file_are_owner_only(durable_backend, open_umask):
    """Journal, checkpoint, CURRENT and LOCK files 0600 in a 0700 directory, across a reopen."""
    store = durable_backend()
    store.open()
    ops = [session(), outbound(seq=1), PutRetained(message("r/1", b"CONFIDENTIAL"))]
    durable_backend.write_all(store, ops)
    store, _state = durable_backend.reopen(store)       # writes a checkpoint
    durable_backend.write_all(store, [outbound(seq=2)])
    result_of(store.close())
    assert stat.S_IMODE(os.stat(durable_backend.path).st_mode) == 0o700
    modes = _modes(durable_backend.path)
    assert len(modes) >= 2, modes  # LOCK and the checkpoint at least
    assert all(mode == 0o600 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}


def test_files_an_older_version_left_readable_are_made_owner_only(durable_backend, open_umask,
                                                                  log_events):
    """An existing 0755 directory with 0644 files: the files become 0600 and the directory's mode
    is warned about (left to the operator)."""
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, [session(), PutRetained(message("r/1"))])
    result_of(store.close())
    os.chmod(durable_backend.path, 0o755)
    for name in os.listdir(durable_backend.path):
        os.chmod(os.path.join(durable_backend.path, name), 0o644)
    store = durable_backend()
    store.open()
    result_of(store.close())
    assert all(mode & 0o077 == 0 for mode in _modes(durable_backend.path).values())
    text = " ".join(str(e.get("log_format", "")) for e in log_events)
    assert "made owner-only" in text and "accessible to other users" in text
