"""Issue 7 fault 2: Will Delay Interval [MQTT-3.1.2-8], [MQTT-3.1.3-9], durable pending wills."""
from __future__ import annotations

import pytest

from mqttd.broker import Broker, BrokerConfig
from mqttd.codec.packets import Connack, Connect, Disconnect, Properties, Publish, Will
from mqttd.persistence import records as R
from mqttd.persistence.memory import MemoryStore

from tests.core.harness import FakeClient, make_broker


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def watcher(broker, clock, topic="w/#"):
    w = FakeClient(broker, clock, level=5)
    w.connect("watcher")
    w.subscribe(topic, qos=1)
    return w


def connect_with_will(broker, clock, client_id="w1", delay=10, expiry=300, qos=1, **will_kw):
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, client_id, False, 0, will=Will("w/t", b"gone", qos, properties=Properties(
        will_delay_interval=delay, **will_kw)),
        properties=Properties(session_expiry_interval=expiry)))
    clock.advance(0)  # a durable store acknowledges at the end of the turn
    assert isinstance(c.received()[0], Connack)
    return c


def resume(broker, clock, client_id="w1"):
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, client_id, False, 0, properties=Properties(session_expiry_interval=300)))
    clock.advance(0)
    (connack, *_rest) = c.received()
    return connack


class RecordingStore(MemoryStore):
    """A durable-looking memory store that applies every operation to a state."""

    durable = True

    def __init__(self, state=None):
        super().__init__()
        self.state = state if state is not None else R.StoredState()

    def open(self):
        from mqttd.persistence.journal import copy_state
        return copy_state(self.state)   # like the real stores: a copy

    def write(self, op):
        super().write(op)
        R.apply_op(self.state, op)


def test_will_waits_for_its_delay():
    """The will is published after the Will Delay Interval, not before [MQTT-3.1.2-8]."""
    broker, clock = make_broker()
    w = watcher(broker, clock)
    connect_with_will(broker, clock, delay=10).drop()
    clock.advance(9.9)
    assert publishes(w.received()) == []
    clock.advance(0.2)
    (p,) = publishes(w.received())
    assert p.payload == b"gone" and p.properties.will_delay_interval is None


def test_reconnect_in_time_cancels_the_will():
    """A new connection to the session before the delay: no will [MQTT-3.1.3-9]."""
    broker, clock = make_broker()
    w = watcher(broker, clock)
    connect_with_will(broker, clock, delay=10).drop()
    clock.advance(5)
    assert resume(broker, clock).session_present
    clock.advance(60)
    assert publishes(w.received()) == []
    assert len(broker.wills) == 0


def test_session_end_before_the_delay_publishes_the_will_then():
    """Session Expiry shorter than Will Delay: the will goes out when the session ends."""
    broker, clock = make_broker()
    w = watcher(broker, clock)
    connect_with_will(broker, clock, delay=100, expiry=3).drop()
    clock.advance(2.9)
    assert publishes(w.received()) == []
    clock.advance(0.2)
    assert [p.payload for p in publishes(w.received())] == [b"gone"]
    assert "w1" not in broker.sessions


def test_session_expiry_zero_publishes_the_delayed_will_at_once():
    """With Session Expiry 0 the session ends with the connection, so does the delay."""
    broker, clock = make_broker()
    w = watcher(broker, clock)
    connect_with_will(broker, clock, delay=100, expiry=0).drop()
    assert [p.payload for p in publishes(w.received())] == [b"gone"]


def test_clean_start_reconnect_ends_the_session_and_publishes_the_will():
    """Reconnecting with Clean Start 1 discards the session: its pending will goes out."""
    broker, clock = make_broker()
    w = watcher(broker, clock)
    connect_with_will(broker, clock, delay=100).drop()
    FakeClient(broker, clock, level=5).connect("w1", clean=True)
    assert [p.payload for p in publishes(w.received())] == [b"gone"]


def test_takeover_with_will_delay_and_resume_sends_no_will():
    """A takeover that resumes the session is a reconnect in time: no will."""
    broker, clock = make_broker()
    w = watcher(broker, clock)
    connect_with_will(broker, clock, delay=10)
    resume(broker, clock)
    clock.advance(30)
    assert publishes(w.received()) == []


def test_disconnect_with_will_message_respects_the_delay():
    """DISCONNECT 0x04 publishes the will, after its delay."""
    broker, clock = make_broker()
    w = watcher(broker, clock)
    c = connect_with_will(broker, clock, delay=5)
    c.send(Disconnect(0x04))
    assert publishes(w.received()) == []
    clock.advance(5)
    assert len(publishes(w.received())) == 1


