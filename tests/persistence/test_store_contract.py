"""The one contract suite every store backend passes (DESIGN convention 9).

Cases that only make sense for a store that keeps data (round trips,
fsync, compaction) run over the durable backends; the rest over all.
Stores here run their "thread" jobs synchronously on a ``task.Clock``;
``test_group_commit.py`` covers the real thread pool.
"""
from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mqttd.interfaces import IBrokerStore
from mqttd.persistence import store_from_spec
from mqttd.persistence.dbmstore import DbmStore
from mqttd.persistence.filestore import FileStore
from mqttd.persistence.journal import StoreError, StoreUnavailable, list_journals
from mqttd.persistence.memory import MemoryStore
from mqttd.persistence.records import (
    AddInboundQos2, DeleteInboundQos2, DeleteOutbound, DeleteRetained, DeleteSession,
    DeleteSubscription, DeleteWill, OutboundStage, PutRetained, PutSessionState,
    PutSubscription, PutWill, SessionRecord, StoredState, SubscriptionRecord, UpdateOutbound,
    WillRecord)

from .storehelpers import (
    RICH_MESSAGE, StoreMaker, message, outbound, reference_state, result_of,
    run_synchronously, session)


# --- every backend -----------------------------------------------------------

def test_store_provides_the_interface(any_backend):
    """Every backend is an IBrokerStore the broker can use interchangeably."""
    store = any_backend()
    assert verifyObject(IBrokerStore, store)
    assert store.durable == any_backend.durable
    store.open()
    result_of(store.close())


def test_fresh_store_opens_empty(any_backend):
    """A new data directory (or the memory store) starts with no state."""
    store = any_backend()
    assert store.open() == StoredState()
    result_of(store.close())


def test_sync_and_close_fire(any_backend):
    """sync() and close() return Deferreds that fire without outside help."""
    store = any_backend()
    store.open()
    store.write(session())
    assert result_of(store.sync()) is None
    assert result_of(store.close()) is None
    assert result_of(store.close()) is None  # closing twice is harmless


def test_write_rejects_what_is_not_an_operation(any_backend):
    """A non-operation is a programming error, reported at once."""
    store = any_backend()
    store.open()
    with pytest.raises(TypeError):
        store.write(SessionRecord("c1"))
    result_of(store.close())


def test_reopen_returns_written_state_only_if_durable(any_backend):
    """Durable stores give back what was written; the memory store keeps nothing."""
    store = any_backend()
    store.open()
    ops = [session(), outbound(seq=1), PutRetained(message("r/1"))]
    any_backend.write_all(store, ops)
    store, state = any_backend.reopen(store)
    assert state == (reference_state(ops) if any_backend.durable else StoredState())
    result_of(store.close())


def test_memory_store_sync_fires_immediately():
    """The memory store never waits: there is nothing to make durable."""
    store = MemoryStore()
    store.open()
    store.write(outbound())
    d = store.sync()
    assert d.called and not store.durable
    result_of(store.close())


# --- round trips through close/open -----------------------------------------

