"""No single packet monopolises the reactor (REVIEW finding 12): a SUBSCRIBE or
UNSUBSCRIBE carries at most --max-topic-filters-per-packet filters, retained replays
take a bounded number of steps per reactor turn, and an ACL reload re-checks the live
subscriptions in slices."""
from __future__ import annotations

import pytest

from mqttd.codec.packets import (
    Disconnect, Pingreq, Pingresp, Suback, Subscribe, Subscription, Unsuback, Unsubscribe)

from core.harness import FakeClient, make_broker


def _refusal_lines(events, what):
    return [e for e in events if e.get("what") == what]


# --- --max-topic-filters-per-packet -----------------------------------------------------

@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("level", [4, 5])
def test_a_packet_over_the_filter_limit_is_refused_and_others_keep_working(
        log_events, kind, level):
    """One SUBSCRIBE/UNSUBSCRIBE over the limit: v5 DISCONNECT 0x97 (v3: closed), counted,
    one rate-limited line; the limit itself passes; another client is untouched."""
    broker, clock = make_broker(max_topic_filters_per_packet=50)
    other = FakeClient(broker, clock)
    other.connect("other")
    client = FakeClient(broker, clock, level=level)
    client.connect("many")

    def packet(n, packet_id):
        if kind == "subscribe":
            return Subscribe(packet_id, tuple(Subscription(f"x/{i}/+", 1) for i in range(n)))
        return Unsubscribe(packet_id, tuple(f"x/{i}/+" for i in range(n)))

    client.send(packet(50, 1))                            # at the limit: served
    answer = client.received()
    assert isinstance(answer[0], Suback if kind == "subscribe" else Unsuback)
    client.send(packet(51, 2))
    packets = client.received()
    if level == 5:
        assert packets == [Disconnect(0x97, packets[0].properties)]
        assert "more than 50 topic filters" in packets[0].properties.reason_string
    else:
        assert packets == []
    assert client.disconnecting
    assert broker.stats.refused["max-topic-filters-per-packet"] == 1
    lines = _refusal_lines(log_events, "max-topic-filters-per-packet")
    assert len(lines) == 1 and lines[0]["client_id"] == "many"
    other.send(Pingreq())
    assert other.received() == [Pingresp()]


def test_the_filter_limit_is_1000_by_default_and_0_lifts_it():
    """A sane default (1000 filters per packet, as no client needs more in one packet);
    0 means no limit."""
    broker, clock = make_broker()
    assert broker.config.max_topic_filters_per_packet == 1000
    client = FakeClient(broker, clock, level=5)
    client.connect("c")
    client.send(Subscribe(1, tuple(Subscription(f"a/{i}", 0) for i in range(1001))))
    assert client.received()[0].reason_code == 0x97
    broker, clock = make_broker(max_topic_filters_per_packet=0)
    client = FakeClient(broker, clock, level=5)
    client.connect("c")
    client.send(Subscribe(1, tuple(Subscription(f"a/{i}", 0) for i in range(3000))))
    clock.advance(0)                                     # handled in slices (see below)
    assert len(client.received()[0].reason_codes) == 3000


# --- retained replay: a bounded number of steps per reactor turn ------------------------

def _retain(broker, n, prefix="r"):
    from mqttd.messages import Message
    for i in range(n):
        broker.publish(Message(f"{prefix}/{i}", b"v", retain=True))


def _publishes(client):
    from mqttd.codec.packets import Publish
    return [p.topic for p in client.received() if isinstance(p, Publish)]


def test_a_big_retained_replay_yields_to_the_reactor_between_slices(monkeypatch):
    """A '#' subscription over many retained messages is replayed REPLAY_STEPS_PER_TURN
    steps per reactor turn, all of them, in order, the SUBACK first."""
    import mqttd.retaining
    monkeypatch.setattr(mqttd.retaining, "REPLAY_STEPS_PER_TURN", 100)
    broker, clock = make_broker()
    _retain(broker, 250)
    client = FakeClient(broker, clock)
    client.connect("all")
    packets = client.subscribe("#")
    assert isinstance(packets[0], Suback)
    got = [p.topic for p in packets[1:]]
    assert 0 < len(got) < 100                            # this turn's budget of steps
    assert [c.getTime() for c in clock.getDelayedCalls()] == [0]   # the rest: next turn
    clock.advance(0)            # task.Clock runs the turns scheduled meanwhile as well
    got += _publishes(client)
    assert got == [f"r/{i}" for i in range(250)]
    assert broker._replay_call is None and not broker._replay_waiting


