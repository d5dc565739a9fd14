"""Subscription changes and session (dis)connections are journaled as deltas (REVIEW-S9 R15).

Format 5 journals a SUBSCRIBE as one ``PutSubscription`` per filter, an UNSUBSCRIBE as one
``DeleteSubscription`` per filter and a (re)connect / close as ``PutSessionState`` (the
session's fields without its subscriptions), so the bytes written per change do not grow
with the session's subscription count.  Stores written in format 4 (whole-record
``PutSession`` only) still open.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqttd.messages import Message
from mqttd.persistence import safepickle, storetool
from mqttd.persistence.journal import JOURNAL_HEADER
from mqttd.persistence.records import (
    FORMAT_VERSION, AddInboundQos2, DeleteSession, DeleteSubscription, OutboundRecord,
    PutOutbound, PutRetained, PutSession, PutSessionState, PutSubscription, PutWill,
    SessionRecord, StoredState, SubscriptionRecord, WillRecord)

from .storehelpers import StoreMaker, abandon, reference_state, result_of

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# --- the operations of the format 4 fixtures (see fixtures/make_format4.py) --------------

_SUBS_A = (SubscriptionRecord("a/#", 1), SubscriptionRecord("b/+/c", 0),
           SubscriptionRecord("$share/g/s/t", 2, subscription_identifier=7),
           SubscriptionRecord("v5/opts", 1, True, True, 2, 12))

FORMAT4_OPS = [
    PutSession(SessionRecord("old-v3", 4, _SUBS_A[:2], None, 1000.5, "alice")),
    PutSession(SessionRecord("old-v5", 5, _SUBS_A, 3600, None, None)),
    PutSession(SessionRecord("gone", 4, (SubscriptionRecord("x/y", 1),))),
    PutOutbound("old-v3", OutboundRecord(1, Message("a/1", b"one", 1), 1)),
    PutOutbound("old-v3", OutboundRecord(2, Message("a/2", b"two", 1), 1, 5)),
    AddInboundQos2("old-v5", 9),
    PutRetained(Message("r/1", b"kept", 1, True)),
    PutWill(WillRecord("old-v5", Message("will/t", b"bye", 1), 2000.0)),
    # FORMAT4_SPLIT: the checkpoint holds the above, the journal what follows
    PutSession(SessionRecord("old-v3", 4, _SUBS_A[:2] + (SubscriptionRecord("new/#", 2),),
                             None, None, "alice")),
    PutSession(SessionRecord("old-v5", 5, _SUBS_A[1:], 3600, 1500.25, None)),
    DeleteSession("gone"),
    PutSession(SessionRecord("late", 4, (SubscriptionRecord("l/1", 0),
                                         SubscriptionRecord("l/2", 1)))),
    PutOutbound("late", OutboundRecord(1, Message("l/2", b"q", 1), 1)),
]
FORMAT4_SPLIT = 8


# --- the operations --------------------------------------------------------------------

def test_subscription_deltas_change_one_filter_and_keep_the_rest():
    """PutSubscription adds or replaces one filter in place, DeleteSubscription removes one."""
    state = reference_state([
        PutSession(SessionRecord("c", 5, _SUBS_A, 60, None, "u")),
        PutOutbound("c", OutboundRecord(1, Message("a/1", b"x", 1), 1)),
        PutSubscription("c", SubscriptionRecord("b/+/c", 2)),     # replaced, same place
        PutSubscription("c", SubscriptionRecord("z", 1)),         # added at the end
        DeleteSubscription("c", "a/#"),
        DeleteSubscription("c", "never/subscribed"),
    ])
    stored = state.sessions["c"]
    assert stored.record == SessionRecord(
        "c", 5, (SubscriptionRecord("b/+/c", 2),) + _SUBS_A[2:] + (SubscriptionRecord("z", 1),),
        60, None, "u")
    assert list(stored.outbound) == [1]


def test_session_state_keeps_the_subscriptions_and_what_the_session_owes():
    """PutSessionState replaces the session's fields but its subscriptions, queue, QoS 2 ids."""
    state = reference_state([
        PutSession(SessionRecord("c", 4, _SUBS_A[:2], None, None, "u")),
        PutSubscription("c", SubscriptionRecord("n", 1)),
        PutOutbound("c", OutboundRecord(1, Message("a/1", b"x", 1), 1)),
        AddInboundQos2("c", 3),
        PutSessionState("c", 5, 30, 99.5, "v"),
    ])
    stored = state.sessions["c"]
    assert stored.record == SessionRecord("c", 5, _SUBS_A[:2] + (SubscriptionRecord("n", 1),),
                                          30, 99.5, "v")
    assert list(stored.outbound) == [1] and stored.inbound_qos2 == {3}


