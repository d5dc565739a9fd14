"""Queue byte accounting uses what a message holds: topic + payload + MQTT 5 properties.

REVIEW-S9 R5: 40 PUBLISHes with a 1-byte payload and 3.9 MB of User Properties each were
queued for an offline subscriber as 5-byte messages, past --max-queued-bytes and
--max-queued-bytes-total, the slow-consumer mark, and every queued_bytes figure.
"""
from __future__ import annotations

import pickle

import attrs
import pytest

from mqttd.codec.packets import Properties, Publish
from mqttd.messages import Message, message_size, properties_size
from mqttd.persistence import safepickle
from mqttd.persistence.records import OutboundRecord
from mqttd.session import QueueLedger, QueueLimits, Session
from mqttd.systopics import BROKER, SysTopics

from core.harness import FakeClient, make_broker

#: 10 User Properties of 5,000-byte values: ~50 KB per message, 1-byte payload
HEAVY_USER = Properties(user_properties=tuple(("k%d" % i, "v" * 5000) for i in range(10)))

#: each kind of property a PUBLISH forwards, ~20 KB of it
HEAVY = {
    "user_properties": HEAVY_USER,
    "correlation_data": Properties(correlation_data=b"c" * 20_000),
    "response_topic": Properties(response_topic="r/" + "t" * 20_000),
    "content_type": Properties(content_type="x" * 20_000),
}


def offline_v5_subscriber(broker, clock, client_id="sub", qos=1):
    c = FakeClient(broker, clock, level=5)
    c.connect(client_id, clean=False, properties=Properties(session_expiry_interval=3600))
    c.subscribe("t/#", qos=qos)
    c.drop()


def v5_publisher(broker, clock, client_id="pub"):
    pub = FakeClient(broker, clock, level=5)
    pub.connect(client_id)
    return pub


def queue_sizes(session):
    return sum(message_size(r.message) for r in session.queue)


@pytest.mark.parametrize("kind", sorted(HEAVY))
def test_properties_count_against_max_queued_bytes(kind):
    """Property bytes fill an offline session's byte limit; the overflow drops are counted."""
    broker, clock = make_broker(max_queued_bytes=100_000)
    offline_v5_subscriber(broker, clock)
    pub = v5_publisher(broker, clock)
    for i in range(40):
        pub.publish("t/x", b"1", qos=1, packet_id=i + 1, properties=HEAVY[kind])
    session = broker.sessions["sub"]
    assert session.queued_bytes == queue_sizes(session) <= 100_000
    assert session.queued_bytes > 20_000 * len(session.queue)
    assert len(session.queue) < 10
    assert session.dropped["queue-full"] == 40 - len(session.queue)


def test_properties_count_against_max_queued_bytes_total():
    """All sessions' queues together stay within --max-queued-bytes-total counting properties."""
    broker, clock = make_broker(max_queued_bytes_total=300_000)
    for i in range(4):
        offline_v5_subscriber(broker, clock, "s%d" % i)
    pub = v5_publisher(broker, clock)
    for i in range(20):
        pub.publish("t/x", b"1", qos=1, packet_id=i + 1, properties=HEAVY_USER)
    held = {id(r.message): message_size(r.message)
            for s in broker.sessions.values() for r in s.queue}
    assert broker.stats.queued_bytes == sum(held.values())       # each message once
    assert sum(held.values()) <= 300_000 + message_size(broker.sessions["s0"].queue[0].message)
    assert len(broker.sessions["s0"].queue) == 5                 # 5 x 50 KB fit, not 6
    assert broker.stats.dropped["queued-bytes-total"] == 4 * (20 - 5)


def test_property_heavy_messages_congest_an_online_subscriber_by_bytes():
    """The slow-consumer high-water mark (1 MiB) counts properties: the publisher is held."""
    broker, clock = make_broker(max_inflight=1)
    frozen = FakeClient(broker, clock, level=5)
    frozen.connect("frozen")
    frozen.subscribe("t/#", qos=1)
    frozen.conn.pause_writing()
    pub = v5_publisher(broker, clock)
    for i in range(30):                      # 30 x 50 KB > 1 MiB; 30 messages << 1000
        if pub.conn.input_blocked:
            break
        pub.publish("t/x", b"1", qos=1, packet_id=i + 1, properties=HEAVY_USER)
    assert pub.conn.input_blocked            # held (read ahead up to 64 KiB, then not read)
    session = broker.sessions["frozen"]
    assert session.congested_since is not None
    assert session.queued_bytes >= broker.flow.watermarks.high_bytes


def test_queued_bytes_figures_include_properties():
    """$SYS store bytes, Broker.clients() and the ledger report the held size, not payload + topic."""
    broker, clock = make_broker()
    sys_topics = SysTopics(broker, clock, interval=10)
    offline_v5_subscriber(broker, clock)
    pub = v5_publisher(broker, clock)
    for i in range(3):
        pub.publish("t/x", b"1", qos=1, packet_id=i + 1, properties=HEAVY_USER)
    expected = 3 * (len("t/x") + 1 + properties_size(HEAVY_USER))
    assert properties_size(HEAVY_USER) == 10 * (5 + 2 + 5000)
    summary = [c for c in broker.clients() if c.client_id == "sub"][0]
    assert summary.queued_bytes == broker.sessions["sub"].queued_bytes == expected
    assert broker.stats.queued_bytes == expected
    tree = sys_topics.broker_tree()
    assert int(tree[BROKER + "store/messages/bytes"]) == expected


