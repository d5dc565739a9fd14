"""The embedding API: the broker opens its store, publish_message checks its arguments."""
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from mqttd import Broker, BrokerConfig, ClientSummary, MQTTFactory, Properties
from mqttd.persistence.filestore import FileStore
from mqttd.persistence.journal import StoreError

from core.harness import FakeClient


def _file_store(tmp_path, reactor):
    # a store whose fsyncs run inline (no thread pool), for a Clock-driven test
    return FileStore(str(tmp_path / "data"), reactor, run_in_thread=lambda f, *a: _now(f, *a))


def _now(function, *args):
    from twisted.internet import defer
    return defer.maybeDeferred(function, *args)


def _pump(reactor, turns=10):
    for _ in range(turns):
        reactor.advance(0)


def _connect_persistent(broker, reactor, client_id):
    from mqttd.codec.packets import Connack, Connect
    client = FakeClient(broker, reactor)
    client.send(Connect(4, client_id, False, 0))
    _pump(reactor)
    packets = client.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0, packets
    return client, packets


def test_listening_factory_opens_the_given_store_and_restores_sessions(tmp_path):
    """Broker(reactor, store) + MQTTFactory: the store is opened once, sessions come back."""
    reactor = MemoryReactorClock()
    store = _file_store(tmp_path, reactor)
    broker = Broker(reactor, store)
    factory = MQTTFactory(broker)
    factory.doStart()  # what listening on an endpoint does
    assert broker.started
    client, _ = _connect_persistent(broker, reactor, "persistent")
    from mqttd.codec.packets import Subscribe, Subscription
    client.send(Subscribe(1, (Subscription("a/#", 1),)))
    _pump(reactor)
    client.drop()
    broker.publish_message("a/b", b"kept", qos=1)
    flushed = []
    broker.flush().addCallback(flushed.append)
    _pump(reactor)
    assert flushed == [None]
    factory.doStop()
    broker.stop()
    _pump(reactor)
    # a new process: a new broker on the same directory
    reactor2 = MemoryReactorClock()
    broker2 = Broker(reactor2, _file_store(tmp_path, reactor2))
    MQTTFactory(broker2).doStart()
    assert [c.client_id for c in broker2.clients(online=False)] == ["persistent"]
    again, packets = _connect_persistent(broker2, reactor2, "persistent")
    assert packets[0].session_present
    assert [p.payload for p in packets[1:] + again.received()] == [b"kept"]
    broker2.stop()
    _pump(reactor2)


def test_start_is_idempotent_and_a_manual_restore_counts_as_started():
    """start() twice opens once; after restore(store.open()) start() does nothing."""
    opened = []

    class CountingStore:
        durable = False

        def open(self):
            opened.append(1)
            from mqttd.persistence.records import StoredState
            return StoredState()

        def close(self):
            return None
    broker = Broker(Clock(), CountingStore())
    broker.start()
    broker.start()
    assert opened == [1]
    other = Broker(Clock(), CountingStore())
    other.restore(other.store.open())
    other.start()
    assert opened == [1, 1]


def test_a_store_opened_elsewhere_fails_loudly(tmp_path):
    """An already-open store is refused with a message saying what to do."""
    reactor = MemoryReactorClock()
    store = _file_store(tmp_path, reactor)
    store.open()
    broker = Broker(reactor, store)
    with pytest.raises(StoreError, match="the broker opens the store it is given"):
        broker.start()
    store.close()
    reactor.advance(0)


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"topic": b"a"}, TypeError, "topic must be a str"),
    ({"topic": "a", "payload": 5}, TypeError, "payload must be bytes or str"),
    ({"topic": "a", "qos": 3}, ValueError, "qos must be 0, 1 or 2"),
    ({"topic": "a", "qos": "1"}, TypeError, "qos must be an int"),
    ({"topic": "a", "qos": True}, TypeError, "qos must be an int"),
    ({"topic": "a", "retain": 1}, TypeError, "retain must be a bool"),
    ({"topic": "a/+"}, ValueError, "invalid topic name 'a/\\+'"),
    ({"topic": ""}, ValueError, "invalid topic name"),
    ({"topic": "a", "properties": {"x": 1}}, TypeError, "properties must be mqttd.Properties"),
])
def test_publish_message_validates_its_arguments(kwargs, error, fragment):
    """publish_message raises TypeError/ValueError as documented, before anything is routed."""
    broker = Broker(Clock())
    with pytest.raises(error, match=fragment):
        broker.publish_message(**kwargs)
    assert broker.stats.messages_received == 0


def test_publish_message_accepts_str_bytearray_and_properties():
    """str payloads are UTF-8; bytearray is copied; properties are forwarded."""
    broker = Broker(Clock())
    seen = []
    broker.subscribe_local("a", seen.append)
    assert broker.publish_message("a", "é") == 1
    broker.publish_message("a", bytearray(b"x"), properties=Properties(content_type="t"))
    assert [m.payload for m in seen] == ["é".encode(), b"x"]
    assert seen[1].properties.content_type == "t"


def test_clients_lists_sessions_as_summaries():
    """Broker.clients() is the public listing: online and offline sessions, copies."""
    clock = Clock()
    broker = Broker(clock, config=BrokerConfig())
    a = FakeClient(broker, clock)
    a.connect("a")
    b = FakeClient(broker, clock)
    b.connect("b", clean=False)
    b.subscribe("t", qos=1)
    b.drop()
    broker.publish_message("t", b"x", qos=1)
    listed = broker.clients()
    assert all(isinstance(c, ClientSummary) for c in listed)
    assert [(c.client_id, c.online, c.queued) for c in listed] == [("a", True, 0), ("b", False, 1)]
    assert [c.client_id for c in broker.clients(online=True)] == ["a"]
    assert listed[1].subscriptions[0].topic_filter == "t"