def test_will_message_expiry_counts_from_publication():
    """The will's Message Expiry Interval starts when it is published (§3.1.3.2.4),
    and a queued copy is forwarded with the time it waited taken off [MQTT-3.3.2-6]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub", clean=False, properties=Properties(session_expiry_interval=300))
    sub.subscribe("w/#", qos=1)
    sub.drop()
    connect_with_will(broker, clock, delay=10, message_expiry_interval=20).drop()
    clock.advance(10)   # published now, expires 20 s later
    clock.advance(15)
    back = FakeClient(broker, clock, level=5)
    back.send(Connect(5, "sub", False, 0, properties=Properties(session_expiry_interval=300)))
    (p,) = publishes(back.received())
    assert p.properties.message_expiry_interval == 5


def test_pending_will_is_stored_and_deleted_when_published():
    """A delayed will of a persistent session is a store record until it fires."""
    store = RecordingStore()
    broker, clock = make_broker(store)
    connect_with_will(broker, clock, delay=10).drop()
    assert list(store.state.wills) == ["w1"]
    assert store.state.wills["w1"].publish_at == pytest.approx(clock.seconds() + 10)
    clock.advance(10)
    assert store.state.wills == {}


def test_pending_will_is_deleted_from_store_when_cancelled():
    """Reconnecting in time removes the stored will."""
    store = RecordingStore()
    broker, clock = make_broker(store)
    connect_with_will(broker, clock, delay=10).drop()
    resume(broker, clock)
    assert store.state.wills == {}


def test_pending_will_fires_on_time_after_a_restart():
    """A restarted broker re-arms the stored will for the time that is left."""
    store = RecordingStore()
    broker, clock = make_broker(store)
    connect_with_will(broker, clock, delay=10).drop()
    clock.advance(4)
    broker.shutdown()
    # a new broker process on the same store, 1 s later
    from twisted.internet.task import Clock
    clock2 = Clock()
    clock2.advance(clock.seconds() + 1)
    broker2 = Broker(clock2, store, BrokerConfig())
    broker2.restore(store.open())
    w = watcher(broker2, clock2)
    clock2.advance(4.9)
    assert publishes(w.received()) == []
    clock2.advance(0.2)
    assert [p.payload for p in publishes(w.received())] == [b"gone"]
    assert store.state.wills == {}


def test_will_overdue_after_a_restart_fires_at_once():
    """A will whose time passed while the broker was down goes out right after restore."""
    store = RecordingStore()
    broker, clock = make_broker(store)
    connect_with_will(broker, clock, delay=10).drop()
    broker.shutdown()
    from twisted.internet.task import Clock
    clock2 = Clock()
    clock2.advance(clock.seconds() + 100)
    broker2 = Broker(clock2, store, BrokerConfig())
    seen = []
    broker2.subscribe_local("w/#", seen.append)
    broker2.restore(store.open())
    clock2.advance(0)
    assert [m.payload for m in seen] == [b"gone"]


def test_sys_will_is_never_published_even_delayed():
    """A will to $SYS is refused at publication time too."""
    broker, clock = make_broker()
    seen = []
    broker.subscribe_local("$SYS/#", seen.append)
    c = FakeClient(broker, clock, level=5)
    c.connect("s1", clean=False, will=Will("$SYS/x", b"no", properties=Properties(
        will_delay_interval=1)), properties=Properties(session_expiry_interval=60))
    c.drop()
    clock.advance(2)
    assert seen == []


# --- any history: a model of [MQTT-3.1.2-8] / [MQTT-3.1.3-9] ------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NEVER = 0xFFFFFFFF
_action = st.one_of(
    st.just(("drop",)), st.just(("resume",)), st.just(("clean",)), st.just(("restart",)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 2, 3, 5, 8])))


@settings(max_examples=150, deadline=None)
@given(delay=st.sampled_from([0, 1, 3, 6]), expiry=st.sampled_from([0, 2, 5, NEVER]),
       actions=st.lists(_action, max_size=12))
def test_any_history_publishes_the_will_exactly_when_the_spec_says(delay, expiry, actions):
    """Drops, resumes, clean starts, time and restarts in any order: the will goes out after
    its delay or at the session's end, whichever first, never after a resume in time."""
    from twisted.internet.task import Clock
    store = RecordingStore()
    broker, clock = make_broker(store)
    published = []

    def attach(b):
        b.subscribe_local("w/#", lambda m: published.append(round(b.clock.seconds(), 3)))

    clock_now = [0.0]
    attach(broker)
    finite = None if expiry == NEVER else expiry
    # the model
    connected, session, due, ends, expected = False, False, None, None, []

    def connect(clean):
        nonlocal connected, session, due, ends
        resumed = session and not clean
        if due is not None and not resumed:
            expected.append(clock_now[0])   # the old session ends: its will goes now
        due = None if resumed or due is None else None
        ends = None
        connected, session = True, expiry > 0 or False
        c = FakeClient(broker, clock, level=5)
        c.send(Connect(5, "w1", clean, 0, will=Will("w/t", b"gone", 1, properties=Properties(
            will_delay_interval=delay)), properties=Properties(session_expiry_interval=expiry)))
        clock.advance(0)
        return c

    client = connect(True)
    for action in actions:
        kind = action[0]
        if kind == "drop" and connected:
            client.drop()
            connected = False
            if expiry == 0 or delay == 0:
                expected.append(clock_now[0])
            else:
                due = clock_now[0] + (delay if finite is None else min(delay, finite))
            if expiry == 0:
                session = False
            elif finite is not None:
                ends = clock_now[0] + finite
        elif kind in ("resume", "clean") and not connected:
            client = connect(kind == "clean")
        elif kind == "advance":
            target = clock_now[0] + action[1]
            if due is not None and due <= target:
                expected.append(due)
                due = None
            if ends is not None and ends <= target:
                session, ends = False, None
            clock_now[0] = target
            for _ in range(int(action[1] / 0.5)):   # task.Clock fires at the step's end
                clock.advance(0.5)
        elif kind == "restart":
            broker.shutdown()
            if connected:   # a graceful shutdown publishes no will; the session stays
                connected = False
                if expiry == 0:
                    session = False
                elif finite is not None:
                    ends = clock_now[0] + finite
            new_clock = Clock()
            new_clock.advance(clock.seconds())
            clock = new_clock
            broker = Broker(clock, store, BrokerConfig())
            attach(broker)
            broker.restore(store.open())
            clock.advance(0)
    assert published == [round(t, 3) for t in expected]