ROUND_TRIPS = {
    "put_session": [session("c1", ("a/+", 1), ("b/#", 2), expiry_interval=300,
                            disconnected_at=12.5, protocol_level=5)],
    "replace_session": [session("c1"), outbound(seq=1), AddInboundQos2("c1", 9),
                        session("c1", ("new/#", 0))],
    "delete_session": [session("c1"), session("c2"), DeleteSession("c1")],
    "put_outbound": [session(), outbound(seq=1), outbound(seq=2, packet_id=7,
                                                          stage=OutboundStage.PUBLISH_SENT)],
    "update_outbound": [session(), outbound(seq=1),
                        UpdateOutbound("c1", 1, 42, OutboundStage.PUBREL_SENT)],
    "delete_outbound": [session(), outbound(seq=1), outbound(seq=2), DeleteOutbound("c1", 1)],
    "add_inbound_qos2": [session(), AddInboundQos2("c1", 1), AddInboundQos2("c1", 65535)],
    "delete_inbound_qos2": [session(), AddInboundQos2("c1", 1), AddInboundQos2("c1", 2),
                            DeleteInboundQos2("c1", 1)],
    "put_retained": [PutRetained(RICH_MESSAGE), PutRetained(message("r/2", b""))],
    "delete_retained": [PutRetained(message("r/1")), PutRetained(message("r/2")),
                        DeleteRetained("r/1")],
    "put_will": [session("c1"), PutWill(WillRecord("c1", RICH_MESSAGE, 1700000000.25)),
                 PutWill(WillRecord("c2", message("w/2"), 5.0, False))],
    "replace_will": [PutWill(WillRecord("c1", message("w/1"), 1.0)),
                     PutWill(WillRecord("c1", message("w/1b"), 2.0))],
    "delete_will": [PutWill(WillRecord("c1", message("w/1"), 1.0)),
                    PutWill(WillRecord("c2", message("w/2"), 1.0)), DeleteWill("c1")],
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_each_operation_round_trips_through_close_and_open(durable_backend, case):
    """Every op type survives a restart with exactly the meaning apply_op gives it."""
    ops = ROUND_TRIPS[case]
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, ops)
    store, state = durable_backend.reopen(store)
    assert state == reference_state(ops)
    result_of(store.close())


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_each_operation_is_recovered_from_the_journal_alone(durable_backend, case):
    """Without a clean close (no checkpoint), replaying the journal gives the same state."""
    from .storehelpers import abandon
    ops = ROUND_TRIPS[case]
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, ops)
    abandon(store)
    store = durable_backend()
    assert store.open() == reference_state(ops)
    result_of(store.close())


def test_pending_wills_survive_compaction_and_reopen(durable_backend):
    """Delayed wills are checkpointed like retained messages (one chunked item kind)."""
    store = durable_backend()
    store.open()
    ops = [PutWill(WillRecord(f"c{n}", message(f"w/{n}"), 100.0 + n)) for n in range(2500)]
    ops.append(DeleteWill("c7"))
    durable_backend.write_all(store, ops)
    store, state = durable_backend.reopen(store)     # clean close writes a checkpoint
    assert state == reference_state(ops) and len(state.wills) == 2499
    result_of(store.close())


def test_deleted_session_takes_its_outbound_and_qos2_ids_along(durable_backend):
    """After DeleteSession nothing of the session comes back, not even orphan messages."""
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, [
        session("gone"), outbound("gone", 1), AddInboundQos2("gone", 5),
        session("kept"), outbound("kept", 1), DeleteSession("gone"),
        outbound("gone", 2),   # ignored: unknown session
    ])
    store, state = durable_backend.reopen(store)
    assert list(state.sessions) == ["kept"]
    assert list(state.sessions["kept"].outbound) == [1]
    result_of(store.close())


def test_replacing_a_session_keeps_its_messages_and_qos2_ids(durable_backend):
    """PutSession on an existing session changes only its record."""
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, [session("c1"), outbound("c1", 1), AddInboundQos2("c1", 3),
                                      session("c1", ("x/y", 2))])
    store, state = durable_backend.reopen(store)
    stored = state.sessions["c1"]
    assert stored.record.subscriptions[0].topic_filter == "x/y"
    assert list(stored.outbound) == [1] and stored.inbound_qos2 == {3}
    result_of(store.close())


def test_retained_messages_are_put_replaced_and_deleted(durable_backend):
    """One retained message per topic: the last put wins, a delete removes it."""
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, [
        PutRetained(message("a", b"1")), PutRetained(message("b", b"1")),
        PutRetained(message("a", b"2")), DeleteRetained("b"), DeleteRetained("never-there"),
    ])
    store, state = durable_backend.reopen(store)
    assert state.retained == {"a": message("a", b"2")}
    result_of(store.close())


@pytest.mark.parametrize("clean_close", [True, False])
def test_outbound_messages_come_back_in_seq_order(durable_backend, clean_close):
    """Delivery order is seq order after a restart, whatever order they were written in."""
    from .storehelpers import abandon
    seqs = [5, 3, 9, 1, 7, 2]
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, [session()] + [outbound(seq=s) for s in seqs]
                              + [UpdateOutbound("c1", 5, 1, OutboundStage.PUBLISH_SENT)])
    if clean_close:
        result_of(store.close())
    else:
        abandon(store)
    store = durable_backend()
    state = store.open()
    assert list(state.sessions["c1"].outbound) == sorted(seqs)
    assert state.sessions["c1"].outbound[5].stage == OutboundStage.PUBLISH_SENT
    result_of(store.close())


