"""Bridges between in-process brokers (iosim links, task.Clock): routing, queueing, loops."""
from __future__ import annotations

import pytest

from mqttd.bridge.mesh import MID, PATH

from .harness import Collector, Net


@pytest.fixture
def net():
    return Net()


def test_out_topics_map_prefixes_and_keep_qos_and_retain(net):
    """An 'out' line strips the local prefix, adds the remote one, keeps QoS and retain."""
    a, b = net.broker("A"), net.broker("B")
    got = Collector(b, "site/#")
    net.bridge("A", "B", ['sensors/# out 1 edge/ site/a/'])
    net.settle()
    a.publish_message("edge/sensors/t", b"21", qos=1, retain=True)
    a.publish_message("other/t", b"x", qos=1)
    net.settle()
    assert got.messages == [("site/a/sensors/t", b"21", True)]
    assert b.retained["site/a/sensors/t"].payload == b"21"


def test_in_topics_map_remote_to_local(net):
    """An 'in' line subscribes remotely and publishes locally under the local prefix."""
    a, b = net.broker("A"), net.broker("B")
    got = Collector(a, "cmd/#")
    net.bridge("A", "B", ['cmd/# in 2 "" site/a/'])
    net.settle()
    b.publish_message("site/a/cmd/reboot", b"now", qos=2)
    b.publish_message("site/b/cmd/reboot", b"not for a", qos=2)
    net.settle()
    assert got.messages == [("cmd/reboot", b"now", False)]


def test_both_direction_does_not_echo(net):
    """A 'both' bridge never sends a message back where it came from (No Local both ends)."""
    a, b = net.broker("A"), net.broker("B")
    got_a, got_b = Collector(a, "t/#"), Collector(b, "t/#")
    net.bridge("A", "B", ["t/# both 1"])
    net.settle()
    a.publish_message("t/1", b"from a", qos=1)
    b.publish_message("t/2", b"from b", qos=1)
    net.settle(3)
    assert sorted(got_a.payloads()) == [b"from a", b"from b"]
    assert sorted(got_b.payloads()) == [b"from a", b"from b"]


@pytest.mark.parametrize("version", ["mqttv311", "mqttv50"])
def test_messages_queue_while_remote_is_down_and_arrive_in_order(net, version):
    """Remote unreachable: QoS 1 messages wait in the bridge session, then all arrive in order."""
    a, b = net.broker("A"), net.broker("B")
    got = Collector(b, "q/#")
    manager = net.bridge("A", "B", ["q/# out 1"], protocol_version=version)
    net.settle()
    net.down("B")
    for n in range(50):
        a.publish_message("q/x", str(n).encode(), qos=1)
    stats = manager.stats["A-B"]
    assert stats.connected is False
    assert stats.queued == 50
    net.up("B")
    net.settle(5)
    assert got.payloads() == [str(n).encode() for n in range(50)]
    assert stats.connected is True and stats.queued == 0 and stats.messages_out == 50


def test_inflight_messages_are_resent_with_the_same_packet_ids(net):
    """Messages sent but not acknowledged when the link broke are re-sent with DUP, none lost."""
    a, b = net.broker("A"), net.broker("B")
    got = Collector(b, "q/#")
    net.bridge("A", "B", ["q/# out 2"])
    net.settle()
    # publish, then cut the link before any acknowledgement travels back
    for n in range(5):
        a.publish_message("q/x", str(n).encode(), qos=2)
    net.clock.advance(0)
    session = a.sessions["local.A-to-B"]
    assert len(session.inflight) == 5
    net.down("B")
    assert len(session.inflight) == 5
    net.up("B")
    net.settle(5)
    assert got.payloads() == [str(n).encode() for n in range(5)]
    assert not session.inflight and not session.queue


def test_state_notifications_are_retained_locally_and_remotely(net):
    """$SYS/broker/connection/<remote_clientid>/state is 1 while up and 0 after, both sides."""
    a, b = net.broker("A"), net.broker("B")
    net.bridge("A", "B", ["q/# out 1"], remote_clientid="edge")
    topic = "$SYS/broker/connection/edge/state"
    assert a.retained[topic].payload == b"0"
    net.settle()
    assert a.retained[topic].payload == b"1"
    assert b.retained[topic].payload == b"1"
    net.down("B")
    assert a.retained[topic].payload == b"0"
    assert b.retained[topic].payload == b"0"   # the bridge's will on B


