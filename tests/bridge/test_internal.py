"""Internal sessions and the mesh guard's private stamps (REVIEW findings 18 and 20).

In-process brokers joined by bridges over iosim (``harness.Net``), with real
``ClientConnection`` clients on a ``StringTransport`` (``tests.core.harness``).
"""
from __future__ import annotations

import pytest
from twisted.logger import LogLevel

from mqttd.bridge.mesh import MID, PATH
from mqttd.codec.packets import Properties, Publish
from tests.core.harness import FakeClient
from tests.logcapture import logged

from .harness import Collector, Net

USER = (("k", "v"), ("k", "v2"), ("a", "1"))   # repeated names, in order


@pytest.fixture
def net():
    return Net()


def _publishes(client):
    return [p for p in client.received() if isinstance(p, Publish)]


def _v5(broker, net, client_id, clean=True, expiry=0):
    client = FakeClient(broker, net.clock, level=5)
    client.connect(client_id, clean=clean,
                   properties=Properties(session_expiry_interval=expiry or None))
    return client


def test_no_subscriber_but_a_bridge_sees_the_mesh_stamps(net):
    """REVIEW 18: with the guard on, local, remote, offline-queued, retained and in-process
    subscribers get the publisher's user properties unaltered [MQTT-3.3.2-17]; the stamps
    still cross the bridge (the remote's guard knows the message)."""
    a, b = net.broker("A"), net.broker("B")
    guards = {n: net.guard(n) for n in "AB"}
    net.bridge("A", "B", ["t/# both 1"], protocol_version="mqttv50")
    net.settle()
    assert guards["A"].active and guards["B"].active
    local = _v5(a, net, "local-sub")
    local.subscribe("t/#", qos=1)
    far = _v5(b, net, "far-sub")
    far.subscribe("t/#", qos=1)
    away = _v5(a, net, "away", clean=False, expiry=600)
    away.subscribe("t/#", qos=1)
    away.drop()
    in_process = []
    a.subscribe_local("t/#", in_process.append)
    publisher = _v5(a, net, "pub")
    publisher.publish("t/x", b"p", qos=1, retain=True,
                      properties=Properties(user_properties=USER))
    net.settle()
    assert [p.properties.user_properties for p in _publishes(local)] == [USER]
    assert [p.properties.user_properties for p in _publishes(far)] == [USER]
    assert [m.properties.user_properties for m in in_process] == [USER]
    back = FakeClient(a, net.clock, level=5)
    back.connect("away", clean=False, properties=Properties(session_expiry_interval=600))
    net.settle()
    assert [p.properties.user_properties for p in _publishes(back)] == [USER]
    late = _v5(a, net, "late")
    replay = [p for p in late.subscribe("t/#", qos=1) if isinstance(p, Publish)]
    net.settle()
    replay += _publishes(late)
    assert [(p.retain, p.properties.user_properties) for p in replay] == [(True, USER)]
    # the stamps are kept inside the broker and on the bridge link
    stored = a.retained["t/x"].properties.user_properties
    assert [n for n, _ in stored] == ["k", "k", "a", MID, PATH]
    assert len(guards["B"]._seen) == 1 and b.retained["t/x"].payload == b"p"


def test_triangle_mesh_delivers_once_to_v5_clients_without_stamps(net):
    """A<->B<->C<->A on # (MQTT 5): every v5 client gets each message exactly once, with the
    publisher's user properties only, and nothing circulates."""
    brokers = {n: net.broker(n) for n in "ABC"}
    subs = {}
    for x, y in (("A", "B"), ("B", "C"), ("C", "A")):
        net.bridge(x, y, ["# both 1"], protocol_version="mqttv50")
    net.settle()
    for n, broker in brokers.items():
        subs[n] = _v5(broker, net, f"sub-{n}")
        subs[n].subscribe("m/#", qos=1)
    for n, broker in brokers.items():
        pub = _v5(broker, net, f"pub-{n}")
        pub.publish(f"m/{n}", n.encode(), qos=1,
                    properties=Properties(user_properties=(("from", n),)))
    net.settle(5)
    for n in "ABC":
        got = sorted((p.payload, p.properties.user_properties) for p in _publishes(subs[n]))
        assert got == [(x.encode(), (("from", x),)) for x in "ABC"], n
    before = {n: b.stats.messages_received for n, b in brokers.items()}
    net.settle(5)
    assert {n: b.stats.messages_received for n, b in brokers.items()} == before


def test_forged_stamps_still_cannot_make_a_peer_drop_a_brokers_message(net):
    """REVIEW 19 after 18: a client publishing another broker's mqttd-mid on B neither
    sees nor suppresses A's later message, and B's subscribers see no stamps."""
    a, b = net.broker("A"), net.broker("B")
    net.guard("A")
    net.guard("B")
    net.bridge("A", "B", ["m/# both 1"], protocol_version="mqttv50")
    net.settle()
    watcher = _v5(b, net, "watcher")
    watcher.subscribe("m/#", qos=1)
    # the id A gives its next message cannot be seen by any client; the forger
    # tries the stamps it would need anyway
    forger = _v5(b, net, "forger")
    for n in range(5):
        forger.publish("m/forged", b"f", qos=1, packet_id=n + 1, properties=Properties(
            user_properties=((MID, f"A:{n:016x}"), (PATH, "A"))))
    publisher = _v5(a, net, "legit")
    for n in range(5):
        publisher.publish("m/legit", b"L%d" % n, qos=1, packet_id=n + 1)
    net.settle(2)
    got = _publishes(watcher)
    assert [p.payload for p in got if p.topic == "m/legit"] == [b"L%d" % n for n in range(5)]
    assert all(p.properties.user_properties == () for p in got if p.topic == "m/legit")
    # the forger's own pairs are its data: delivered unaltered [MQTT-3.3.2-17]
    assert sorted(p.properties.user_properties for p in got if p.topic == "m/forged") == [
        ((MID, f"A:{n:016x}"), (PATH, "A")) for n in range(5)]
    assert net.guards["B"].dropped["duplicate"] == 0


