"""$SYS/<brokerId>/... topics with mosca's payloads."""
import json

from mqttd.codec.packets import Disconnect, Publish, Unsubscribe
from mqttd.systopics import SysTopics

from core.harness import FakeClient, make_broker


def _watch(broker, clock):
    watcher = FakeClient(broker, clock)
    watcher.connect("watcher")
    watcher.subscribe("$SYS/#")
    watcher.received()
    return watcher


def test_sys_event_topics_carry_moscas_payloads():
    """new/clients and disconnect/clients carry the client id; (un)subscribes carry JSON."""
    broker, clock = make_broker(broker_id="b1")
    sys_topics = SysTopics(broker, clock, interval=0)
    sys_topics.start()
    watcher = _watch(broker, clock)
    c = FakeClient(broker, clock)
    c.connect("dev1")
    c.subscribe("room/1")
    c.send(Unsubscribe(2, ("room/1",)))
    c.send(Disconnect())
    got = [(p.topic, p.payload) for p in watcher.received() if isinstance(p, Publish)]
    assert got == [
        ("$SYS/b1/new/clients", b"dev1"),
        ("$SYS/b1/new/subscribes", json.dumps({"clientId": "dev1", "topic": "room/1"}).encode()),
        ("$SYS/b1/new/unsubscribes", json.dumps({"clientId": "dev1", "topic": "room/1"}).encode()),
        ("$SYS/b1/disconnect/clients", b"dev1"),
    ]


def test_sys_statistics_are_published_every_interval():
    """Counters go to $SYS/<id>/... every interval seconds."""
    broker, clock = make_broker(broker_id="b2")
    sys_topics = SysTopics(broker, clock, interval=10)
    sys_topics.start()
    watcher = _watch(broker, clock)
    clock.advance(10)
    got = {p.topic: p.payload for p in watcher.received() if isinstance(p, Publish)}
    assert got["$SYS/b2/clients/connected"] == b"1"
    assert got["$SYS/b2/uptime"] == b"10"
    assert "$SYS/b2/messages/received" in got
    sys_topics.stop()
    clock.advance(20)
    assert [p for p in watcher.received() if isinstance(p, Publish)] == []


def test_sys_client_events_are_not_built_when_nobody_can_receive_them():
    """A connection storm without a $SYS subscriber builds no new/clients or
    new/subscribes message (no JSON, no routing); a subscriber gets them again."""
    broker, clock = make_broker(broker_id="b3")
    SysTopics(broker, clock, interval=0).start()
    published = []
    publish = broker.publish
    broker.publish = lambda message, *a, **kw: (published.append(message.topic),
                                                publish(message, *a, **kw))[1]
    c = FakeClient(broker, clock)
    c.connect("dev1")
    c.subscribe("room/1")
    c.send(Disconnect())
    assert published == []
    watcher = FakeClient(broker, clock)
    watcher.connect("watcher")
    watcher.subscribe("$SYS/b3/new/+")
    watcher.received()
    d = FakeClient(broker, clock)
    d.connect("dev2")
    d.subscribe("room/2")
    got = [(p.topic, p.payload) for p in watcher.received() if isinstance(p, Publish)]
    assert got == [
        ("$SYS/b3/new/clients", b"dev2"),
        ("$SYS/b3/new/subscribes", json.dumps({"clientId": "dev2", "topic": "room/2"}).encode()),
    ]


def test_reaches_anyone_counts_subscribers_observers_filters_and_other_nodes():
    """Broker.reaches_anyone: a matching subscription, a published observer, a publish
    filter or a remote router each make a message worth building; '#' never matches $SYS."""
    broker, clock = make_broker()
    topic = "$SYS/b/new/clients"
    assert not broker.reaches_anyone(topic)
    c = FakeClient(broker, clock)
    c.connect("wildcard")
    c.subscribe("#")
    assert not broker.reaches_anyone(topic)      # [MQTT-4.7.2-1]
    assert broker.reaches_anyone("a/b")
    unregister = broker.on("published", lambda **_: None)
    assert broker.reaches_anyone(topic)
    unregister()
    unfilter = broker.add_publish_filter(lambda message, client: message)
    assert broker.reaches_anyone(topic)
    unfilter()
    assert not broker.reaches_anyone(topic)
    broker.add_remote_router(object())
    assert broker.reaches_anyone(topic)


def test_an_observer_may_unregister_itself_or_register_another_during_an_event():
    """Broker.emit iterates a snapshot: an observer that unregisters during the event
    does not stop the others, and one registered then is called from the next event on."""
    broker, _clock = make_broker()
    calls = []
    late = []

    def once(**_):
        calls.append("once")
        unregister_once()
        broker.on("clientConnected", lambda **_: late.append(1))

    unregister_once = broker.on("clientConnected", once)
    broker.on("clientConnected", lambda **_: calls.append("always"))
    broker.emit("clientConnected", client=None)
    assert calls == ["once", "always"] and late == []
    broker.emit("clientConnected", client=None)
    assert calls == ["once", "always", "always"] and late == [1]
