"""Damaged data directories: the store starts with what can be recovered and says so."""
from __future__ import annotations

import dbm.dumb
import glob
import os
import pickle
import struct
import zlib

import pytest
from twisted.logger import LogLevel

from mqttd.persistence import safepickle
from mqttd.persistence.filestore import SNAPSHOT_HEADER, SNAPSHOT_MAGIC
from mqttd.persistence.journal import (
    JOURNAL_HEADER, RECORD_HEADER, StoreLockedError, encode_record, read_damaged)
from mqttd.persistence.records import FORMAT_VERSION, PutRetained

from .storehelpers import (
    abandon, events_at, message, outbound, reference_state, result_of, session)


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def journal_file(backend, gen=1):
    return os.path.join(backend.path, f"journal.{gen}")


def three_batches(backend):
    """Write three separately synced batches, then "kill" the store; return the batches."""
    batches = [[session("c1"), outbound("c1", 1)],
               [outbound("c1", 2), PutRetained(message("r"))],
               [outbound("c1", 3)]]
    store = backend()
    store.open()
    for batch in batches:
        backend.write_all(store, batch)
    abandon(store)
    return batches


def record_offsets(path):
    """Start offset of every record in a journal file."""
    with open(path, "rb") as f:
        data = f.read()
    offsets, offset = [], JOURNAL_HEADER.size
    while offset < len(data):
        offsets.append(offset)
        offset += RECORD_HEADER.size + RECORD_HEADER.unpack_from(data, offset)[1]
    return offsets


# --- journal damage ------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 3, 9])
def test_torn_last_record_is_skipped_and_the_journal_truncated(durable_backend, log_events, cut):
    """A half-written last record (crash mid-write) is dropped with a WARNING, the rest kept."""
    batches = three_batches(durable_backend)
    path = journal_file(durable_backend)
    last = record_offsets(path)[-1]
    size = os.path.getsize(path)
    os.truncate(path, size - cut)
    store = durable_backend()
    state = store.open()
    assert state == reference_state(batches[0] + batches[1])
    assert os.path.getsize(path) == last
    warnings = events_at(log_events, LogLevel.warn)
    assert len(warnings) == 1
    assert warnings[0]["path"] == path and warnings[0]["offset"] == last
    assert "Torn record" in warnings[0]["log_format"]
    assert not events_at(log_events, LogLevel.error)
    # the journal is usable again
    durable_backend.write_all(store, [outbound("c1", 4)])
    store, state = durable_backend.reopen(store)
    assert list(state.sessions["c1"].outbound) == [1, 2, 4]
    result_of(store.close())


def test_zeroed_tail_is_treated_as_torn(durable_backend, log_events):
    """Zeros after the last record (size grew, data never landed) are cut off."""
    batches = three_batches(durable_backend)
    with open(journal_file(durable_backend), "ab") as f:
        f.write(b"\0" * 4096)
    store = durable_backend()
    assert store.open() == reference_state(sum(batches, []))
    assert len(events_at(log_events, LogLevel.warn)) == 1
    result_of(store.close())


def test_damaged_bytes_in_the_middle_lose_only_that_record(durable_backend, log_events):
    """Damage followed by good records: replay resynchronises, ERROR once, bytes kept aside."""
    batches = three_batches(durable_backend)
    path = journal_file(durable_backend)
    second = record_offsets(path)[1]
    with open(path, "rb") as f:
        original = f.read()
    with open(path, "r+b") as f:
        f.seek(second + RECORD_HEADER.size + 5)
        byte = f.read(2)
        f.seek(-2, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF, byte[1] ^ 0xFF]))    # more than one bit
    store = durable_backend()
    assert store.open() == reference_state(batches[0] + batches[2])
    errors = events_at(log_events, LogLevel.error)
    assert len(errors) == 1
    assert errors[0]["path"] == path and errors[0]["offset"] == second
    assert errors[0]["records"] == 2 and errors[0]["ranges"] == 1
    kept = glob.glob(path + ".damaged-*")
    assert kept == [errors[0]["moved"]]
    (offset, damaged), = read_damaged(open(kept[0], "rb").read())
    third = record_offsets_of(original)[2]
    assert offset == second and len(damaged) == third - second
    result_of(store.close())
    # a fresh checkpoint was written: the next open is clean
    log_events.clear()
    store = durable_backend()
    assert store.open() == reference_state(batches[0] + batches[2])
    assert not events_at(log_events, LogLevel.error)
    result_of(store.close())