def test_clients_own_mqttd_named_user_properties_cross_a_v5_mesh_unaltered(net):
    """A client's own user properties named mqttd-path/mqttd-mid are never deleted: local v5 subscribers and those across an MQTT 5 bridge get them as sent (REVIEW-BRIDGE 13a) [MQTT-3.3.2-17]."""
    a, b = net.broker("A"), net.broker("B")
    net.guard("A")
    net.guard("B")
    net.bridge("A", "B", ["u/# both 1"], protocol_version="mqttv50")
    net.settle()
    here, there = _v5(a, net, "here"), _v5(b, net, "there")
    here.subscribe("u/#", qos=1)
    there.subscribe("u/#", qos=1)
    sent = ((PATH, "mine"), ("k", "v"), (MID, "x"), (PATH, "last"))
    publisher = _v5(a, net, "pub")
    publisher.publish("u/c", b"custom", qos=1, packet_id=1,
                      properties=Properties(user_properties=sent))
    publisher.publish("u/d", b"only", qos=1, packet_id=2,
                      properties=Properties(user_properties=((PATH, "mine"),)))
    net.settle(2)
    for sub in (here, there):
        got = {p.topic: p.properties.user_properties for p in _publishes(sub)}
        assert got == {"u/c": sent, "u/d": ((PATH, "mine"),)}


def _refusals(lines):
    return [e for e in lines if e.get("what") == "internal-client-id"]


@pytest.mark.parametrize("level,code", [(4, 0x02), (5, 0x85)])
def test_a_network_client_cannot_take_a_bridges_local_session(net, level, code):
    """REVIEW 20: CONNECT with the bridge's local client id is refused (v5 0x85 / v3 0x02),
    whatever the auth policy: queued messages are neither read nor discarded, and the bridge
    keeps its link; one rate-limited log line for many attempts."""
    a, b = net.broker("A"), net.broker("B")
    got = Collector(b, "q/#")
    manager = net.bridge("A", "B", ["q/# out 1"])
    net.settle()
    bridge = manager.bridges["A-B"]
    session_id = bridge.config.local_clientid
    assert session_id == "local.A-to-B"
    net.down("B")
    for n in range(3):
        a.publish_message(f"q/{n}", b"queued%d" % n, qos=1)
    with logged(LogLevel.warn) as lines:
        for clean in (False, True):     # resume it / discard it
            thief = FakeClient(a, net.clock, level=level)
            (connack,) = thief.connect(session_id, clean=clean, expect_ok=False)
            assert connack.reason_code == code and not connack.session_present
            assert thief.disconnecting and _publishes(thief) == []
        session = a.sessions[session_id]
        assert len(session.queue) + len(session.inflight) == 3
        net.up("B")
        net.settle(5)
        assert got.payloads() == [b"queued0", b"queued1", b"queued2"]
        remote = bridge.remote
        assert remote is not None
        for _ in range(20):             # with the remote up: the bridge stays on
            thief = FakeClient(a, net.clock, level=level)
            (connack,) = thief.connect(session_id, expect_ok=False)
            assert connack.reason_code == code
        net.settle(1)
    assert bridge.remote is remote and bridge.stats.connected
    assert a.sessions[session_id].connection is bridge._local
    assert a.stats.refused["internal-client-id"] == 22
    assert 1 <= len(_refusals(lines)) <= 3          # rate-limited, not one per attempt
    assert "bridge A-B" in _refusals(lines)[0]["detail"]
    assert f"(CONNACK 0x{code:02X})" in _refusals(lines)[0]["detail"]   # the code sent
    assert not [e for e in lines if "took its session over" in e.get("log_format", "")]


class _EveryoneWelcome:
    """An authenticator that lets every user in (the policy that made REVIEW 20 possible)."""

    def authenticate(self, connect):
        from twisted.internet import defer
        return defer.succeed(0)


def test_internal_client_id_is_refused_whatever_the_authentication(net):
    """An authenticated user allowed everything still gets 0x85 for a bridge's local id."""
    from mqttd.codec.packets import Connect
    a, _b = net.broker("A"), net.broker("B")
    a.authenticator = _EveryoneWelcome()
    net.bridge("A", "B", ["q/# out 1"])
    net.settle()
    client = FakeClient(a, net.clock, level=5)
    client.send(Connect(5, "local.A-to-B", False, 0, username="admin", password=b"pw"))
    (connack,) = client.received()
    assert connack.reason_code == 0x85 and client.disconnecting


def test_a_removed_bridge_gives_its_client_id_back(net):
    """SIGHUP reload removing a bridge releases the reservation; restarting one keeps it."""
    import attrs
    a, _b = net.broker("A"), net.broker("B")
    manager = net.bridge("A", "B", ["q/# out 1"])
    net.settle()
    config = manager.bridges["A-B"].config
    manager.reload([attrs.evolve(config, keepalive_interval=30)])   # restarted
    net.settle(3)
    assert a.internal_owner("local.A-to-B") == "bridge A-B"
    manager.reload([])
    net.settle()
    assert a.internal_owner("local.A-to-B") is None
    client = FakeClient(a, net.clock, level=5)
    client.connect("local.A-to-B")          # an ordinary id again