def test_refused_bridge_bit_falls_back_to_a_plain_connection(net):
    """A remote that refuses level 0x84 (CONNACK 1) gets a plain MQTT 3.1.1 CONNECT next."""
    a, b = net.broker("A"), net.broker("B")
    from mqttd.codec import reader as codec_reader
    saved = codec_reader._BRIDGE_LEVELS
    codec_reader._BRIDGE_LEVELS = set()   # B behaves like a broker without bridge support
    try:
        got = Collector(b, "q/#")
        manager = net.bridge("A", "B", ["q/# out 1"])
        net.settle(5)
        assert manager.stats["A-B"].connected
        a.publish_message("q/1", b"x", qos=1)
        net.settle()
        assert got.payloads() == [b"x"]
    finally:
        codec_reader._BRIDGE_LEVELS = saved


def test_bridge_bit_client_gets_no_local_and_retain_as_published(net):
    """mqttd as the remote: a v3 bridge's subscriptions are forced to No Local + RAP."""
    a, b = net.broker("A"), net.broker("B")
    net.bridge("A", "B", ["t/# both 1"])
    net.settle()
    remote_session = b.sessions["A-to-B"]
    sub = remote_session.subscriptions["t/#"]
    assert sub.no_local and sub.retain_as_published
    assert remote_session.connection.bridge


def test_chain_forwards_through_the_middle_broker(net):
    """A -> B -> C: a message published on A reaches C once."""
    a, b, c = net.broker("A"), net.broker("B"), net.broker("C")
    got_c = Collector(c, "#")
    net.bridge("A", "B", ["x/# out 1"])
    net.bridge("B", "C", ["x/# out 1"])
    net.settle()
    a.publish_message("x/1", b"hop", qos=1)
    net.settle(2)
    assert got_c.payloads() == [b"hop"]


def test_triangle_mesh_delivers_once_and_never_circulates(net):
    """A<->B<->C<->A bridged 'both' on # (MQTT 5): each broker gets each message once."""
    brokers = {n: net.broker(n) for n in "ABC"}
    got = {n: Collector(b, "#") for n, b in brokers.items()}
    managers = [net.bridge(x, y, ["# both 1"], protocol_version="mqttv50")
                for x, y in (("A", "B"), ("B", "C"), ("C", "A"))]
    net.settle()
    for n, broker in brokers.items():
        broker.publish_message(f"from/{n}", n.encode(), qos=1)
    net.settle(5)
    for n in "ABC":
        assert sorted(got[n].payloads()) == [b"A", b"B", b"C"], n
    dropped = sum(sum(m.mesh.dropped.values()) for m in managers)
    assert dropped > 0   # the second copies were stopped, not delivered
    # and nothing keeps flowing
    before = {n: b.stats.messages_received for n, b in brokers.items()}
    net.settle(5)
    assert {n: b.stats.messages_received for n, b in brokers.items()} == before


def test_mesh_guard_stamps_local_messages_and_drops_seen_ones():
    """The guard stamps mqttd-mid/path once, appends its id, drops duplicates and loops."""
    from mqttd.bridge.mesh import MeshGuard
    from mqttd.messages import Message
    from mqttd.broker import ClientInfo
    link = ClientInfo("peer", 5, None, "bridge:x", False, 0, True, bridge=True)
    a, b = MeshGuard("A"), MeshGuard("B", hop_limit=2)
    stamped = a(Message("t", b"x", 1), None)
    props = dict(stamped.properties.user_properties)
    assert props[PATH] == "A" and props[MID].startswith("A:")
    at_b = b(stamped, link)
    assert dict(at_b.properties.user_properties)[PATH] == "A,B"
    assert b(stamped, link) is None and b.dropped["duplicate"] == 1
    assert a(at_b, link) is None    # A's own message came back: seen
    far = MeshGuard("C", hop_limit=2)
    assert far(at_b, link) is None and far.dropped["hop-limit"] == 1