def test_session_state_of_an_unknown_session_creates_it_without_subscriptions():
    """PutSessionState of a client id the store lacks creates the session (as PutSession did)."""
    state = reference_state([PutSessionState("new", 4, None, 5.0, None),
                             PutSubscription("ghost", SubscriptionRecord("g", 1)),
                             DeleteSubscription("ghost", "g")])
    assert state.sessions["new"].record == SessionRecord("new", 4, (), None, 5.0, None)
    assert "ghost" not in state.sessions  # deltas of an unknown session are ignored


def test_delta_operations_are_idempotent():
    """Applying each delta twice gives the same state (journal replay over a checkpoint)."""
    ops = [PutSession(SessionRecord("c", 4, _SUBS_A)),
           PutSubscription("c", SubscriptionRecord("z", 1)), DeleteSubscription("c", "a/#"),
           PutSessionState("c", 5, 10, 1.0, None)]
    twice = [op for op in ops for _ in (0, 1)]
    assert reference_state(twice) == reference_state(ops)


def test_stored_session_pickles_with_its_applied_deltas():
    """A StoredSession changed by deltas pickles (safepickle) as its current record."""
    state = reference_state([PutSession(SessionRecord("c", 4, _SUBS_A)),
                             PutSubscription("c", SubscriptionRecord("z", 1))])
    copy = safepickle.loads(safepickle.dumps(state))
    assert copy == state
    assert copy.sessions["c"].record.subscriptions[-1] == SubscriptionRecord("z", 1)


# --- old formats -------------------------------------------------------------------------

def _fixture(kind: str, tmp_path) -> StoreMaker:
    path = str(tmp_path / f"format4-{kind}")
    shutil.copytree(os.path.join(FIXTURES, f"format4-{kind}"), path)
    return StoreMaker(kind, path)


@pytest.mark.parametrize("kind", ["file", "dbm"])
def test_a_format_4_store_opens_to_the_state_its_operations_mean(kind, tmp_path):
    """A data directory written by mqttd with format 4 (checkpoint + journal of
    whole-record PutSession operations) opens unchanged, and takes deltas after."""
    maker = _fixture(kind, tmp_path)
    store = maker()
    assert store.open() == reference_state(FORMAT4_OPS)
    more = [PutSubscription("old-v3", SubscriptionRecord("after/upgrade", 1)),
            DeleteSubscription("old-v5", "b/+/c"), PutSessionState("late", 4, None, 7.0, None)]
    maker.write_all(store, more)
    store, state = maker.reopen(store)
    assert state == reference_state(FORMAT4_OPS + more)
    result_of(store.close())
    store = maker()                      # once more from the checkpoint close() wrote
    assert store.open() == reference_state(FORMAT4_OPS + more)
    result_of(store.close())


@pytest.mark.parametrize("kind", ["file", "dbm"])
def test_store_tool_checks_and_dumps_a_format_4_store(kind, tmp_path):
    """``mqttd store check|dump`` read a format 4 directory: intact, every subscription listed."""
    maker = _fixture(kind, tmp_path)
    out = io.StringIO()
    assert storetool.main(["check", maker.path], out=out) == 0, out.getvalue()
    assert "3 sessions" in out.getvalue() and "intact" in out.getvalue()
    out = io.StringIO()
    assert storetool.main(["dump", maker.path], out=out) == 0
    assert "subscription 'new/#' qos=2" in out.getvalue()
    assert "'gone'" not in out.getvalue()


