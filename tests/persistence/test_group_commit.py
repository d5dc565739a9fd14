"""Group commit with the real reactor and the store's own fsync thread."""
from __future__ import annotations

import os
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from mqttd.persistence import store_from_spec

from .storehelpers import outbound, session

DURABLE = ["file", "dbm"]


class GatedFsync:
    """An fsync that blocks until the test opens the gate; counts calls."""

    def __init__(self):
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.armed = False     # open() fsyncs too; gate only what follows

    def __call__(self, fd):
        if not self.armed:
            return os.fsync(fd)
        self.calls += 1
        self.entered.set()
        if not self.gate.wait(10):
            raise RuntimeError("gate never opened")
        os.fsync(fd)


def make(kind, tmp_path, **options):
    return store_from_spec(f"{kind}:{tmp_path / 'data'}", reactor, **options)


def gated(kind, tmp_path):
    """An opened ``kind`` store whose fsyncs block on a :class:`GatedFsync` from
    now on: ``(store, fsync)``."""
    fsync = GatedFsync()
    store = make(kind, tmp_path, fsync_function=fsync)
    store.open()
    fsync.armed = True
    return store, fsync


def turn(seconds=0.02):
    return task.deferLater(reactor, seconds, lambda: None)


@pytest.mark.parametrize("kind", DURABLE)
@pytest_twisted.inlineCallbacks
def test_sync_fires_only_after_fsync_returns(kind, tmp_path):
    """An acknowledgement waiting on sync() cannot overtake the fsync."""
    store, fsync = gated(kind, tmp_path)
    try:
        store.write(session())
        d = store.sync()
        yield turn()
        assert fsync.entered.is_set()
        assert not d.called
        fsync.gate.set()
        yield d
    finally:
        fsync.gate.set()
        yield store.close()


@pytest.mark.parametrize("kind", DURABLE)
@pytest_twisted.inlineCallbacks
def test_sync_requested_during_an_fsync_waits_for_the_next_one(kind, tmp_path):
    """Bytes written after an fsync started are not covered by it."""
    store, fsync = gated(kind, tmp_path)
    try:
        store.write(session())
        first = store.sync()
        yield turn()                      # first fsync is now blocked in the thread
        store.write(outbound(seq=1))
        second = store.sync()
        fsync.gate.set()
        yield first
        rounds = store.fsync_count
        assert rounds == 1
        yield second
        assert store.fsync_count == 2
    finally:
        fsync.gate.set()
        yield store.close()


@pytest.mark.parametrize("kind", DURABLE)
@pytest_twisted.inlineCallbacks
def test_thousands_of_syncs_coalesce_into_few_fsyncs(kind, tmp_path):
    """Group commit: one fsync serves every sync request of a batch, in request order."""
    store = make(kind, tmp_path)
    store.open()
    fired = []
    try:
        store.write(session())
        pending = []
        for burst in range(5):
            for i in range(200):
                seq = burst * 200 + i
                store.write(outbound(seq=seq))
                pending.append(store.sync().addCallback(lambda _, s=seq: fired.append(s)))
            yield turn(0)
        for d in pending:
            yield d
        assert fired == list(range(1000))
        assert store.fsync_count <= 10
    finally:
        yield store.close()


@pytest.mark.parametrize("kind", DURABLE)
@pytest_twisted.inlineCallbacks
def test_background_compaction_keeps_serving_syncs(kind, tmp_path):
    """Writes and syncs carry on while a checkpoint is written in the thread pool."""
    store = make(kind, tmp_path, compact_bytes=20_000)
    store.open()
    try:
        store.write(session())
        for seq in range(1500):
            store.write(outbound(seq=seq))
            if seq % 50 == 0:
                yield store.sync()
        yield store.sync()
        assert store.compaction_count >= 1
    finally:
        yield store.close()
    store = make(kind, tmp_path)
    state = store.open()
    assert list(state.sessions["c1"].outbound) == list(range(1500))
    yield store.close()


@pytest.mark.skipif(not hasattr(os, "fdatasync"), reason="the OS has no fdatasync")
@pytest.mark.parametrize("kind", DURABLE)
@pytest_twisted.inlineCallbacks
def test_journal_appends_are_made_durable_with_fdatasync(kind, tmp_path, monkeypatch):
    """A sync() after writes waits for an fdatasync of the journal: its data and size
    reach the disk, for less than an fsync costs (the directory still gets fsync)."""
    calls = []

    def recorder(name, real):
        def call(fd):
            calls.append((name, os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
                          if os.path.exists(f"/proc/self/fd/{fd}") else fd))
            return real(fd)
        return call

    monkeypatch.setattr(os, "fdatasync", recorder("fdatasync", os.fdatasync))
    monkeypatch.setattr(os, "fsync", recorder("fsync", os.fsync))
    store = make(kind, tmp_path)
    store.open()
    try:
        del calls[:]
        store.write(session())
        yield store.sync()
        journals = [target for name, target in calls if str(target).startswith("journal.")]
        assert journals, calls
        assert all(name == "fdatasync" for name, target in calls
                   if str(target).startswith("journal.")), calls
        assert store.fsync_count == 1
    finally:
        yield store.close()