def test_mesh_stamps_forged_by_a_client_are_replaced_not_believed():
    """A client that publishes with another broker's mqttd-mid cannot make the guard drop that broker's message (REVIEW 19)."""
    from mqttd.bridge.mesh import MeshGuard
    from mqttd.codec.packets import Properties
    from mqttd.broker import ClientInfo
    from mqttd.messages import Message
    link = ClientInfo("A-to-B", 5, None, "bridge:x", False, 0, True, bridge=True)
    client = ClientInfo("mallory", 5, None, "127.0.0.1:1", True, 60, False)
    a, b = MeshGuard("A"), MeshGuard("B")
    legit = a(Message("m/legit", b"L", 1), None)          # A's next message
    mid = dict(legit.properties.user_properties)[MID]
    forged = Message("m/forged", b"f", 1, properties=Properties(
        user_properties=(("k", "v"), (MID, mid), (PATH, "A"))))
    routed = b(forged, client)
    user = routed.properties.user_properties
    assert ("k", "v") in user                               # the client's own properties kept
    assert dict(user)[MID] != mid and dict(user)[PATH] == "B"   # stamped afresh by B
    assert b(legit, link) is not None                       # A's message still gets through
    assert b.dropped["duplicate"] == 0
    ids = {dict(a(Message("t", b"x", 1), None).properties.user_properties)[MID]
           for _ in range(100)}
    assert len(ids) == 100 and not any(i.endswith(":1") for i in ids)   # not a counter


def test_reload_restarts_changed_bridges_only(net):
    """SIGHUP reload: an unchanged bridge keeps its link, a changed one restarts, a removed one stops."""
    import attrs
    a, b = net.broker("A"), net.broker("B")
    manager = net.bridge("A", "B", ["q/# out 1"])
    net.settle()
    first = manager.bridges["A-B"].remote
    config = manager.bridges["A-B"].config
    manager.reload([config])
    net.settle()
    assert manager.bridges["A-B"].remote is first
    manager.reload([attrs.evolve(config, keepalive_interval=30)])
    net.settle(3)
    assert manager.bridges["A-B"].remote is not None
    assert manager.bridges["A-B"].remote is not first
    manager.reload([])
    net.settle()
    assert manager.bridges == {}


def test_mesh_with_a_hub_that_runs_no_bridge_delivers_once(net):
    """A->B, A->C, B->C (C only accepts bridges, MQTT 5): C's guard turns on, C's messages go out once."""
    brokers = {n: net.broker(n) for n in "ABC"}
    guards = {n: net.guard(n) for n in "ABC"}
    got = {n: Collector(b, "#") for n, b in brokers.items()}
    for x, y in (("A", "B"), ("A", "C"), ("B", "C")):
        net.bridge(x, y, ["# both 1"], protocol_version="mqttv50")
    net.settle()
    assert all(g.active for g in guards.values())   # C: a bridging broker connected
    for n, broker in brokers.items():
        broker.publish_message(f"from/{n}", n.encode(), qos=1)
    net.settle(5)
    for n in "ABC":
        assert sorted(got[n].payloads()) == [b"A", b"B", b"C"], n


def _v3_ring_each_publishes_once(net, qos):
    """Brokers A, B, C bridged in an MQTT 3.1.1 ring (``# both 1``), each publishing
    ``from/<name>`` at ``qos``: every broker gets each message exactly once.
    ``(brokers, managers, got)`` (``got``: a :class:`Collector` of ``#`` per broker)."""
    brokers = {n: net.broker(n) for n in "ABC"}
    got = {n: Collector(b, "#") for n, b in brokers.items()}
    managers = [net.bridge(x, y, ["# both 1"]) for x, y in (("A", "B"), ("B", "C"), ("C", "A"))]
    net.settle()
    for n, broker in brokers.items():
        broker.publish_message(f"from/{n}", n.encode(), qos=qos)
    net.settle(5)
    for n in "ABC":
        assert sorted(got[n].payloads()) == [b"A", b"B", b"C"], n
    return brokers, managers, got


def test_v3_triangle_with_default_options_delivers_once_and_stops(net):
    """MQTT 3.1.1 links carry no properties: the default dedup window stops the copies that go round (REVIEW-BRIDGE 6a)."""
    brokers, managers, got = _v3_ring_each_publishes_once(net, qos=1)
    assert sum(m.mesh.dropped["v3-duplicate"] for m in managers) > 0
    before = {n: b.stats.messages_received for n, b in brokers.items()}
    net.settle(5)   # well past the window: nothing keeps flowing
    assert {n: b.stats.messages_received for n, b in brokers.items()} == before
    # outside the window the same content is a new message again
    brokers["A"].publish_message("from/A", b"A", qos=1)
    net.settle(5)
    assert got["B"].payloads().count(b"A") == 2


