"""mosquitto's $SYS/broker tree: retained for new subscribers, $SYS traffic not counted."""
from mqttd.codec.packets import Properties, Publish
from mqttd.persistence.memory import MemoryStore
from mqttd.systopics import BROKER, LoadAverage, SysTopics

from core.harness import FakeClient, make_broker


def _values(packets):
    return {p.topic: p.payload.decode() for p in packets if isinstance(p, Publish)}


def test_new_sys_subscriber_gets_every_value_at_once_as_retained():
    """A subscriber to $SYS/broker/# gets version, uptime, clients... at once, retain=1."""
    broker, clock = make_broker()
    sys_topics = SysTopics(broker, clock, interval=10)
    sys_topics.start()
    clock.advance(10)
    watcher = FakeClient(broker, clock)
    watcher.connect("watcher")
    packets = watcher.subscribe("$SYS/broker/#")
    publishes = [p for p in packets if isinstance(p, Publish)]
    assert publishes and all(p.retain for p in publishes)
    got = _values(publishes)
    from mqttd import __version__
    assert got[BROKER + "version"] == f"mqttd version {__version__}"
    assert got[BROKER + "uptime"] == "10 seconds"
    for leaf in ("clients/connected", "clients/disconnected", "clients/total",
                 "clients/maximum", "clients/expired", "messages/received", "messages/sent",
                 "bytes/received", "bytes/sent", "publish/messages/dropped",
                 "subscriptions/count", "retained messages/count", "heap/current",
                 "heap/maximum", "load/messages/received/1min",
                 "load/messages/received/5min", "load/messages/received/15min",
                 "load/bytes/sent/15min", "load/publish/dropped/5min", "store/messages/count"):
        assert BROKER + leaf in got, leaf
    assert int(got[BROKER + "heap/current"]) > 1_000_000


def test_client_counts_follow_sessions_and_expiry():
    """connected/disconnected/total/maximum/expired follow the sessions."""
    broker, clock = make_broker()
    sys_topics = SysTopics(broker, clock, interval=10)
    sys_topics.start()
    a, b = FakeClient(broker, clock, level=5), FakeClient(broker, clock)
    a.connect("a", clean=False, properties=Properties(session_expiry_interval=5))
    b.connect("b", clean=False)
    a.drop()
    tree = sys_topics.broker_tree()
    assert (tree[BROKER + "clients/connected"], tree[BROKER + "clients/disconnected"],
            tree[BROKER + "clients/total"], tree[BROKER + "clients/maximum"]) == ("1", "1", "2", "2")
    clock.advance(6)
    tree = sys_topics.broker_tree()
    assert tree[BROKER + "clients/expired"] == "1"
    assert tree[BROKER + "clients/total"] == "1"


def test_sys_traffic_is_not_counted():
    """The broker's own $SYS messages never show in the message and byte counts."""
    broker, clock = make_broker()
    sys_topics = SysTopics(broker, clock, interval=1)
    sys_topics.start()
    watcher = FakeClient(broker, clock)
    watcher.connect("watcher")
    watcher.subscribe("$SYS/#")
    clock.advance(1)
    clock.advance(1)
    assert broker.stats.messages_received == 0
    assert broker.stats.messages_sent == 0
    publisher = FakeClient(broker, clock)
    publisher.connect("p")
    publisher.subscribe("t")
    publisher.publish("t", b"abc")
    tree = sys_topics.broker_tree()
    assert tree[BROKER + "messages/received"] == "1"
    assert tree[BROKER + "messages/sent"] == "1"
    assert tree[BROKER + "publish/bytes/received"] == "3"