def test_open_returns_a_copy_the_broker_may_mutate(durable_backend):
    """Changing the returned state does not change what the store will checkpoint."""
    store = durable_backend()
    state = store.open()
    durable_backend.write_all(store, [session()])
    state.sessions.clear()
    store, state = durable_backend.reopen(store)
    assert list(state.sessions) == ["c1"]
    result_of(store.close())


def test_write_after_close_is_refused(durable_backend):
    """A closed store says so instead of silently dropping data."""
    store = durable_backend()
    store.open()
    result_of(store.close())
    with pytest.raises(StoreError):
        store.write(session())
    with pytest.raises(StoreError):
        result_of(store.sync())


# --- fsync modes (synchronous runner, fake clock) -----------------------------

def counting_fsync(calls):
    def fsync(fd):
        calls.append(fd)
        os.fsync(fd)
    return fsync


def test_many_syncs_in_one_turn_share_one_fsync(durable_backend):
    """Group commit: syncs requested while an fsync is pending are served together."""
    calls = []
    # defer the thread job by hand so requests pile up behind the first fsync
    jobs = []

    def run_later(f, *args):
        from twisted.internet import defer
        d = defer.Deferred()
        jobs.append((f, args, d))
        return d

    store = durable_backend(run_in_thread=run_later, fsync_function=counting_fsync(calls))
    store.open()
    fired = []
    for i in range(100):
        store.write(outbound(seq=i))
        store.sync().addCallback(lambda _, i=i: fired.append(i))
    while jobs:
        f, args, d = jobs.pop(0)
        d.callback(f(*args))
    assert fired == list(range(100))          # in request order
    assert store.fsync_count == 2             # the first one, then one for the other 99
    store._run_in_thread = run_synchronously
    result_of(store.close())


def test_sync_with_nothing_new_written_does_not_fsync(durable_backend):
    """A sync that covers no new bytes fires without another fsync."""
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, [session()])
    count = store.fsync_count
    result_of(store.sync())
    assert store.fsync_count == count
    result_of(store.close())


def test_fsync_never_fires_sync_after_the_write(durable_backend):
    """fsync="never": sync() fires once the batch is in the OS; only close fsyncs."""
    calls = []
    store = durable_backend(fsync="never", fsync_function=counting_fsync(calls))
    store.open()
    calls.clear()
    store.write(session())
    d = store.sync()
    assert d.called and calls == []
    path = os.path.join(durable_backend.path, "journal.1")
    assert os.path.getsize(path) > 20      # written, not only buffered
    store, state = durable_backend.reopen(store)
    assert calls and list(state.sessions) == ["c1"]
    result_of(store.close())


def test_fsync_interval_fsyncs_in_the_background(durable_backend):
    """fsync="interval:N": sync() fires after the write; an fsync follows every N ms."""
    store = durable_backend(fsync="interval:100")
    store.open()
    store.write(session())
    assert store.sync().called
    assert store.fsync_count == 0
    durable_backend.reactor.advance(0.1)
    assert store.fsync_count == 1
    durable_backend.reactor.advance(0.1)     # nothing new: no fsync
    assert store.fsync_count == 1
    result_of(store.close())
    assert not durable_backend.reactor.getDelayedCalls()


@pytest.mark.parametrize("mode", ["sometimes", "interval:", "interval:0", "interval:x", ""])
def test_unknown_fsync_mode_is_refused(durable_backend, mode):
    """A typo in the durability setting is an error, not a silent default."""
    with pytest.raises(ValueError):
        durable_backend(fsync=mode)


def test_failed_fsync_fails_the_sync_and_all_later_ones(durable_backend):
    """If the disk refuses an fsync, nothing is acknowledged as durable from then on."""
    def broken(fd):
        raise OSError(5, "I/O error")

    store = durable_backend()
    store.open()
    store._fsync = store._datasync = broken
    store.write(session())
    with pytest.raises(StoreUnavailable) as info:
        result_of(store.sync())
    assert info.value.errno == 5
    store.write(outbound())
    with pytest.raises(StoreUnavailable):
        result_of(store.sync())
    store._fsync, store._datasync = os.fsync, getattr(os, "fdatasync", os.fsync)
    result_of(store.close())


