"""Disk full: no false acknowledgement, nothing acknowledged lost, recovery without a restart."""
from __future__ import annotations

import errno
import os

import pytest
from twisted.logger import LogLevel

from mqttd.persistence.journal import StoreUnavailable

from .storehelpers import (
    abandon, events_at, outbound, reference_state, result_of, session)


class FaultyDisk:
    """os.write / os.fsync that fail with ENOSPC while ``full`` (optionally after a partial write)."""

    def __init__(self):
        self.full = False
        self.partial = False
        self.fsync_only = False
        self.refused = 0

    def write(self, fd, data):
        if self.full and not self.fsync_only:
            self.refused += 1
            if self.partial and len(data) > 8:
                self.partial = False
                return os.write(fd, bytes(data[:8]))     # half a record, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def fsync(self, fd):
        if self.full:
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)


def faulty_store(backend, disk, **options):
    store = backend(write_function=disk.write, fsync_function=disk.fsync, **options)
    store.open()
    return store


def failed(d):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0].value if hasattr(results[0], "value") else None


@pytest.mark.parametrize("how", ["write", "partial write", "fsync"])
def test_full_disk_refuses_syncs_then_recovers_by_itself(durable_backend, log_events, how):
    """ENOSPC: every sync fails (no false ack), one ERROR; space back: recovers, one INFO."""
    disk = FaultyDisk()
    clock = durable_backend.reactor
    store = faulty_store(durable_backend, disk)
    acked = [session("c1"), outbound("c1", 1)]
    durable_backend.write_all(store, acked)             # acknowledged before the disk fills
    disk.full = True
    disk.partial = how == "partial write"
    disk.fsync_only = how == "fsync"
    during = []
    for i in range(2, 12):
        op = outbound("c1", i)
        store.write(op)
        during.append(op)
        error = failed(store.sync())
        assert isinstance(error, StoreUnavailable) and error.errno == errno.ENOSPC
        assert isinstance(store.failure, StoreUnavailable)
    clock.advance(0.5)
    clock.advance(1.0)
    clock.advance(2.0)                                  # backoff: 0.5, 1, 2, ...
    assert store.failure is not None
    errors = events_at(log_events, LogLevel.error)
    assert len(errors) == 1 and errors[0]["errno"] == errno.ENOSPC
    disk.full = False
    clock.advance(4.0)                                  # the next retry succeeds
    assert store.failure is None and store.recovery_count == 1
    infos = [e for e in events_at(log_events, LogLevel.info)
             if "writes again" in e.get("log_format", "")]
    assert len(infos) == 1 and infos[0]["refused"] == 10
    after = [outbound("c1", 20)]
    durable_backend.write_all(store, after)             # acknowledged again
    abandon(store)                                      # a crash now loses nothing
    log_events.clear()
    reopened = durable_backend()
    state = reopened.open()
    assert state == reference_state(acked + during + after)
    assert not events_at(log_events, LogLevel.error)    # no damage left behind
    result_of(reopened.close())


def test_retries_back_off_and_log_nothing_more(durable_backend, log_events):
    """While the disk stays full, retries double their delay up to RETRY_MAX, silently."""
    disk = FaultyDisk()
    clock = durable_backend.reactor
    store = faulty_store(durable_backend, disk)
    disk.full = True
    store.write(session("c1"))
    failed(store.sync())
    attempts = []
    for _ in range(12):
        before = disk.refused
        clock.advance(store._retry_delay)
        attempts.append(disk.refused > before)
    assert all(attempts)
    assert store._retry_delay == store.RETRY_MAX
    assert len(events_at(log_events, LogLevel.error)) == 1
    assert not events_at(log_events, LogLevel.warn)
    disk.full = False
    clock.advance(store.RETRY_MAX)
    assert store.failure is None
    result_of(store.close())


def test_close_while_the_disk_is_full_does_not_raise(durable_backend, log_events):
    """Stopping the broker during a failure: one last save attempt, an ERROR, no exception."""
    disk = FaultyDisk()
    store = faulty_store(durable_backend, disk)
    durable_backend.write_all(store, [session("c1")])
    disk.full = True
    store.write(outbound("c1", 1))
    failed(store.sync())
    result_of(store.close())
    assert any("closed while it cannot write" in e["log_format"]
               for e in events_at(log_events, LogLevel.error))
    disk.full = False
    reopened = durable_backend()
    assert list(reopened.open().sessions) == ["c1"]
    result_of(reopened.close())


def test_writes_during_the_recovery_checkpoint_are_kept(durable_backend):
    """Operations arriving while the recovery checkpoint is written reach the new journal."""
    from twisted.internet import defer
    disk = FaultyDisk()
    jobs = []

    def deferred_runner(f, *args):
        d = defer.Deferred()
        jobs.append((f, args, d))
        return d

    def run_jobs():
        while jobs:
            f, args, d = jobs.pop(0)
            try:
                d.callback(f(*args))
            except Exception:
                d.errback()

    clock = durable_backend.reactor
    store = faulty_store(durable_backend, disk, run_in_thread=deferred_runner)
    store.write(session("c1"))
    d = store.sync()
    run_jobs()
    failed(d)
    disk.full = True
    store.write(outbound("c1", 1))
    failed(store.sync())
    run_jobs()
    disk.full = False
    clock.advance(store._retry_delay)                  # recovery job queued, not run yet
    store.write(outbound("c1", 2))                     # arrives meanwhile
    clock.advance(0)
    run_jobs()
    d = store.sync()
    run_jobs()
    assert failed(d) is None
    abandon(store)
    reopened = durable_backend()
    assert list(reopened.open().sessions["c1"].outbound) == [1, 2]
    result_of(reopened.close())