def test_replay_steps_that_send_nothing_are_bounded_too(monkeypatch):
    """Cursors that match nothing and retained messages the ACL hides cost steps without
    writing a byte: they count against the same budget per turn."""
    import mqttd.retaining
    monkeypatch.setattr(mqttd.retaining, "REPLAY_STEPS_PER_TURN", 100)
    broker, clock = make_broker()
    _retain(broker, 300, prefix="hidden")
    _retain(broker, 1, prefix="shown")
    broker.authorize_forward = lambda client, message: message.topic.startswith("shown/")
    client = FakeClient(broker, clock)
    client.connect("c")
    client.send(Subscribe(1, tuple(Subscription(f"none/{i}", 0) for i in range(150))
                          + (Subscription("#", 0),)))
    assert [type(p) for p in client.received()] == [Suback]
    session = broker.sessions["c"]
    assert len(session.replays) == 51                    # 100 steps: 100 empty cursors done
    for _ in range(10):
        clock.advance(0)
    assert not session.replays
    assert _publishes(client) == ["shown/0"]


def test_a_replay_waiting_for_the_next_turn_is_dropped_with_its_session(monkeypatch):
    """A client that leaves while its replay waits for the next turn costs nothing more."""
    import mqttd.retaining
    monkeypatch.setattr(mqttd.retaining, "REPLAY_STEPS_PER_TURN", 10)
    broker, clock = make_broker()
    _retain(broker, 50)
    client = FakeClient(broker, clock)
    client.connect("gone")
    client.subscribe("#")
    client.drop()
    clock.advance(0)
    assert "gone" not in broker.sessions
    assert not broker._replay_waiting and broker._replay_call is None


# --- ACL reload: live subscriptions re-checked in slices --------------------------------

class _Rules:
    """An authorizer whose revalidate_subscription allows what ``allowed`` says."""

    def __init__(self):
        self.allowed = lambda topic_filter: True
        self.checked = 0

    def revalidate_subscription(self, client, topic_filter):
        self.checked += 1
        return self.allowed(topic_filter)


def test_the_recheck_after_an_acl_reload_takes_a_slice_per_reactor_turn(monkeypatch):
    """Re-checking every live subscription after a reload is spread over reactor turns;
    all are checked, the forbidden ones removed, the count reported at the end."""
    import mqttd.subscriptions
    monkeypatch.setattr(mqttd.subscriptions, "RECHECKS_PER_TURN", 40)
    broker, clock = make_broker()
    rules = _Rules()
    broker.authorizer = rules
    clients = []
    for c in range(3):
        client = FakeClient(broker, clock)
        client.connect(f"c{c}")
        client.subscribe(*[f"t/{i}" for i in range(50)])
        clients.append(client)
    rules.allowed = lambda topic_filter: not topic_filter.endswith("7")
    removed = []
    broker.recheck_subscriptions().addCallback(removed.append)
    assert rules.checked == 40 and removed == []
    clients[1].drop()                                    # gone before its turn: skipped
    clock.advance(0)
    assert removed == [10]                               # 5 of c0, 5 of c2
    assert all(f"t/{i}" not in broker.sessions[c].subscriptions
               for c in ("c0", "c2") for i in (7, 17, 27, 37, 47))
    assert len(broker.sessions["c2"].subscriptions) == 45


# --- a long SUBSCRIBE (the filter limit lifted) is handled in slices --------------------

def _slicing(monkeypatch, per_turn=10):
    import mqttd.subscribing  # the module of ClientConnection that slices
    monkeypatch.setattr(mqttd.subscribing, "FILTERS_PER_TURN", per_turn)


def test_a_long_subscribe_is_handled_a_slice_per_turn_and_keeps_the_order(monkeypatch):
    """With the limit lifted, a SUBSCRIBE of many filters takes FILTERS_PER_TURN per
    reactor turn; other clients are served in between; its one SUBACK comes before the
    retained messages and before the answer to the packet that followed it."""
    from mqttd.codec import encode
    from mqttd.codec.packets import Publish
    from mqttd.messages import Message
    _slicing(monkeypatch)
    broker, clock = make_broker(max_topic_filters_per_packet=0)
    broker.publish(Message("x/3/r", b"retained", retain=True))
    other = FakeClient(broker, clock)
    other.connect("other")
    client = FakeClient(broker, clock)
    client.connect("many")
    subscribe = Subscribe(7, tuple(Subscription(f"x/{i}/+", 1) for i in range(35)))
    client.send_bytes(encode(subscribe, 4) + encode(Pingreq(), 4))
    assert client.received() == []                       # one slice done, nothing answered
    assert len(broker.sessions["many"].subscriptions) == 10
    other.send(Pingreq())
    assert other.received() == [Pingresp()]              # served between the slices
    clock.advance(0)
    packets = client.received()
    assert [type(p) for p in packets] == [Suback, Publish, Pingresp]
    assert packets[0] == Suback(7, (1,) * 35)
    assert packets[1].topic == "x/3/r" and packets[1].retain
    assert len(broker.sessions["many"].subscriptions) == 35