@pytest.mark.parametrize("kind", ["file", "dbm"])
def test_store_tool_dumps_the_subscriptions_of_format_5_deltas(kind, tmp_path):
    """``mqttd store dump`` replays the deltas of a killed broker's journal."""
    maker = StoreMaker(kind, str(tmp_path / "data"))
    store = maker()
    store.open()
    maker.write_all(store, [PutSession(SessionRecord("c", 4, _SUBS_A[:1])),
                            PutSubscription("c", SubscriptionRecord("d/1", 1)),
                            DeleteSubscription("c", "a/#"), PutSessionState("c", 4, None, 3.0)])
    abandon(store)
    out = io.StringIO()
    assert storetool.main(["dump", maker.path, "--json"], out=out) == 0
    dumped = json.loads(out.getvalue())["sessions"]["c"]
    assert dumped["subscriptions"] == [{"filter": "d/1", "qos": 1}]
    assert dumped["disconnected_at"] == 3.0


def test_journal_header_names_the_format_with_deltas(tmp_path):
    """New journals say format 5 (an mqttd reading 1..4 refuses them clearly)."""
    assert FORMAT_VERSION >= 5
    maker = StoreMaker("file", str(tmp_path / "data"))
    store = maker()
    store.open()
    maker.write_all(store, [PutSessionState("c", 4)])
    abandon(store)
    with open(os.path.join(maker.path, "journal.1"), "rb") as f:
        assert JOURNAL_HEADER.unpack(f.read(JOURNAL_HEADER.size))[1] == FORMAT_VERSION


def test_a_damaged_session_record_keeps_the_later_subscription_deltas(tmp_path):
    """After damage, a delta of a session whose record was lost is kept (orphan), not dropped."""
    from mqttd.persistence.journal import replay_batches
    state, orphans = StoredState(), set()
    replay_batches(state, [[PutSubscription("c", SubscriptionRecord("k", 1))]], True, orphans)
    assert orphans == {"c"}
    assert state.sessions["c"].record.subscriptions == (SubscriptionRecord("k", 1),)


# --- property: deltas mean what the whole records meant ---------------------------------

_FILTERS = ["a/#", "b/+", "c", "$share/g/d", "e/f/g"]
_action = st.one_of(
    st.tuples(st.just("sub"), st.sampled_from(_FILTERS), st.integers(0, 2)),
    st.tuples(st.just("unsub"), st.sampled_from(_FILTERS)),
    st.tuples(st.just("state"), st.sampled_from([4, 5]), st.one_of(st.none(), st.integers(1, 9)),
              st.one_of(st.none(), st.floats(0, 1e9)), st.sampled_from([None, "u"])),
    st.sampled_from(["reopen", "crash", "compact"]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["file", "dbm"]),
       actions=st.lists(st.tuples(st.sampled_from(["p", "q"]), _action), max_size=40))
def test_deltas_restore_exactly_what_whole_records_did(kind, actions):
    """Whatever subscribe/unsubscribe/(dis)connect history, restarts and compactions, a store
    fed the format 5 deltas reopens to the sessions the format 4 whole records describe."""
    with tempfile.TemporaryDirectory() as tmp:
        maker = StoreMaker(kind, os.path.join(tmp, "data"))
        store = maker(compact_bytes=800)
        store.open()
        live = {cid: SessionRecord(cid) for cid in ("p", "q")}
        subs = {cid: {} for cid in live}
        whole = [PutSession(record) for record in live.values()]
        maker.write_all(store, whole)
        for cid, action in actions:
            if action in ("reopen", "crash"):
                if action == "reopen":
                    result_of(store.close())
                else:
                    result_of(store.sync())
                    abandon(store)
                store = maker(compact_bytes=800)
                assert store.open() == reference_state(whole)
                continue
            if action == "compact":
                result_of(store._start_compaction(final=False))
                continue
            if action[0] == "sub":
                sub = SubscriptionRecord(action[1], action[2])
                subs[cid][sub.topic_filter] = sub
                store.write(PutSubscription(cid, sub))
            elif action[0] == "unsub":
                if subs[cid].pop(action[1], None) is not None:
                    store.write(DeleteSubscription(cid, action[1]))
            else:
                live[cid] = attrs.evolve(live[cid], protocol_level=action[1],
                                         expiry_interval=action[2], disconnected_at=action[3],
                                         owner=action[4])
                store.write(PutSessionState.of(live[cid]))
            live[cid] = attrs.evolve(live[cid], subscriptions=tuple(subs[cid].values()))
            whole.append(PutSession(live[cid]))
        result_of(store.close())
        store = maker()
        assert store.open() == reference_state(whole)
        result_of(store.close())


