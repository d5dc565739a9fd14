"""The message table: a message owed to many sessions is stored once (REVIEW-S9 R11).

One 1 MB QoS 1 PUBLISH fanned out to 1,100 offline persistent sessions used to become a
1.07 GB checkpoint (one copy per session), ~2.8 GB of RSS and 11 s restarts.  Now the
journal and the checkpoints of every durable backend hold the message once, each
session's record references it by id, restarts give the sessions one shared object, and
the message leaves the store with the last session that owed it.
"""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel

from mqttd.codec.packets import Properties
from mqttd.messages import Message
from mqttd.persistence import dbmstore, filestore, journal, opcodec, safepickle
from mqttd.persistence.journal import JOURNAL_HEADER, RECORD_HEADER, scan_frames
from mqttd.persistence.records import (
    DeleteOutbound, DeleteSession, OutboundRecord, OutboundStage, PutOutbound,
    PutOutboundMessage, PutOutboundRef, StoredState, UpdateOutbound, apply_op)

from .storehelpers import abandon, events_at, result_of, session

SESSIONS = 200
SIZE = 100_000
#: the bound for "one copy": the message once plus ~300 bytes per session (its record,
#: subscription and reference); a copy per session would be 20 MB
ONE_COPY = 1.2 * SIZE + 300 * SESSIONS


def big_message(size=SIZE, topic="fan/out"):
    return Message(topic, os.urandom(size), 1)


def fan_out(backend, message, sessions=SESSIONS, sync=True):
    """``sessions`` offline sessions, each owed ``message`` (one object, as routed)."""
    store = backend(compact_bytes=10**9)
    store.open()
    backend.write_all(store, [session(f"c{i}") for i in range(sessions)])
    # one turn of the broker: the fan-out of one PUBLISH is one journal record
    backend.write_all(store, [PutOutbound(f"c{i}", OutboundRecord(1, message, 1))
                              for i in range(sessions)], sync=sync)
    return store


def store_bytes(path, prefix):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if n.startswith(prefix))


def checkpoint_bytes(backend):
    return store_bytes(backend.path, "snapshot.pkl" if backend.kind == "file" else "state.")


def owed(state, client_id):
    return [r.message for r in state.sessions[client_id].outbound.values()]


# --- one copy in the journal and the checkpoints ------------------------------------------

def test_fanned_out_message_is_journaled_once(durable_backend):
    """200 sessions owed one 100 KB message: the journal grows by ~one copy, not 200 (20 MB)."""
    store = fan_out(durable_backend, big_message())
    assert store_bytes(durable_backend.path, "journal.") < ONE_COPY
    abandon(store)


def test_fanned_out_message_is_checkpointed_once(durable_backend):
    """The checkpoint written at close holds the message once; a restart shares one object."""
    message = big_message()
    store = fan_out(durable_backend, message)
    result_of(store.close())
    assert checkpoint_bytes(durable_backend) < ONE_COPY
    store = durable_backend()
    state = store.open()
    first = owed(state, "c0")[0]
    assert first == message
    assert all(owed(state, f"c{i}")[0] is first for i in range(SESSIONS))
    assert list(store._mirror.messages.values()) == [first]
    result_of(store.close())


def test_journal_replay_after_a_kill_shares_one_object(durable_backend):
    """A restart from the journal alone (kill -9, no checkpoint) also gives one object."""
    message = big_message()
    abandon(fan_out(durable_backend, message))
    store = durable_backend()
    state = store.open()
    first = owed(state, "c0")[0]
    assert first == message
    assert all(owed(state, f"c{i}")[0] is first for i in range(SESSIONS))
    result_of(store.close())
    assert checkpoint_bytes(durable_backend) < ONE_COPY


