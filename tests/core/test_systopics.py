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