# --- the broker writes deltas: bytes per change do not grow with the subscriptions -----

HEAVY = 10_000


@pytest.fixture(params=["file", "dbm"])
def heavy(request, tmp_path):
    """A broker on a durable store whose v5 session "heavy" (offline) has 10,000 filters."""
    world = _World(request.param, str(tmp_path / "data"))
    client = world.connect("heavy")
    for k in range(HEAVY // 1000):
        client.subscribe(*[f"dev/{k}/{i}/+" for i in range(1000)], qos=1, packet_id=k + 1)
        world.clock.advance(0)
    assert len(world.broker.sessions["heavy"].subscriptions) == HEAVY
    client.drop()
    world.clock.advance(0)
    yield world
    world.close()


class _World:
    def __init__(self, kind: str, path: str):
        from twisted.internet.task import Clock

        from mqttd.broker import Broker, BrokerConfig
        self.kind, self.path = kind, path
        self.clock = Clock()
        self.store = StoreMaker(kind, path, self.clock)()
        self.broker = Broker(self.clock, self.store, BrokerConfig())
        self.broker.restore(self.store.open())

    def connect(self, client_id: str):
        from core.harness import FakeClient

        from mqttd.codec.packets import Connack, Properties
        client = FakeClient(self.broker, self.clock, level=5)
        client.connect(client_id, clean=False, expect_ok=False,
                       properties=Properties(session_expiry_interval=3600))
        self.clock.advance(0)                 # the CONNACK waits for the store
        assert isinstance(client.received()[0], Connack)
        return client

    def journal_bytes_of(self, action) -> int:
        before = self.store._written
        action()
        self.clock.advance(0)                 # the turn's batch is written
        return self.store._written - before

    def restart(self):
        from mqttd.broker import Broker, BrokerConfig
        result_of(self.store.close())
        self.store = StoreMaker(self.kind, self.path, self.clock)()
        self.broker = Broker(self.clock, self.store, BrokerConfig())
        self.broker.restore(self.store.open())

    def close(self):
        result_of(self.store.close())


def test_a_reconnect_of_a_10000_filter_session_writes_under_2_kb(heavy):
    """CONNECT + close of a session with 10,000 subscriptions journals its state, not them
    (REVIEW-S9 R15: 378 KB per reconnect); the session resumes with every filter."""
    def reconnect():
        client = heavy.connect("heavy")
        client.drop()
    assert heavy.journal_bytes_of(reconnect) < 2048
    session = heavy.broker.sessions["heavy"]
    assert len(session.subscriptions) == HEAVY and session.disconnected_at is not None


def test_one_subscribe_or_unsubscribe_in_a_10000_filter_session_writes_under_2_kb(heavy):
    """A 13-byte SUBSCRIBE (or UNSUBSCRIBE) journals one filter, not all 10,000
    (REVIEW-S9 R15: 51 KB per SUBSCRIBE); a restart restores the changed set exactly."""
    from mqttd.codec.packets import Unsubscribe
    client = heavy.connect("heavy")
    assert heavy.journal_bytes_of(lambda: client.subscribe("dev/0/0/+", qos=2)) < 2048
    assert heavy.journal_bytes_of(lambda: client.subscribe("new/one", qos=0)) < 2048
    assert heavy.journal_bytes_of(lambda: client.send(Unsubscribe(9, ("dev/9/999/+",)))) < 2048
    expected = dict(heavy.broker.sessions["heavy"].subscriptions)
    assert expected["dev/0/0/+"].qos == 2 and "dev/9/999/+" not in expected
    client.drop()
    heavy.clock.advance(0)
    heavy.restart()
    assert heavy.broker.sessions["heavy"].subscriptions == expected


def test_a_v5_disconnect_with_a_new_expiry_writes_under_2_kb(heavy):
    """DISCONNECT's Session Expiry Interval [MQTT-3.14.2-2] is stored without the filters."""
    from mqttd.codec.packets import Disconnect, Properties
    client = heavy.connect("heavy")
    nbytes = heavy.journal_bytes_of(
        lambda: client.send(Disconnect(0, Properties(session_expiry_interval=60))))
    assert nbytes < 2048
    heavy.restart()
    session = heavy.broker.sessions["heavy"]
    assert session.expiry_interval == 60 and len(session.subscriptions) == HEAVY


def test_subscriptions_after_reconnects_and_a_kill_are_restored_exactly(tmp_path):
    """Deltas written by the broker (subscribe, replace, unsubscribe, reconnect) and a
    killed process: the restarted broker has exactly the subscriptions acknowledged."""
    from mqttd.codec.packets import Unsubscribe
    world = _World("file", str(tmp_path / "data"))
    client = world.connect("k")
    client.subscribe("a/#", "b/+", "c", qos=1)
    client.subscribe("$share/g/s", qos=2, packet_id=2, no_local=False)
    world.clock.advance(0)
    client.drop()
    world.clock.advance(0)
    client = world.connect("k")
    client.subscribe("b/+", qos=0, packet_id=3, retain_as_published=True)
    client.send(Unsubscribe(4, ("a/#",)))
    world.clock.advance(0)
    expected = dict(world.broker.sessions["k"].subscriptions)
    abandon(world.store)                      # kill -9: no final checkpoint
    world.store = StoreMaker("file", world.path, world.clock)()
    from mqttd.broker import Broker, BrokerConfig
    world.broker = Broker(world.clock, world.store, BrokerConfig())
    world.broker.restore(world.store.open())
    assert world.broker.sessions["k"].subscriptions == expected
    assert list(expected) == ["b/+", "c", "$share/g/s"]
    world.close()


_BROKER_FILTERS = ["a/#", "b/+", "c", "$share/g/d", "e/+/f"]
_broker_step = st.one_of(
    st.tuples(st.just("subscribe"), st.lists(st.tuples(st.sampled_from(_BROKER_FILTERS),
                                                       st.integers(0, 2)),
                                             min_size=1, max_size=3)),
    st.tuples(st.just("unsubscribe"), st.lists(st.sampled_from(_BROKER_FILTERS),
                                               min_size=1, max_size=3)),
    st.sampled_from([("reconnect",), ("restart",), ("kill",)]),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["file", "dbm"]), steps=st.lists(_broker_step, max_size=12))