def test_in_flight_stages_keep_sharing_the_message(durable_backend):
    """Sent (packet id) and PUBREL stages of some sessions change their records, not the message."""
    message = big_message()
    store = fan_out(durable_backend, message)
    durable_backend.write_all(store, [
        UpdateOutbound("c1", 1, 7, OutboundStage.PUBLISH_SENT),
        UpdateOutbound("c2", 1, 9, OutboundStage.PUBREL_SENT)])
    store, state = durable_backend.reopen(store)
    assert state.sessions["c1"].outbound[1].packet_id == 7
    assert state.sessions["c2"].outbound[1].stage == OutboundStage.PUBREL_SENT
    assert state.sessions["c2"].outbound[1].message is owed(state, "c0")[0]
    assert len(store._mirror.messages) == 1
    result_of(store.close())


# --- the last reference keeps it, no reference leaks it -------------------------------------

@pytest.mark.parametrize("restart", ["journal", "checkpoint"])
def test_acks_of_some_sessions_keep_the_message_for_the_others(durable_backend, restart):
    """150 of 200 sessions acknowledge: the other 50 still get every byte, after any restart."""
    message = big_message()
    store = fan_out(durable_backend, message)
    durable_backend.write_all(store, [DeleteOutbound(f"c{i}", 1) for i in range(150)])
    if restart == "journal":
        abandon(store)
        store = durable_backend()
        state = store.open()
    else:
        store, state = durable_backend.reopen(store)
    assert all(not state.sessions[f"c{i}"].outbound for i in range(150))
    assert all(owed(state, f"c{i}") == [message] for i in range(150, SESSIONS))
    result_of(store.close())


def test_message_leaves_the_store_after_the_last_ack(durable_backend):
    """Once every session acknowledged, the next checkpoint holds no message (no leak)."""
    store = fan_out(durable_backend, big_message())
    durable_backend.write_all(store, [DeleteOutbound(f"c{i}", 1) for i in range(100)])
    store, _ = durable_backend.reopen(store)       # checkpoint while 100 still owe it
    assert checkpoint_bytes(durable_backend) > SIZE
    durable_backend.write_all(store, [DeleteOutbound(f"c{i}", 1) for i in range(100, SESSIONS)])
    assert store._mirror.messages == {} and store._mirror.message_refs == {}
    store, state = durable_backend.reopen(store)
    assert checkpoint_bytes(durable_backend) < 300 * SESSIONS      # records only
    assert state.messages == {} and all(not s.outbound for s in state.sessions.values())
    result_of(store.close())


def test_deleted_sessions_release_their_messages(durable_backend):
    """Discarding sessions (clean start, expiry) drops the message with the last of them."""
    store = fan_out(durable_backend, big_message(), sessions=20)
    durable_backend.write_all(store, [DeleteSession(f"c{i}") for i in range(19)])
    assert len(store._mirror.messages) == 1
    durable_backend.write_all(store, [DeleteSession("c19")])
    assert store._mirror.messages == {}
    result_of(store.close())
    assert checkpoint_bytes(durable_backend) < 300 * SESSIONS


def test_a_message_queued_again_after_its_release_is_stored_again(durable_backend):
    """Released then owed again (a retained message replayed later): a new id, never a lost body."""
    message = big_message(1000)
    store = fan_out(durable_backend, message, sessions=2)
    durable_backend.write_all(store, [DeleteOutbound("c0", 1), DeleteOutbound("c1", 1),
                                      PutOutbound("c0", OutboundRecord(2, message, 1))])
    abandon(store)
    store = durable_backend()
    state = store.open()
    assert owed(state, "c0") == [message] and owed(state, "c1") == []
    result_of(store.close())


def test_apply_op_keeps_reference_counts_idempotent():
    """Replaying an operation twice (journal over a checkpoint) counts its reference once."""
    state = StoredState()
    message = big_message(10)
    ops = [session("a"), session("b"),
           PutOutboundMessage("a", OutboundRecord(1, message, 1), 5),
           PutOutboundRef("b", 1, 5, 1)]
    for op in ops + ops:
        apply_op(state, op)
    assert state.message_refs == {5: 2} and state.next_message_id == 6
    assert state.sessions["b"].outbound[1].message is message
    for op in [DeleteOutbound("a", 1)] * 2:
        apply_op(state, op)
    assert state.message_refs == {}         # one holder: no entry
    apply_op(state, DeleteOutbound("b", 1))
    assert state.messages == {} and state.message_ids == {}
    apply_op(state, PutOutboundRef("a", 1, 5, 1))       # its message is gone
    assert not state.sessions["a"].outbound