def test_v3_dedup_window_keeps_identical_repeats_over_the_same_link(net):
    """A sensor repeating one reading: every repeat arrives over the link it always comes by, none is taken for a copy."""
    a, b, c = net.broker("A"), net.broker("B"), net.broker("C")
    got_b, got_c = Collector(b, "#"), Collector(c, "#")
    net.bridge("A", "B", ["# both 1"])
    net.bridge("B", "C", ["# both 1"])
    net.settle()
    for _ in range(5):
        a.publish_message("sensors/temp", b"21.5", qos=1)
        net.settle(0.2)
    net.settle(2)
    assert got_b.payloads() == [b"21.5"] * 5
    assert got_c.payloads() == [b"21.5"] * 5


def test_v3_dedup_window_zero_turns_the_guard_off():
    """--bridge-dedup-window 0: no fingerprints, a bridged repeat of a local message goes through."""
    from mqttd.bridge.mesh import MeshGuard
    from mqttd.broker import ClientInfo
    from mqttd.messages import Message
    link = ClientInfo("peer", 4, None, "bridge:x", False, 0, True, bridge=True)
    from twisted.internet.task import Clock
    clock = Clock()
    on, off = MeshGuard("A", clock=clock), MeshGuard("A", dedup_window=0, clock=clock)
    for guard in (on, off):
        guard(Message("t", b"x", 1), None)
    assert on(Message("t", b"x", 1), link) is None and on.dropped["v3-duplicate"] == 1
    assert off(Message("t", b"x", 1), link) is not None and off.dropped["v3-duplicate"] == 0
    clock.advance(on.dedup_window)
    assert on(Message("t", b"x", 1), link) is not None   # the window is over


def test_mesh_guard_is_idle_until_a_bridge_appears():
    """Without bridges the guard costs nothing: no publish filter until a bridging broker connects."""
    from mqttd.bridge.mesh import MeshGuard
    from mqttd.broker import ClientInfo
    net = Net()
    broker = net.broker("H")
    guard = MeshGuard("H").attach(broker)
    assert not broker._publish_filters
    broker.emit("clientConnected", client=ClientInfo("plain", 4))
    assert not guard.active
    broker.emit("clientConnected", client=ClientInfo("edge", 4, bridge=True))
    assert guard.active and broker._publish_filters == [guard]


def test_failover_endpoint_tries_the_next_address_and_returns_to_the_primary():
    """address list: a failed attempt moves to the next address; success resets to the first
    (round_robin false) or stays (round_robin true)."""
    from twisted.internet import defer

    from mqttd.bridge.service import FailoverEndpoint

    class Fake:
        def __init__(self, ok):
            self.ok = ok
            self.calls = 0

        def connect(self, factory):
            self.calls += 1
            return defer.succeed("p") if self.ok else defer.fail(ConnectionRefusedError())

    primary, secondary = Fake(False), Fake(True)
    endpoint = FailoverEndpoint([primary, secondary])
    failures = []
    endpoint.connect(None).addErrback(failures.append)
    assert len(failures) == 1 and endpoint.index == 1
    assert endpoint.connect(None).result == "p" and endpoint.index == 0
    sticky = FailoverEndpoint([Fake(False), Fake(True)], round_robin=True)
    sticky.connect(None).addErrback(lambda f: None)
    sticky.connect(None)
    assert sticky.index == 1


def test_message_over_the_remote_maximum_packet_size_is_dropped_not_retried(net):
    """MQTT 5: a message the remote could never take is counted and dropped; the rest flows."""
    a, b = net.broker("A"), net.broker("B", max_packet_size=1024)
    got = Collector(b, "q/#")
    manager = net.bridge("A", "B", ["q/# out 1"], protocol_version="mqttv50")
    net.settle()
    a.publish_message("q/big", b"x" * 4096, qos=1)
    a.publish_message("q/small", b"ok", qos=1)
    net.settle(2)
    stats = manager.stats["A-B"]
    assert got.payloads() == [b"ok"]
    assert stats.too_large == 1 and stats.queued == 0 and stats.connected