def test_writes_in_one_turn_go_out_in_one_os_write(durable_backend, monkeypatch):
    """The batch buffer is written once per reactor turn, not once per op."""
    store = durable_backend()
    store.open()
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    for i in range(50):
        store.write(outbound(seq=i))
    assert writes == []
    durable_backend.reactor.advance(0)      # the callLater(0) flush
    assert len(writes) == 1
    monkeypatch.undo()
    result_of(store.close())


# --- compaction --------------------------------------------------------------

def journals(path):
    return list_journals(path)


def test_compaction_keeps_all_state_and_removes_old_journals(durable_backend):
    """A journal past compact_bytes becomes a checkpoint; old journals are deleted."""
    store = durable_backend(compact_bytes=4096)
    store.open()
    ops = [session("c1"), session("c2")]
    for i in range(300):
        ops.append(outbound("c1" if i % 2 else "c2", seq=i))
        if i % 3 == 0:
            ops.append(DeleteOutbound("c2", i - 3))
    for op in ops:
        durable_backend.write_all(store, [op])
    assert store.compaction_count > 3
    assert journals(durable_backend.path) == [store._gen]
    abandon_and_reopen = durable_backend()
    from .storehelpers import abandon
    abandon(store)
    state = abandon_and_reopen.open()
    assert state == reference_state(ops)
    result_of(abandon_and_reopen.close())


def test_reopen_after_compaction_and_more_writes(durable_backend):
    """Checkpoint + later journal replay compose: nothing lost across several restarts."""
    ops = []
    store = durable_backend()
    store.open()
    for round_ in range(3):
        more = [session(f"c{round_}"), outbound(f"c{round_}", 1), PutRetained(message(f"r{round_}"))]
        durable_backend.write_all(store, more)
        ops += more
        store, state = durable_backend.reopen(store)
        assert state == reference_state(ops)
    result_of(store.close())


def test_clean_close_leaves_a_checkpoint_and_no_journal_records(durable_backend):
    """After close() the checkpoint alone holds the state (fast restart)."""
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, [session(), outbound()])
    result_of(store.close())
    assert journals(durable_backend.path) == []
    checkpoint = "snapshot.pkl" if durable_backend.kind == "file" else "CURRENT"
    assert os.path.exists(os.path.join(durable_backend.path, checkpoint))


def test_crash_after_checkpoint_before_journal_removal_is_harmless(durable_backend):
    """A journal the checkpoint already covers is deleted at open, not replayed twice."""
    ops = [session(), outbound(seq=1), AddInboundQos2("c1", 4)]
    store = durable_backend()
    store.open()
    durable_backend.write_all(store, ops)
    old = os.path.join(durable_backend.path, "journal.1")
    with open(old, "rb") as f:
        saved = f.read()
    result_of(store.close())
    with open(old, "wb") as f:
        f.write(saved)
    store = durable_backend()
    assert store.open() == reference_state(ops)
    assert journals(durable_backend.path) == [2]
    result_of(store.close())


def test_crash_during_compaction_replays_both_journals(durable_backend):
    """If the checkpoint never landed, old and new journals together still hold everything."""
    from .storehelpers import abandon
    jobs = []

    def hold(f, *args):
        from twisted.internet import defer
        if f.__name__ == "_compaction_job":
            jobs.append(f)                 # never run: the "crash" comes first
            return defer.Deferred()
        return run_synchronously(f, *args)

    store = durable_backend(compact_bytes=800, run_in_thread=hold)
    store.open()
    ops = [session()] + [outbound(seq=i) for i in range(40)]
    for op in ops:
        durable_backend.write_all(store, [op])
    assert jobs and journals(durable_backend.path) == [1, 2]
    store._compacting = None
    abandon(store)
    store = durable_backend()
    assert store.open() == reference_state(ops)
    result_of(store.close())


# --- the factory ---------------------------------------------------------------