def test_a_broker_restarted_after_any_history_has_the_acknowledged_subscriptions(kind, steps):
    """SUBSCRIBE / UNSUBSCRIBE / reconnect / restart / kill in any order: the session
    the restarted broker restores has exactly the subscriptions, in the order, that the
    live broker had (what whole records stored) -- the deltas lose and invent nothing."""
    from mqttd.codec.packets import Subscribe, Subscription, Unsubscribe
    with tempfile.TemporaryDirectory() as tmp:
        world = _World(kind, os.path.join(tmp, "data"))
        client = world.connect("h")
        pid = 0
        for step in steps:
            pid += 1
            if step[0] == "subscribe":
                client.send(Subscribe(pid, tuple(Subscription(f, q) for f, q in step[1])))
            elif step[0] == "unsubscribe":
                client.send(Unsubscribe(pid, tuple(step[1])))
            world.clock.advance(0)
            expected = list(world.broker.sessions["h"].subscriptions.items())
            if step[0] == "reconnect":
                client.drop()
                world.clock.advance(0)
                client = world.connect("h")
            elif step[0] in ("restart", "kill"):
                if step[0] == "kill":
                    abandon(world.store)
                    world.store = StoreMaker(kind, world.path, world.clock)()
                    from mqttd.broker import Broker, BrokerConfig
                    world.broker = Broker(world.clock, world.store, BrokerConfig())
                    world.broker.restore(world.store.open())
                else:
                    client.drop()
                    world.clock.advance(0)
                    world.restart()
                assert list(world.broker.sessions["h"].subscriptions.items()) == expected
                client = world.connect("h")
        client.drop()
        world.clock.advance(0)
        expected = list(world.broker.sessions["h"].subscriptions.items())
        world.restart()
        assert list(world.broker.sessions["h"].subscriptions.items()) == expected
        world.close()