def test_bridge_metrics_are_exported_once_typed_and_labelled():
    """install() exports one mqttd_bridge_* set through the service seam: gauges, counters as counters, mesh reasons as whole words (REVIEW-BRIDGE 11a, 11b)."""
    from mqttd.admin.metrics import make_registry
    from mqttd.bridge.config import BridgeConfig, TopicMap
    from mqttd.bridge.service import install
    from mqttd.service import make_broker_service
    net = Net()
    service = make_broker_service(net.clock, listen=[], store="memory")
    config = BridgeConfig("up", (("127.0.0.1", 1),), (TopicMap("q/#", "out", 1),),
                          remote_clientid="edge")
    install(service, [config], endpoint_factory=lambda reactor, c: None)
    service.bridges.stats["up"].messages_out = 7
    service.bridges.mesh.dropped["hop-limit"] = 2
    samples = {(m.name, s.name, tuple(sorted(s.labels.items()))): (m.type, s.value)
               for m in make_registry(service.broker, service).collect() for s in m.samples}
    assert samples[("mqttd_bridge_connected", "mqttd_bridge_connected", (("bridge", "up"),))] \
        == ("gauge", 0)
    assert samples[("mqttd_bridge_messages_sent", "mqttd_bridge_messages_sent_total",
                    (("bridge", "up"),))] == ("counter", 7)
    assert samples[("mqttd_bridge_mesh_dropped", "mqttd_bridge_mesh_dropped_total",
                    (("reason", "hop-limit"),))] == ("counter", 2)
    reasons = {labels for (name, _s, labels) in samples if name == "mqttd_bridge_mesh_dropped"}
    assert reasons == {(("reason", r),) for r in ("duplicate", "loop", "hop-limit",
                                                  "v3-duplicate")}
    families = [m.name for m in make_registry(service.broker, service).collect()
                if m.name.startswith("mqttd_bridge_")]
    assert len(families) == len(set(families)) == 8   # one family per name


def test_metrics_page_with_a_bridge_passes_promtool(tmp_path):
    """The whole /metrics page of a broker running a bridge is a valid exposition: `promtool check metrics` (REVIEW-BRIDGE 11a)."""
    import shutil
    import subprocess

    from prometheus_client import generate_latest

    from mqttd.admin.metrics import make_registry
    from mqttd.bridge.config import BridgeConfig, TopicMap
    from mqttd.bridge.service import install
    from mqttd.service import make_broker_service
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (./dev installs the prometheus package)")
    net = Net()
    service = make_broker_service(net.clock, listen=[], store="memory")
    configs = [BridgeConfig(name, (("127.0.0.1", 1),), (TopicMap("q/#", "out", 1),),
                            remote_clientid=name) for name in ("up", "down")]
    install(service, configs, endpoint_factory=lambda reactor, c: None)
    page = generate_latest(make_registry(service.broker, service))
    assert b"mqttd_bridge_connected{" in page
    result = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True,
                            timeout=60)
    # exit 1 is also promtool's "lint problems" (naming advice); errors are parse failures
    assert b"error" not in result.stderr.lower() and b"parsing" not in result.stderr, \
        result.stderr.decode()
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_local_cleansession_forwards_while_up_and_keeps_nothing_while_down(net):
    """local_cleansession true: messages flow while connected; nothing queues while down."""
    a, b = net.broker("A"), net.broker("B")
    got = Collector(b, "q/#")
    manager = net.bridge("A", "B", ["q/# out 1"], local_cleansession=True)
    net.settle()
    a.publish_message("q/1", b"up", qos=1)
    net.settle()
    net.down("B")
    a.publish_message("q/2", b"lost", qos=1)
    assert manager.stats["A-B"].queued == 0
    net.up("B")
    net.settle(5)
    a.publish_message("q/3", b"up again", qos=1)
    net.settle()
    assert got.payloads() == [b"up", b"up again"]


def _failover_bridge(net, round_robin=False):
    """A bridge A -> [P (primary), S (secondary)] (iosim), with P down at first."""
    from mqttd.bridge.config import BridgeConfig, parse_topic_line
    from mqttd.bridge.service import BridgeManager, FailoverEndpoint

    from .harness import NetEndpoint
    net.broker("A")
    for name in ("P", "S"):
        net.broker(name)
    net.reachable["P"] = False
    config = BridgeConfig(connection="fo", addresses=(("127.0.0.1", 1), ("127.0.0.1", 2)),
                          remote_clientid="fo", round_robin=round_robin,
                          restart_timeout=(1.0, 2.0),
                          topics=(parse_topic_line("q/# out 1"),))
    manager = BridgeManager(
        net.brokers["A"], net.clock, [config],
        endpoint_factory=lambda reactor, c: FailoverEndpoint(
            [NetEndpoint(net, "P"), NetEndpoint(net, "S")], c.round_robin))
    manager.startService()
    return manager.bridges["fo"]