def record_offsets_of(data):
    offsets, offset = [], JOURNAL_HEADER.size
    while offset < len(data):
        offsets.append(offset)
        offset += RECORD_HEADER.size + RECORD_HEADER.unpack_from(data, offset)[1]
    return offsets


def test_damaged_length_field_in_the_middle_is_not_mistaken_for_a_torn_tail(
        durable_backend, log_events):
    """A length pointing past EOF with good records after it is middle damage (ERROR)."""
    batches = three_batches(durable_backend)
    path = journal_file(durable_backend)
    second = record_offsets(path)[1]
    with open(path, "r+b") as f:
        f.seek(second + 4)
        f.write(struct.pack(">I", 0x7FFFFFFF))
    store = durable_backend()
    assert store.open() == reference_state(batches[0] + batches[2])
    assert len(events_at(log_events, LogLevel.error)) == 1
    assert not events_at(log_events, LogLevel.warn)
    result_of(store.close())


def test_journals_after_a_damaged_one_are_still_replayed(durable_backend, log_events):
    """Damage in journal.1 costs its damaged record; journal.2 is replayed after it."""
    store = durable_backend(compact_bytes=10**9)
    store.open()
    durable_backend.write_all(store, [session("c1"), outbound("c1", 1)])
    durable_backend.write_all(store, [outbound("c1", 2)])
    store._start_compaction(final=False)      # journal.2 starts; checkpoint written
    durable_backend.write_all(store, [outbound("c1", 3)])
    abandon(store)
    # pretend the checkpoint never happened: remove it, recreate journal.1 damaged
    for name in os.listdir(durable_backend.path):
        if name.startswith(("snapshot", "CURRENT", "state.")):
            os.unlink(os.path.join(durable_backend.path, name))
    header = JOURNAL_HEADER.pack(b"MQTTDJNL", FORMAT_VERSION, 1)
    good = safepickle.dumps([session("c1"), outbound("c1", 1)])
    bad = safepickle.dumps([outbound("c1", 2)])
    with open(journal_file(durable_backend, 1), "wb") as f:
        f.write(header + RECORD_HEADER.pack(b"\xa7MQR", len(good), zlib.crc32(good)) + good
                + RECORD_HEADER.pack(b"\xa7MQR", len(bad), zlib.crc32(bad) ^ 0xFFFF) + bad
                + RECORD_HEADER.pack(b"\xa7MQR", len(good), zlib.crc32(good)) + good)
    store = durable_backend()
    state = store.open()
    assert list(state.sessions["c1"].outbound) == [1, 3]
    assert len(events_at(log_events, LogLevel.error)) == 1
    assert not glob.glob(journal_file(durable_backend, 2) + ".skipped-*")
    result_of(store.close())


def test_journal_from_a_future_version_is_set_aside(durable_backend, log_events):
    """A journal this mqttd cannot read is not guessed at."""
    path = journal_file(durable_backend)
    os.makedirs(durable_backend.path)
    with open(path, "wb") as f:
        f.write(JOURNAL_HEADER.pack(b"MQTTDJNL", FORMAT_VERSION + 1, 1) + b"whatever")
    store = durable_backend()
    assert store.open().sessions == {}
    assert "version" in events_at(log_events, LogLevel.error)[0]["reason"]
    result_of(store.close())


def test_empty_or_headerless_journal_is_repaired(durable_backend, log_events):
    """A journal created but killed before its header was written holds nothing; reuse it."""
    os.makedirs(durable_backend.path)
    with open(journal_file(durable_backend), "wb") as f:
        f.write(b"MQT")
    store = durable_backend()
    assert store.open().sessions == {}
    durable_backend.write_all(store, [session()])
    store, state = durable_backend.reopen(store)
    assert list(state.sessions) == ["c1"]
    result_of(store.close())


# --- checkpoint damage ---------------------------------------------------------

def checkpoint_then_journal(backend):
    """c1 only in the checkpoint, c2 only in the journal after it; store "killed"."""
    store = backend()
    store.open()
    backend.write_all(store, [session("c1"), outbound("c1", 1)])
    store, _ = backend.reopen(store)          # close -> checkpoint
    backend.write_all(store, [session("c2"), outbound("c2", 1)])
    abandon(store)