# --- damage ---------------------------------------------------------------------------------

def test_damaged_message_frame_costs_its_references_and_says_so(durable_backend, log_events):
    """A damaged byte in a message's checkpoint frame loses that message for the sessions
    owing it (and nothing else); the ERROR line counts them."""
    shared = big_message(20_000, "shared")
    store = fan_out(durable_backend, shared, sessions=3)
    other = Message("other", b"o" * 100, 1)
    durable_backend.write_all(store, [PutOutbound("c0", OutboundRecord(2, other, 1))])
    result_of(store.close())
    name = ("snapshot.pkl" if durable_backend.kind == "file" else
            [n for n in os.listdir(durable_backend.path) if n.endswith(".dat")][0])
    path = os.path.join(durable_backend.path, name)
    with open(path, "rb") as f:
        data = f.read()
    start = filestore.SNAPSHOT_HEADER.size if durable_backend.kind == "file" else 0
    frames = scan_frames(data, start, padding=durable_backend.kind == "dbm").frames
    offset = next(o for o, p in frames if len(p) > 20_000)      # the shared message's frame
    with open(path, "r+b") as f:
        f.seek(offset + RECORD_HEADER.size + 5000)
        f.write(b"\xff\xff")
    store = durable_backend()
    state = store.open()
    assert owed(state, "c0") == [other]
    assert owed(state, "c1") == owed(state, "c2") == []
    errors = events_at(log_events, LogLevel.error)
    assert len(errors) == 1 and errors[0]["lost_counts"]["outbound"] == 3
    assert errors[0]["lost_counts"]["messages"] == 1
    result_of(store.close())


def test_a_lost_reference_frame_does_not_cost_later_references(durable_backend, log_events):
    """A damaged "l" frame costs its session's references; the message itself stays for a
    session that was queued it after the checkpoint (a journal PutOutboundRef)."""
    message = big_message(20_000, "kept")
    store = fan_out(durable_backend, message, sessions=1)          # c0 owes it
    store, state = durable_backend.reopen(store, compact_bytes=10**9)  # checkpoint: m, l(c0)
    restored = owed(state, "c0")[0]              # the object the broker's queue holds
    durable_backend.write_all(store, [session("late")])
    durable_backend.write_all(store, [PutOutbound("late", OutboundRecord(1, restored, 1))])
    assert opcodec.decode(last_journal_record(durable_backend))[0].__class__ is PutOutboundRef
    abandon(store)
    path, start = checkpoint_path(durable_backend)
    with open(path, "rb") as f:
        data = f.read()
    frames = scan_frames(data, start, padding=durable_backend.kind == "dbm").frames
    offset = next(o for o, p in frames if safepickle.loads(p)[0] == "l")
    with open(path, "r+b") as f:
        f.seek(offset + RECORD_HEADER.size + 3)
        f.write(b"\xff\xff")
    store = durable_backend()
    state = store.open()
    assert owed(state, "c0") == []                     # its reference was in the frame
    assert owed(state, "late") == [message]
    assert len(events_at(log_events, LogLevel.error)) == 1
    result_of(store.close())


def checkpoint_path(backend):
    if backend.kind == "file":
        return os.path.join(backend.path, "snapshot.pkl"), filestore.SNAPSHOT_HEADER.size
    name = [n for n in os.listdir(backend.path) if n.endswith(".dat")][0]
    return os.path.join(backend.path, name), 0


def last_journal_record(backend):
    names = sorted(n for n in os.listdir(backend.path) if n.startswith("journal."))
    with open(os.path.join(backend.path, names[-1]), "rb") as f:
        data = f.read()
    return scan_frames(data, JOURNAL_HEADER.size).frames[-1][1]