def test_restored_queue_counts_properties(tmp_path):
    """A queue restored from the file store (restart) counts properties like a live one."""
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from mqttd.broker import Broker, BrokerConfig
    from mqttd.persistence.filestore import FileStore

    def run(reactor):
        return FileStore(str(tmp_path / "data"), reactor,
                         run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))

    from mqttd.codec.packets import Connect, Subscribe, Subscription

    def pump(reactor):
        for _ in range(10):
            reactor.advance(0)

    reactor = MemoryReactorClock()
    broker = Broker(reactor, run(reactor), BrokerConfig())
    broker.start()
    sub = FakeClient(broker, reactor, level=5)
    sub.send(Connect(5, "sub", False, 0, properties=Properties(session_expiry_interval=3600)),
             Subscribe(1, (Subscription("t/#", 1),)))
    pump(reactor)
    sub.drop()
    pub = FakeClient(broker, reactor, level=5)
    pub.send(Connect(5, "pub", True, 0))
    for i in range(3):
        pub.publish("t/x", b"1", qos=1, packet_id=i + 1, properties=HEAVY_USER)
    pump(reactor)
    before = broker.sessions["sub"].queued_bytes
    assert before > 150_000
    broker.flush()
    pump(reactor)
    broker.stop()
    pump(reactor)
    reactor2 = MemoryReactorClock()
    again = Broker(reactor2, run(reactor2), BrokerConfig())
    again.start()
    assert len(again.sessions["sub"].queue) == 3
    assert again.sessions["sub"].queued_bytes == before == again.stats.queued_bytes
    again.stop()
    pump(reactor2)


def test_properties_size_matches_the_encoded_publish_properties():
    """properties_size is the length of the properties as a PUBLISH encodes them (ASCII)."""
    from mqttd.codec.packets import PUBLISH
    from mqttd.codec.properties import encode_properties
    props = Properties(payload_format_indicator=1, message_expiry_interval=60,
                       content_type="text/plain", response_topic="r/1",
                       correlation_data=b"\x00\x01", subscription_identifiers=(1, 200, 20_000,
                                                                             3_000_000),
                       user_properties=(("a", "b"), ("name", "value")))
    encoded = encode_properties(props, PUBLISH)
    body = len(encoded) - len(encoded[:1])     # minus the 1-byte property length prefix
    assert properties_size(props) == body
    assert properties_size(Properties()) == 0


def test_message_size_is_computed_once_per_message_and_not_stored():
    """The size is cached on the message, never pickled, and old pickles still load."""
    message = Message("t/x", b"1", 1, properties=HEAVY_USER)
    size = message_size(message)
    assert message._size == size
    assert set(message.__getstate__()) == {"topic", "payload", "qos", "retain", "properties",
                                           "origin", "expires_at"}
    # a copy with other properties computes its own
    other = attrs.evolve(message, properties=Properties())
    assert message_size(other) == 4
    # the pickles (stores, cluster peers) carry the seven fields only, as before
    for data, loads in ((pickle.dumps(message), pickle.loads),
                        (safepickle.dumps(message), safepickle.loads)):
        assert b"\x8c\x05_size" not in data        # no "_size" string in the pickle
        loaded = loads(data)
        assert loaded == message and message_size(loaded) == size
    # a record pickled by attrs' own __getstate__ (a dict of the fields) or a tuple
    old = Message.__new__(Message)
    old.__setstate__({"topic": "t", "payload": b"ab", "qos": 0, "retain": False,
                      "properties": Properties(), "origin": None, "expires_at": None})
    assert old == Message("t", b"ab") and message_size(old) == 3
    old = Message.__new__(Message)
    old.__setstate__(("t", b"ab", 0, False, Properties(), None, None))
    assert old == Message("t", b"ab")


def test_session_ledger_balances_with_properties():
    """enqueue, dequeue, overflow and clear_queue give back exactly the bytes they took."""
    ledger = QueueLedger()
    session = Session("s", ledger=ledger)
    limits = QueueLimits(max_messages=1000, max_bytes=120_000)
    for seq in range(1, 6):
        session.enqueue(OutboundRecord(seq, Message("t", b"1", 1, properties=HEAVY_USER), 1),
                        limits)
    assert session.queued_bytes == ledger.queued_bytes == queue_sizes(session) <= 120_000
    session.dequeue()
    assert session.queued_bytes == ledger.queued_bytes == queue_sizes(session)
    session.clear_queue()
    assert session.queued_bytes == ledger.queued_bytes == 0


def test_v5_publish_to_v3_subscriber_is_still_counted_with_its_properties():
    """What the broker holds is the stored message, whatever level the subscriber speaks."""
    broker, clock = make_broker(max_queued_bytes=100_000)
    sub = FakeClient(broker, clock)
    sub.connect("v3", clean=False)
    sub.subscribe("t/#", qos=1)
    sub.drop()
    pub = v5_publisher(broker, clock)
    for i in range(10):
        pub.publish("t/x", b"1", qos=1, packet_id=i + 1, properties=HEAVY_USER)
    session = broker.sessions["v3"]
    assert session.queued_bytes <= 100_000 and len(session.queue) == 1
    got = FakeClient(broker, clock)
    got.connect("v3", clean=False)
    assert len([p for p in got.received() if isinstance(p, Publish)]) == 1


def test_removing_queued_messages_gives_back_their_properties_too():
    """remove_queued (an ACL reload's re-check) subtracts what enqueue added, properties included."""
    ledger = QueueLedger()
    session = Session("s", ledger=ledger)
    records = [OutboundRecord(i, Message("t/x", b"1", 1, properties=HEAVY_USER), 1)
               for i in range(3)]
    for record in records:
        assert session.enqueue(record, QueueLimits()) is None
    session.remove_queued(records[:2])
    assert session.queued_bytes == ledger.queued_bytes == message_size(records[2].message)