def snapshot_bytes(*items, version=FORMAT_VERSION, generation=2):
    """A snapshot file framed like the real thing, holding ``items`` (pickled bytes)."""
    return SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, version, generation) + b"".join(
        encode_record(item) for item in items)


def damage_checkpoint(backend, how, tmp_path):
    """Spoil the checkpoint ``how``; return the path the ERROR line must name."""
    marker = str(tmp_path / "pwned")
    evil = pickle.dumps(Evil(marker), protocol=5)
    if backend.kind == "file":
        path = os.path.join(backend.path, "snapshot.pkl")
        data = {
            "garbage": os.urandom(300),
            "disallowed_class": snapshot_bytes(evil),
            "future_version": snapshot_bytes(
                safepickle.dumps(("end", {"sessions": 0, "outbound": 0, "retained": 0})),
                version=FORMAT_VERSION + 1),
            "truncated": open(path, "rb").read()[:-10],
        }[how]
        with open(path, "wb") as f:
            f.write(data)
        return path
    base = os.path.join(backend.path, "state.2")
    if how == "garbage":
        with open(base + ".dat", "r+b") as f:
            f.write(os.urandom(300))
    elif how == "truncated":
        os.truncate(base + ".dat", os.path.getsize(base + ".dat") // 2)
    elif how == "disallowed_class":
        db = dbm.dumb.open(base, "w")
        db[b"meta"] = struct.pack(">I", zlib.crc32(evil)) + evil
        db.close()
    else:
        with open(os.path.join(backend.path, "CURRENT"), "w") as f:
            f.write(f"mqttd-dbm-checkpoint {FORMAT_VERSION + 1} 2\n")
    return base


def unusable(backend, how):
    return how == "future_version" or (how == "garbage" and backend.kind == "file")


@pytest.mark.parametrize("how", ["garbage", "truncated", "disallowed_class", "future_version"])
def test_damaged_checkpoint_costs_only_its_damaged_frames(
        durable_backend, log_events, tmp_path, how):
    """A bad snapshot/checkpoint: ERROR naming it, what can be read is kept, journals replayed."""
    checkpoint_then_journal(durable_backend)
    named = damage_checkpoint(durable_backend, how, tmp_path)
    store = durable_backend()
    state = store.open()
    assert "c2" in state.sessions and list(state.sessions["c2"].outbound) == [1]
    errors = events_at(log_events, LogLevel.error)
    assert len(errors) == 1
    assert not os.path.exists(tmp_path / "pwned")
    if unusable(durable_backend, how):
        # nothing readable, or a newer format: the whole file is set aside
        assert list(state.sessions) == ["c2"]
        assert errors[0]["path"] in (named, os.path.join(durable_backend.path, "CURRENT"))
        assert "Corrupt" in errors[0]["log_format"] and errors[0]["moved"]
        assert glob.glob(os.path.join(durable_backend.path, "*.corrupt-*"))
    else:
        assert "Damaged checkpoint" in errors[0]["log_format"]
        if how == "disallowed_class" and durable_backend.kind == "file":
            assert "system" in errors[0]["error"]
    result_of(store.close())
    # and it does not crash-loop: the next start is clean
    log_events.clear()
    store = durable_backend()
    assert store.open() == state
    assert not events_at(log_events, LogLevel.error)
    result_of(store.close())


# --- lock --------------------------------------------------------------------

def test_second_open_of_the_same_directory_fails_clearly(durable_backend):
    """Two brokers on one data dir would corrupt it: the second one is refused."""
    first = durable_backend()
    first.open()
    second = durable_backend()
    with pytest.raises(StoreLockedError, match="already in use") as info:
        second.open()
    assert durable_backend.path in str(info.value) and str(os.getpid()) in str(info.value)
    result_of(first.close())
    third = durable_backend()
    third.open()                                     # released by close()
    result_of(third.close())


def test_lock_before_open_is_kept_by_open_and_released_by_close(durable_backend):
    """A broker locks its data dir before it listens: lock() alone keeps a second store out,
    open() keeps that lock, and an unopened locked store gives it back."""
    first = durable_backend()
    first.lock()
    first.lock()                                     # idempotent
    with pytest.raises(StoreLockedError, match="already in use"):
        durable_backend().lock()
    first.unlock()                                   # never opened: released
    second = durable_backend()
    second.lock()
    state = second.open()                            # the lock it holds is its own
    with pytest.raises(StoreLockedError):
        durable_backend().open()
    result_of(second.close())
    third = durable_backend()
    third.lock()
    result_of(third.close())                         # locked, never opened: close releases
    fourth = durable_backend()
    assert fourth.open() == state
    result_of(fourth.close())


def test_a_broker_on_a_locked_data_dir_stops_before_it_listens(durable_backend, log_events):
    """A second broker on a data dir in use must never accept a connection nor log
    "MQTT listening": the lock is taken before any listener opens (exit status 2)."""
    from twisted.internet.testing import MemoryReactorClock

    from mqttd.service import CannotOpenStore, make_broker_service
    first = durable_backend()
    first.open()
    reactor = MemoryReactorClock()
    service = make_broker_service(reactor, listen=["tcp:1883:interface=127.0.0.1"],
                                  store=durable_backend(), sys_interval=0)
    service.add_listener("metrics", "tcp:9100:interface=127.0.0.1", object())
    with pytest.raises(CannotOpenStore, match="already in use") as info:
        service.startService()
    assert info.value.exit_status == 2
    assert reactor.tcpServers == []
    assert not [e for e in log_events if "listening" in (e.get("log_format") or "")]
    result_of(first.close())


def test_a_broker_that_cannot_listen_leaves_the_data_dir_unlocked(durable_backend):
    """The lock taken before listening is given back when a listener fails, so the
    next broker (the operator fixed the port) starts at once."""
    from twisted.internet.testing import MemoryReactorClock

    from mqttd.service import CannotListen, make_broker_service

    class Refusing(MemoryReactorClock):
        def listenTCP(self, *args, **kwargs):
            from twisted.internet.error import CannotListenError
            raise CannotListenError("127.0.0.1", 1883, OSError(98, "Address already in use"))

    service = make_broker_service(Refusing(), listen=["tcp:1883:interface=127.0.0.1"],
                                  store=durable_backend(), sys_interval=0)
    with pytest.raises(CannotListen) as info:
        service.startService()
    assert info.value.exit_status == 1
    store = durable_backend()
    store.open()
    result_of(store.close())


# --- safepickle ----------------------------------------------------------------

def test_safepickle_refuses_a_pickle_that_calls_os_system(tmp_path):
    """The allow-list keeps a planted pickle from running code."""
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        safepickle.loads(pickle.dumps(Evil(str(marker)), protocol=5))
    assert not marker.exists()


@pytest.mark.parametrize("obj", [eval, print, type, object()],
                         ids=["eval", "print", "type", "object"])
def test_safepickle_refuses_anything_but_records(obj):
    """Builtins beyond plain containers are not reachable either."""
    with pytest.raises(pickle.UnpicklingError):
        safepickle.loads(pickle.dumps(obj, protocol=5))


def test_safepickle_round_trips_every_record_and_op():
    """Every op type, with rich messages, comes back equal (compact reduction included)."""
    from .test_store_contract import ROUND_TRIPS
    from .storehelpers import RICH_MESSAGE
    ops = sum(ROUND_TRIPS.values(), []) + [PutRetained(RICH_MESSAGE)]
    state = reference_state(ops)
    assert safepickle.loads(safepickle.dumps(ops)) == ops
    assert safepickle.loads(safepickle.dumps(state)) == state
    assert safepickle.loads(safepickle.dumps({frozenset([1]), b"x"})) == {frozenset([1]), b"x"}


@pytest.mark.parametrize("data", [b"", b"\x80\x05", b"garbage", b"\x80\x05K\x01K\x02\x86."[:-1]])
def test_safepickle_reports_every_malformed_input_as_unpickling_error(data):
    """Recovery catches one exception type for every kind of broken pickle."""
    with pytest.raises(pickle.UnpicklingError):
        safepickle.loads(data)


def test_records_in_the_journal_are_compact():
    """A queued message with default properties costs little more than its payload."""
    size = len(safepickle.dumps([outbound("client-1", 1)]))
    assert size < 200
