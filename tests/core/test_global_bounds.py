"""Global bounds: --max-sessions and --max-queued-bytes-total, refused and counted clearly."""
from __future__ import annotations

import pytest

from mqttd.codec.packets import Connack, Disconnect, Properties, Publish

from core.harness import FakeClient, make_broker



def persistent_v5(broker, clock, client_id, expect_ok=True):
    c = FakeClient(broker, clock, level=5)
    packets = c.connect(client_id, clean=False,
                        properties=Properties(session_expiry_interval=3600),
                        expect_ok=expect_ok)
    return c, packets


def total_queued(broker):
    return sum(s.queued_bytes for s in broker.sessions.values())


# --- --max-sessions -------------------------------------------------------------------------

@pytest.mark.parametrize("level, code", [(5, 0x97), (4, 0x03)])
def test_one_persistent_session_too_many_is_refused_with_connack(log_events, level, code):
    """At --max-sessions a new persistent session gets CONNACK 0x97 (v3 0x03), then a close."""
    broker, clock = make_broker(max_sessions=2)
    for i in range(2):
        persistent_v5(broker, clock, f"p{i}")[0].drop()
    c = FakeClient(broker, clock, level=level)
    props = Properties(session_expiry_interval=60) if level == 5 else Properties()
    packets = c.connect("p2", clean=False, properties=props, expect_ok=False)
    assert len(packets) == 1 and isinstance(packets[0], Connack)
    assert packets[0].reason_code == code and not packets[0].session_present
    assert c.disconnecting
    assert "p2" not in broker.sessions
    assert broker.stats.refused.get("max-sessions") == 1
    assert broker.stats.persistent_sessions == 2
    lines = [e for e in log_events if "max-sessions" in str(e.get("why", ""))]
    assert len(lines) == 1 and lines[0]["reason_code"] == 0x97


def test_resuming_or_clean_sessions_are_not_counted_against_max_sessions():
    """At the cap, an existing persistent session resumes and clean sessions connect."""
    broker, clock = make_broker(max_sessions=1)
    first, _ = persistent_v5(broker, clock, "p0")
    first.drop()
    again, packets = persistent_v5(broker, clock, "p0")
    assert packets[0].session_present
    clean = FakeClient(broker, clock, level=5)
    clean.connect("clean")
    again.send(Disconnect(0, Properties(session_expiry_interval=0)))   # ends p0
    persistent_v5(broker, clock, "p1")                                 # room again
    assert "max-sessions" not in broker.stats.refused


# --- --max-queued-bytes-total ---------------------------------------------------------------

def offline_subscribers(broker, clock, n):
    for i in range(n):
        c, _ = persistent_v5(broker, clock, f"s{i}")
        c.subscribe("t/#", qos=1)
        c.drop()


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-new"])
def test_total_queued_bytes_stay_within_the_cap(log_events, policy):
    """Queues of all sessions together stay within the cap (plus one message); drops counted."""
    broker, clock = make_broker(max_queued_bytes_total=10_000, overflow_policy=policy)
    offline_subscribers(broker, clock, 5)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(200):                  # 200 x 5 x 103 bytes = 103,000 bytes offered
        pub.publish("t/x", b"p" * 100, qos=1, packet_id=i % 65535 + 1)
    assert broker.stats.queued_bytes == total_queued(broker)
    assert total_queued(broker) <= 10_000 + 103
    assert broker.stats.dropped["queued-bytes-total"] > 900
    warnings = [e for e in log_events if "max-queued-bytes-total" in e.get("log_format", "")]
    assert len(warnings) == 1            # rate-limited: one a minute
    if policy == "drop-new":
        # the oldest are kept: s0 got the first messages
        assert broker.sessions["s0"].queue[0].message.payload == b"p" * 100


def test_ledger_follows_drains_and_discarded_sessions():
    """Delivering or discarding queued messages gives their bytes back to the total."""
    broker, clock = make_broker(max_queued_bytes_total=1_000_000)
    offline_subscribers(broker, clock, 3)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(10):
        pub.publish("t/x", b"p" * 100, qos=1, packet_id=i + 1)
    assert broker.stats.queued_bytes == 3 * 10 * 103
    back, _ = persistent_v5(broker, clock, "s0")           # drains s0
    assert len([p for p in back.received() if isinstance(p, Publish)]) == 10
    assert broker.stats.queued_bytes == 2 * 10 * 103
    FakeClient(broker, clock, level=5).connect("s1", clean=True)   # discards s1's queue
    assert broker.stats.queued_bytes == 10 * 103 == total_queued(broker)