def test_a_copied_sys_message_is_still_not_counted():
    """$SYS messages that were copied (attrs.evolve, a pickle round trip as the store and a
    cluster peer make) keep the origin's value, not its identity: still not counted."""
    import attrs

    from mqttd.messages import SYS_ORIGIN, Message
    from mqttd.persistence import safepickle
    broker, clock = make_broker()
    watcher = FakeClient(broker, clock, level=5)
    watcher.connect("watcher")
    watcher.subscribe("$SYS/#")
    original = Message("$SYS/broker/new/clients", b"x", origin=SYS_ORIGIN)
    copied = safepickle.loads(safepickle.dumps(attrs.evolve(original, payload=b"y")))
    assert copied.origin == SYS_ORIGIN and copied.origin is not SYS_ORIGIN
    assert broker.publish(copied) == 1
    assert broker.publish(attrs.evolve(original)) == 1
    assert [p.payload for p in watcher.received() if isinstance(p, Publish)] == [b"y", b"x"]
    assert broker.stats.messages_received == 0
    assert broker.stats.messages_sent == 0
    assert broker.stats.bytes_out == [0, 0, 0]


def test_sys_values_are_never_written_to_the_store():
    """Retained $SYS values live in memory only: no store write per value per interval."""
    class DurableMemory(MemoryStore):
        durable = True

        def __init__(self):
            super().__init__()
            self.ops = []

        def write(self, op):
            self.ops.append(op)
    store = DurableMemory()
    broker, clock = make_broker(store=store)
    sys_topics = SysTopics(broker, clock, interval=1)
    sys_topics.start()
    clock.advance(5)
    assert store.ops == []
    assert BROKER + "uptime" in broker.retained


def test_load_average_is_mosquittos_smoothed_per_minute_rate():
    """600 messages in each 60 s interval: every load converges to 600/min, 1 min fastest."""
    load = LoadAverage()
    load.update(0, 60)
    load.update(600, 60)
    assert 379 < load.values[1] < 380  # 600 * (1 - e^-1)
    for n in range(2, 200):
        load.update(600 * n, 60)
    assert all(abs(v - 600) < 1 for v in load.values.values())


def test_store_size_is_the_data_directory_size(tmp_path):
    broker, clock = make_broker()
    (tmp_path / "journal").write_bytes(b"x" * 1234)
    broker.store.path = str(tmp_path)
    tree = SysTopics(broker, clock).broker_tree()
    assert tree[BROKER + "store/size"] == "1234"


def test_every_maximum_is_at_least_its_current_value(monkeypatch):
    """getrusage's peak lags the sampled RSS by a few pages (and clients_maximum can lag the
    sessions): a published maximum is never below the current value next to it."""
    import mqttd.systopics as systopics

    broker, clock = make_broker()
    sys_topics = SysTopics(broker, clock, interval=10)
    monkeypatch.setattr(systopics, "peak_resident_memory", lambda: 68_550_656)
    monkeypatch.setattr(systopics, "resident_memory", lambda: 68_763_648)
    tree = sys_topics.broker_tree()
    assert tree[BROKER + "heap/current"] == "68763648"
    assert tree[BROKER + "heap/maximum"] == "68763648"
    monkeypatch.setattr(systopics, "resident_memory", lambda: 60_000_000)
    tree = sys_topics.broker_tree()
    assert tree[BROKER + "heap/maximum"] == "68763648"  # a peak, not the latest sample
    client = FakeClient(broker, clock)
    client.connect("c")
    broker.stats.clients_maximum = 0
    tree = sys_topics.broker_tree()
    assert tree[BROKER + "clients/maximum"] == tree[BROKER + "clients/connected"] == "1"


def test_store_bytes_count_what_store_count_counts():
    """store/messages/bytes covers retained and in-flight messages, not only queued ones."""
    broker, clock = make_broker()
    sys_topics = SysTopics(broker, clock, interval=10)
    publisher = FakeClient(broker, clock)
    publisher.connect("p")
    publisher.publish("r", b"abc", retain=True)
    tree = sys_topics.broker_tree()
    assert tree[BROKER + "store/messages/count"] == "1"
    assert tree[BROKER + "store/messages/bytes"] == str(len("r") + len(b"abc"))
    subscriber = FakeClient(broker, clock)
    subscriber.connect("s", clean=False)
    subscriber.subscribe("q/#", qos=1)
    publisher.publish("q/1", b"12345", qos=1)  # delivered, not acknowledged: in flight
    tree = sys_topics.broker_tree()
    assert tree[BROKER + "store/messages/count"] == "2"
    assert tree[BROKER + "store/messages/bytes"] == str(4 + len("q/1") + 5)