def test_a_long_subscribe_waits_for_the_hook_of_each_slice(monkeypatch):
    """Deferred answers of authorize_subscribe are awaited slice by slice; a refusal
    among them is its filter's code in the one SUBACK."""
    from twisted.internet import defer
    _slicing(monkeypatch)
    broker, clock = make_broker(max_topic_filters_per_packet=0)
    waiting = []

    def authorize_subscribe(client, topic_filter, qos):
        d = defer.Deferred()
        waiting.append((d, topic_filter != "x/12"))
        return d
    broker.authorize_subscribe = authorize_subscribe
    client = FakeClient(broker, clock, level=5)
    client.connect("hooked")
    client.send(Subscribe(1, tuple(Subscription(f"x/{i}", 0) for i in range(25))))
    for _ in range(10):                                  # bounded
        for d, allowed in waiting:
            if not d.called:
                d.callback(allowed)
        clock.advance(0)
    (suback,) = client.received()
    assert suback.reason_codes == tuple(0x87 if i == 12 else 0 for i in range(25))


def test_a_client_that_leaves_during_a_long_subscribe_costs_nothing_more(monkeypatch):
    """The slices stop with the connection; no error, no subscription left behind."""
    _slicing(monkeypatch)
    broker, clock = make_broker(max_topic_filters_per_packet=0)
    client = FakeClient(broker, clock)
    client.connect("gone")
    client.send(Subscribe(1, tuple(Subscription(f"x/{i}", 0) for i in range(35))))
    client.drop()
    clock.advance(0)
    assert "gone" not in broker.sessions
    assert broker._trie.match("x/20") == []


@pytest.mark.parametrize("level", [4, 5])
def test_a_long_unsubscribe_is_handled_a_slice_per_turn_and_keeps_the_order(monkeypatch,
                                                                            level):
    """With the limit lifted, an UNSUBSCRIBE of many filters takes FILTERS_PER_TURN per
    turn; its UNSUBACK (a code per filter in v5) comes before the next packet's answer."""
    from mqttd.codec import encode
    _slicing(monkeypatch)
    broker, clock = make_broker(max_topic_filters_per_packet=0)
    client = FakeClient(broker, clock, level=level)
    client.connect("many")
    client.subscribe(*[f"x/{i}" for i in range(30)])
    clock.advance(0)
    client.received()
    unsubscribe = Unsubscribe(9, tuple(f"x/{i}" for i in range(35)))
    client.send_bytes(encode(unsubscribe, level) + encode(Pingreq(), level))
    assert client.received() == []
    assert len(broker.sessions["many"].subscriptions) == 20
    clock.advance(0)
    unsuback, pingresp = client.received()
    assert pingresp == Pingresp()
    if level == 5:
        assert unsuback.reason_codes == (0,) * 30 + (0x11,) * 5
    else:
        assert unsuback.packet_id == 9
    assert not broker.sessions["many"].subscriptions


def test_one_replay_step_walks_a_bounded_part_of_a_wide_retained_index(monkeypatch):
    """'+/match' over many retained topics that do not match: the cursor pauses every
    REPLAY_NODES_PER_STEP nodes, so the walk itself is spread over turns too."""
    import mqttd.retaining
    monkeypatch.setattr(mqttd.retaining, "REPLAY_STEPS_PER_TURN", 50)
    broker, clock = make_broker()
    assert broker.retained.pause_every == mqttd.retaining.REPLAY_NODES_PER_STEP == 16
    _retain(broker, 2000, prefix="wide")                  # wide/0 .. wide/1999
    from mqttd.messages import Message
    broker.publish(Message("wide/1999/match", b"m", retain=True))
    client = FakeClient(broker, clock)
    client.connect("c")
    client.subscribe("wide/+/match")
    session = broker.sessions["c"]
    assert session.replays                                # 50 steps of 16 nodes: not done
    assert broker._replay_call is not None
    clock.advance(0)
    assert not session.replays
    assert _publishes(client) == ["wide/1999/match"]
    assert broker.retained.match("wide/+/match") == [broker.retained.get("wide/1999/match")]


def test_a_client_is_not_idle_while_its_long_subscribe_is_handled(monkeypatch):
    """Its keepalive runs from the last slice, not from the packet's arrival: a SUBSCRIBE
    that takes the broker longer than 1.5 keepalives does not cost the client its
    connection."""
    from twisted.internet import defer

    from mqttd.codec.packets import Disconnect
    _slicing(monkeypatch)
    broker, clock = make_broker(max_topic_filters_per_packet=0)
    answers = []

    def authorize_subscribe(client, topic_filter, qos):
        answers.append(defer.Deferred())
        return answers[-1]
    broker.authorize_subscribe = authorize_subscribe
    client = FakeClient(broker, clock, level=5)
    client.connect("slow", keepalive=10)
    client.send(Subscribe(1, tuple(Subscription(f"x/{i}", 0) for i in range(25))))
    for _ in range(3):                                   # each slice's hook takes 8 s
        clock.advance(8)
        for d in answers:
            if not d.called:
                d.callback(True)
        clock.advance(0)
    packets = client.received()
    assert [type(p) for p in packets] == [Suback]
    assert not any(isinstance(p, Disconnect) for p in packets)
    assert not client.disconnecting
