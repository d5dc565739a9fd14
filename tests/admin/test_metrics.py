"""Prometheus metrics: collected lazily from broker state, served by twisted.web."""
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mqttd.admin.metrics import MetricsResource, make_registry
from mqttd.admin.ring import IncidentRing
from mqttd.codec.packets import Properties
from mqttd.metrics import LatencyHistogram
from tests.core.harness import FakeClient, make_broker


def _samples(registry):
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_collector_reports_connections_sessions_traffic_and_drops():
    """Every documented series reads live broker state at scrape time."""
    broker, clock = make_broker(max_queued_messages=1)
    ring = IncidentRing(clock)
    ring.attach(broker)
    registry = make_registry(broker, None, ring)
    v5 = FakeClient(broker, clock, level=5)
    v5.connect("v5", properties=Properties())
    v5.conn.listener = "tcp:1883"
    v5.subscribe("a/#", qos=1)
    away = FakeClient(broker, clock)
    away.connect("away", clean=False)
    away.subscribe("a/#", qos=1)
    away.drop()
    broker.publish_message("a/1", b"12345", qos=1)
    broker.publish_message("a/2", b"123", qos=0)
    broker.publish_message("a/3", b"1", qos=1, retain=True)
    v5.publish("$SYS/no", b"x", qos=1)  # refused
    s = _samples(registry)
    assert s[("mqttd_connections", (("listener", "tcp:1883"), ("protocol", "5.0")))] == 1
    assert s[("mqttd_sessions", (("state", "online"),))] == 1
    assert s[("mqttd_sessions", (("state", "offline"),))] == 1
    assert s[("mqttd_sessions_persistent", ())] == 1
    assert s[("mqttd_subscriptions", ())] == 2
    assert s[("mqttd_retained_messages", ())] == 1
    assert s[("mqttd_messages_received_total", (("qos", "1"),))] == 2
    assert s[("mqttd_messages_received_total", (("qos", "0"),))] == 1
    assert s[("mqttd_payload_bytes_received_total", (("qos", "1"),))] == 6
    assert s[("mqttd_messages_sent_total", (("qos", "1"),))] == 2
    assert s[("mqttd_messages_dropped_total", (("reason", "queue-full"),))] == 1
    assert s[("mqttd_queued_messages", ())] == 1
    assert s[("mqttd_inflight_messages", ())] == 2
    assert s[("mqttd_inflight_bytes", ())] == len("a/1") + 5 + len("a/3") + 1
    assert s[("mqttd_refusals_total", (("reason", "publish-refused"),))] == 1
    assert s[("mqttd_clients_maximum", ())] == 2
    assert ("mqttd_build_info", (("broker_id", "mqttd"), ("version", __import__("mqttd").__version__))) in s


def test_store_latency_histograms_are_exported_when_the_store_has_them():
    """A store with write/fsync LatencyHistograms gets mqttd_store_*_seconds histograms."""
    broker, clock = make_broker()
    broker.store.write_latency = LatencyHistogram()
    broker.store.fsync_latency = LatencyHistogram()
    broker.store.fsync_latency.observe(0.003)
    broker.store.fsync_latency.observe(2.0)
    s = _samples(make_registry(broker))
    assert s[("mqttd_store_fsync_seconds_count", ())] == 2
    assert s[("mqttd_store_fsync_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("mqttd_store_fsync_seconds_bucket", (("le", "+Inf"),))] == 2
    assert s[("mqttd_store_write_seconds_count", ())] == 0


def test_feature_gauges_registered_on_the_service_are_exported():
    """BrokerService.add_gauge: bridges/cluster export their state without importing admin."""
    from mqttd.service import BrokerService
    broker, clock = make_broker()
    service = BrokerService(clock, broker, listen=[], sys_interval=0)
    service.add_gauge("mqttd_bridge_connected", "Bridge connected (1) or not (0)",
                      ["bridge"], lambda: [(("edge",), 1), (("cloud",), 0)])
    s = _samples(make_registry(broker, service))
    assert s[("mqttd_bridge_connected", (("bridge", "edge"),))] == 1
    assert s[("mqttd_bridge_connected", (("bridge", "cloud"),))] == 0


def test_metrics_resource_serves_the_text_format():
    from twisted.web.test.requesthelper import DummyRequest
    broker, clock = make_broker()
    request = DummyRequest([b""])
    body = MetricsResource(make_registry(broker)).render_GET(request)
    assert b"mqttd_uptime_seconds" in body
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")


def test_publishing_with_nobody_scraping_touches_no_metric_object():
    """The hot path updates plain counters only: the collector is idle between scrapes."""
    broker, clock = make_broker()
    registry = make_registry(broker)
    collector = next(iter(registry._collector_to_names))
    calls = []
    original = collector.collect
    collector.collect = lambda: calls.append(1) or original()
    for _ in range(100):
        broker.publish_message("a", b"x")
    assert calls == []
    generate_latest(registry)
    assert calls == [1]


def test_suppressed_log_lines_are_counted():
    """Lines held back by the client-triggered log rate limit show in
    mqttd_log_lines_suppressed_total, so a quiet log never hides a flood."""
    broker, clock = make_broker()
    registry = make_registry(broker, None, None)
    c = FakeClient(broker, clock)
    c.connect("noisy")
    for _ in range(10):
        c.publish("$SYS/no", b"x")
    assert _samples(registry)[("mqttd_log_lines_suppressed_total", ())] == 7


def test_feature_counters_are_exported_as_counters_once():
    """BrokerService.add_counter: a feature's counters are typed counter (name_total); a name is
    exported once, so the page stays a valid exposition (REVIEW-BRIDGE 11a)."""
    from mqttd.service import BrokerService
    broker, clock = make_broker()
    service = BrokerService(clock, broker, listen=[], sys_interval=0)
    service.add_gauge("mqttd_bridge_messages_sent", "x", ["bridge"], lambda: [(("e",), 1)])
    service.add_counter("mqttd_bridge_messages_sent", "Messages sent", ["bridge"],
                        lambda: [(("edge",), 5), (("cloud",), 0)])
    registry = make_registry(broker, service)
    s = _samples(registry)
    assert s[("mqttd_bridge_messages_sent_total", (("bridge", "edge"),))] == 5
    assert ("mqttd_bridge_messages_sent", (("bridge", "e"),)) not in s
    text = generate_latest(registry).decode()
    types = [line for line in text.splitlines()
             if line.startswith("# TYPE mqttd_bridge_messages_sent")]
    assert len(types) == 1 and types[0].endswith(" counter"), types
    assert len([line for line in text.splitlines()
                if line.startswith("# HELP mqttd_bridge_messages_sent")]) == 1


def test_queued_bytes_held_counts_a_fanned_out_message_once():
    """mqttd_queued_bytes counts what each session is owed, mqttd_queued_bytes_held what
    the broker holds (--max-queued-bytes-total): one message for 3 offline sessions."""
    broker, clock = make_broker()
    registry = make_registry(broker, None, IncidentRing(clock))
    for cid in ("a", "b", "c"):
        away = FakeClient(broker, clock)
        away.connect(cid, clean=False)
        away.subscribe("t/#", qos=1)
        away.drop()
    broker.publish_message("t/1", b"x" * 1000, qos=1)
    s = _samples(registry)
    assert s[("mqttd_queued_bytes", ())] == 3 * 1003
    assert s[("mqttd_queued_bytes_held", ())] == 1003