def test_broker_restore_keeps_a_shared_message_shared_when_its_properties_are_mapped():
    """Stored messages go through the property mapping on restore; sessions that shared one
    still share the mapped copy (one object, not one per session)."""
    from mqttd.broker import Broker, BrokerConfig
    from mqttd.persistence.records import SessionRecord, StoredSession
    from twisted.internet.task import Clock

    shared = Message("t", b"x" * 1000, 1, properties=Properties(
        subscription_identifiers=(5,), topic_alias=3))   # an alias is never forwarded
    state = StoredState(sessions={
        cid: StoredSession(SessionRecord(cid), {1: OutboundRecord(1, shared, 1)})
        for cid in ("s1", "s2", "s3")})
    broker = Broker(Clock(), None, BrokerConfig())
    broker.restore(state)
    restored = [broker.sessions[cid].queue[0].message for cid in ("s1", "s2", "s3")]
    assert restored[0].properties.topic_alias is None
    assert restored[0].properties.subscription_identifiers == (5,)
    assert restored[1] is restored[0] and restored[2] is restored[0]


# --- older formats --------------------------------------------------------------------------

def legacy_state_items(state):
    """Checkpoint items as format 4 wrote them: a copy of the message per session."""
    for client_id, stored in state.sessions.items():
        yield "s", stored.record, tuple(sorted(stored.inbound_qos2))
        records = sorted(stored.outbound.values(), key=lambda r: r.seq)
        for start in range(0, len(records), journal.CHUNK):
            yield "o", client_id, tuple(records[start:start + journal.CHUNK])
    retained = tuple(state.retained.values())
    for start in range(0, len(retained), journal.CHUNK):
        yield "r", retained[start:start + journal.CHUNK]


def legacy_write(self, op):
    """JournaledStore.write as format 4 did: every PutOutbound carries its message."""
    apply_op(self._mirror, op)
    self._pending.append(op)
    if self._flush_call is None:
        self._flush_call = self._reactor.callLater(0, self._flush)


@pytest.fixture
def format4(monkeypatch):
    """Make the stores write format 4 (as the mqttd before the message table did)."""
    def patch():
        for module in (journal, filestore, dbmstore):
            monkeypatch.setattr(module, "FORMAT_VERSION", 4)
        monkeypatch.setattr(filestore, "state_items", legacy_state_items)
        monkeypatch.setattr(dbmstore, "state_items", legacy_state_items)
        monkeypatch.setattr(journal.JournaledStore, "write", legacy_write)
    return patch


def test_format_4_store_is_read_and_its_copies_become_one(durable_backend, format4, monkeypatch):
    """A format 4 checkpoint ("o" items, a copy per session) and journal (PutOutbound) load
    completely; equal copies become one shared object and the next checkpoint one copy."""
    format4()
    message = big_message(20_000)
    store = fan_out(durable_backend, message, sessions=50)
    result_of(store.close())                                # format 4 checkpoint
    old_size = checkpoint_bytes(durable_backend)
    assert old_size > 50 * 20_000
    store = durable_backend(compact_bytes=10**9)
    store.open()
    later = big_message(20_000, "later")
    durable_backend.write_all(store, [session("late")] + [
        PutOutbound(c, OutboundRecord(2 if c != "late" else 1, later, 1))
        for c in ("c0", "c1", "late")])
    abandon(store)                                          # format 4 journal after it
    with open(os.path.join(durable_backend.path, "journal.2"), "rb") as f:
        head = f.read(JOURNAL_HEADER.size)
    assert JOURNAL_HEADER.unpack(head)[1] == 4
    monkeypatch.undo()
    store = durable_backend()
    state = store.open()
    first = owed(state, "c0")[0]
    assert first == message and all(owed(state, f"c{i}")[0] is first for i in range(50))
    assert owed(state, "c0")[1] == later
    assert owed(state, "c0")[1] is owed(state, "c1")[1] is owed(state, "late")[0]
    result_of(store.close())
    assert checkpoint_bytes(durable_backend) < 2 * 20_000 + 300 * 51