def test_store_from_spec_builds_each_backend(tmp_path):
    """memory, file:PATH and dbm:PATH name the three backends."""
    assert isinstance(store_from_spec("memory", None), MemoryStore)
    assert isinstance(store_from_spec("memory", None, fsync="never"), MemoryStore)
    file_store = store_from_spec(f"file:{tmp_path}/f", None, fsync="never")
    assert isinstance(file_store, FileStore) and file_store.fsync_mode == "never"
    assert file_store.path == f"{tmp_path}/f"
    assert isinstance(store_from_spec(f"dbm:{tmp_path}/d", None), DbmStore)


@pytest.mark.parametrize("spec", ["", "file", "file:", "disk:/x", "memory:x", "redis://x"])
def test_store_from_spec_refuses_unknown_specs(spec):
    """A bad --persistence value is reported with the accepted forms."""
    with pytest.raises(ValueError, match="memory"):
        store_from_spec(spec, None)


# --- property: any op sequence, any restart pattern ---------------------------

_client = st.sampled_from(["a", "b", "c"])
_op = st.one_of(
    st.builds(lambda c: session(c), _client),
    st.builds(DeleteSession, _client),
    st.builds(lambda c, s: outbound(c, s), _client, st.integers(0, 20)),
    st.builds(UpdateOutbound, _client, st.integers(0, 20), st.integers(1, 65535),
              st.sampled_from(OutboundStage)),
    st.builds(DeleteOutbound, _client, st.integers(0, 20)),
    st.builds(AddInboundQos2, _client, st.integers(1, 10)),
    st.builds(DeleteInboundQos2, _client, st.integers(1, 10)),
    st.builds(lambda t: PutRetained(message(t)), st.sampled_from(["x", "y"])),
    st.builds(DeleteRetained, st.sampled_from(["x", "y"])),
    st.builds(lambda c, t: PutWill(WillRecord(c, message("w/" + c), t)), _client,
              st.floats(0, 1e10)),
    st.builds(DeleteWill, _client),
    # format 5: subscription deltas and session state without the subscriptions
    st.builds(lambda c, f, q: PutSubscription(c, SubscriptionRecord(f, q)), _client,
              st.sampled_from(["a/#", "b/+", "c", "$share/g/d"]), st.integers(0, 2)),
    st.builds(DeleteSubscription, _client, st.sampled_from(["a/#", "b/+", "c"])),
    st.builds(PutSessionState, _client, st.sampled_from([4, 5]),
              st.one_of(st.none(), st.integers(1, 10)),
              st.one_of(st.none(), st.floats(0, 1e9)), st.sampled_from([None, "u"])),
)
_step = st.one_of(_op, st.sampled_from(["sync", "reopen", "crash"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["file", "dbm"]), steps=st.lists(_step, max_size=40))
def test_any_history_of_ops_and_restarts_recovers_the_synced_state(kind, steps):
    """Whatever the ops and restarts, reopening gives apply_op's state of every synced op."""
    from .storehelpers import abandon
    with tempfile.TemporaryDirectory() as tmp:
        maker = StoreMaker(kind, os.path.join(tmp, "data"))
        store = maker(compact_bytes=600)
        store.open()
        synced, written = [], []
        for step in steps:
            if step == "sync":
                result_of(store.sync())
                synced = list(written)
            elif step in ("reopen", "crash"):
                if step == "reopen":
                    result_of(store.close())
                else:
                    result_of(store.sync())
                    abandon(store)
                synced = list(written)
                store = maker(compact_bytes=600)
                assert store.open() == reference_state(synced)
            else:
                store.write(step)
                written.append(step)
        result_of(store.close())
        store = maker()
        assert store.open() == reference_state(written)
        result_of(store.close())


def test_format_1_checkpoint_without_will_counts_still_loads():
    """A checkpoint written before pending wills existed has no "wills" count: still complete."""
    from mqttd.persistence.journal import StateAssembler
    assembler = StateAssembler()
    assembler.add(("r", (message("r/1"),)))
    state = assembler.finish({"sessions": 0, "outbound": 0, "retained": 1})
    assert list(state.retained) == ["r/1"] and state.wills == {}