def _remote_of(net, bridge):
    for name in ("P", "S"):
        if "fo" in net.brokers[name].sessions and \
                net.brokers[name].sessions["fo"].connection is not None:
            return name
    return None


def test_bridge_on_a_secondary_probes_the_primary_and_moves_back_when_it_answers(net):
    """round_robin false (mosquitto's default): while on the secondary the primary is probed
    every 5 s; once it answers the bridge leaves the secondary (state 0 there) and reconnects
    to the primary at once, losing nothing queued."""
    bridge = _failover_bridge(net)
    net.settle(3)
    assert _remote_of(net, bridge) == "S" and bridge.stats.connected
    got_p = Collector(net.brokers["P"], "q/#")
    net.settle(12)                      # the primary is still down: probes fail, stay on S
    assert _remote_of(net, bridge) == "S"
    net.up("P")
    net.settle(bridge.primary_retry + 1)
    assert _remote_of(net, bridge) == "P" and bridge.stats.connected
    assert net.brokers["S"].retained["$SYS/broker/connection/fo/state"].payload == b"0"
    assert net.brokers["P"].retained["$SYS/broker/connection/fo/state"].payload == b"1"
    net.brokers["A"].publish_message("q/1", b"to the primary", qos=1)
    net.settle(1)
    assert got_p.payloads() == [b"to the primary"]
    # on the primary: no more probes, it stays
    net.settle(30)
    assert _remote_of(net, bridge) == "P" and bridge._probe_call is None


def test_round_robin_bridge_stays_on_the_address_that_worked(net):
    """round_robin true: no probing, the bridge stays on the secondary while it works."""
    bridge = _failover_bridge(net, round_robin=True)
    net.settle(3)
    assert _remote_of(net, bridge) == "S"
    net.up("P")
    net.settle(30)
    assert _remote_of(net, bridge) == "S" and bridge._probe_call is None


def test_a_primary_that_refuses_the_connect_is_probed_less_and_less_often(net):
    """A primary that accepts TCP but refuses CONNECT: the bridge goes back to the secondary
    each time and the probe interval doubles (no flapping every 5 s)."""
    from twisted.internet import defer

    class Refuser:
        def authenticate(self, connect):
            return defer.succeed(0x87)     # not authorized (v3: 0x05)
    bridge = _failover_bridge(net)
    net.settle(3)
    assert _remote_of(net, bridge) == "S"
    net.brokers["P"].authenticator = Refuser()
    net.up("P")
    net.settle(bridge.primary_retry + 5)
    assert _remote_of(net, bridge) == "S" and bridge.stats.connected
    assert bridge._probe_interval == 2 * bridge.primary_retry
    net.settle(2 * bridge.primary_retry + 5)
    assert _remote_of(net, bridge) == "S"
    assert bridge._probe_interval == 4 * bridge.primary_retry
    # once the primary takes it, the bridge stays there and the interval resets
    net.brokers["P"].authenticator = None
    net.settle(4 * bridge.primary_retry + 5)
    assert _remote_of(net, bridge) == "P" and bridge._probe_interval == bridge.primary_retry


def test_failed_reconnect_attempts_log_one_rate_limited_line(net):
    """A remote that stays down: one warn line per failed attempt at most, at most one a minute, with the reason, the delay and the count of attempts not logged; no Twisted retry/factory lines (REVIEW-BRIDGE 9b)."""
    from twisted.logger import formatEvent, globalLogPublisher
    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        net.broker("A")
        net.broker("B")
        net.reachable["B"] = False
        manager = net.bridge("A", "B", ["q/# out 1"])
        net.settle(125, step=1.0)
    finally:
        globalLogPublisher.removeObserver(observer)
    text = [formatEvent(e) for e in events]
    failed = [t for t in text if "connection attempt" in t and "failed" in t]
    assert not any("Scheduling retry" in t or "Starting factory" in t
                   or "Stopping factory" in t for t in text)
    assert 2 <= len(failed) <= 3, failed
    assert "B is down" in failed[0] and "next attempt in" in failed[0]
    assert "more failed attempts not logged" in failed[1]
    assert "B is down" in manager.stats["A-B"].last_error


def test_v3_triangle_with_qos_downgraded_on_the_links_delivers_once(net):
    """A copy that went round comes back at the links' QoS (2 -> 1), not the publisher's: still recognised, each broker gets it once."""
    brokers, managers, got = _v3_ring_each_publishes_once(net, qos=2)
    assert sum(m.mesh.dropped["v3-duplicate"] for m in managers) > 0