def test_storetool_shows_one_stored_copy_for_many_sessions(durable_backend):
    """``mqttd store check|dump``: 200 messages owed, one stored; every record names its id."""
    import io
    import json

    from mqttd.persistence import storetool
    abandon(fan_out(durable_backend, big_message()))
    out = io.StringIO()
    assert storetool.main(["check", durable_backend.path], out=out) == 0
    assert (f"message table: 1 messages ({SIZE + 7} bytes) stored once for {SESSIONS} "
            f"queued/in-flight records") in out.getvalue()
    out = io.StringIO()
    assert storetool.main(["dump", durable_backend.path, "--json"], out=out) == 0
    document = json.loads(out.getvalue())
    ids = {o["message_id"] for s in document["sessions"].values() for o in s["outbound"]}
    assert len(ids) == 1 and None not in ids


# --- the compact journal form ---------------------------------------------------------------

def test_compact_form_round_trips_message_table_operations():
    """PutOutboundMessage and PutOutboundRef have compact forms (no pickle on the hot path)."""
    message = Message("t/\u00e9", b"\x00payload", 2, True, origin="pub", expires_at=12.5)
    ops = [PutOutboundMessage("c", OutboundRecord(3, message, 1), 2**40),
           PutOutboundRef("c\u00e9", 9, 2**40, 1, 65535, OutboundStage.PUBLISH_SENT),
           PutOutboundRef("c", 10, 3, 2)]
    payload = opcodec.encode(ops)
    assert payload is not None and opcodec.decode(payload) == ops
    with pytest.raises(ValueError):
        opcodec.decode(payload[:-1])


def test_message_table_operations_opcodec_cannot_carry_are_pickled():
    """Properties or a shared-subscription reference: the batch is pickled, and round-trips."""
    rich = Message("t", b"x", 1, properties=Properties(user_properties=(("k", "v"),)))
    for ops in ([PutOutboundMessage("c", OutboundRecord(1, rich, 1), 1)],
                [PutOutboundRef("c", 1, 1, 1, share="$share/g/t")]):
        assert opcodec.encode(ops) is None
        assert safepickle.loads(safepickle.dumps(ops)) == ops


# --- the broker ----------------------------------------------------------------------------

def pump(reactor, turns=10):
    for _ in range(turns):
        reactor.advance(0)


def run_synchronously(f, *args):
    return defer.maybeDeferred(f, *args)


@pytest.mark.parametrize("kind", ["memory", "file", "dbm"])
def test_broker_fan_out_to_offline_sessions_holds_one_copy(tmp_path, kind):
    """A 100 KB QoS 1 PUBLISH to 200 offline sessions: one object in every queue, one copy
    in the checkpoint, one shared object again after a restart."""
    from mqttd.broker import Broker, BrokerConfig
    from mqttd.codec.packets import Connect, Subscribe, Subscription
    from mqttd.persistence import store_from_spec

    from core.harness import FakeClient

    spec = "memory" if kind == "memory" else f"{kind}:{tmp_path / 'data'}"

    def broker_on(reactor):
        options = {} if kind == "memory" else {"run_in_thread": run_synchronously}
        broker = Broker(reactor, store_from_spec(spec, reactor, **options), BrokerConfig())
        broker.start()
        return broker

    reactor = MemoryReactorClock()
    broker = broker_on(reactor)
    for i in range(SESSIONS):
        sub = FakeClient(broker, reactor)
        sub.send(Connect(4, f"s{i}", False, 0), Subscribe(1, (Subscription("fan/#", 1),)))
        pump(reactor, 2)
        sub.drop()
    pub = FakeClient(broker, reactor)
    pub.send(Connect(4, "pub", True, 0))
    pub.publish("fan/out", os.urandom(SIZE), qos=1, packet_id=1)
    pump(reactor)
    queued = [broker.sessions[f"s{i}"].queue[0].message for i in range(SESSIONS)]
    assert all(m is queued[0] for m in queued)
    broker.stop()
    pump(reactor)
    if kind == "memory":
        return
    assert checkpoint_bytes(type("B", (), {"kind": kind, "path": str(tmp_path / "data")})) \
        < ONE_COPY
    reactor = MemoryReactorClock()
    again = broker_on(reactor)
    restored = [again.sessions[f"s{i}"].queue[0].message for i in range(SESSIONS)]
    assert restored[0] == queued[0]
    assert all(m is restored[0] for m in restored)
    again.stop()
    pump(reactor)
