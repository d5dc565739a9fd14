"""`mqttd why`: each reason a message does not arrive is named from live state."""
import pytest
from twisted.internet import defer

from mqttd.admin.ring import IncidentRing
from mqttd.admin.why import diagnose_mismatch, explain
from mqttd.codec.packets import Properties
from mqttd.messages import Message
from tests.core.harness import FakeClient, make_broker


def _setup(**config):
    broker, clock = make_broker(**config)
    ring = IncidentRing(clock)
    ring.attach(broker)
    return broker, clock, ring


def _why(broker, ring, client, topic, **kw):
    d = explain(broker, ring, client, topic, **kw)
    results = []
    d.addBoth(results.append)
    assert results, "explain must answer at once for synchronous authorizers"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def _checks(answer):
    return {s["check"]: s for s in answer["steps"]}


def test_unknown_client_is_named_with_similar_ids():
    """A client id that never connected; a case-different id that exists is pointed out."""
    broker, clock, ring = _setup()
    FakeClient(broker, clock).connect("Sensor-1")
    answer = _why(broker, ring, "sensor-1", "a/b")
    assert answer["verdict"] == "not-delivered"
    assert answer["session"]["state"] == "unknown"
    assert "Sensor-1" in str(answer["steps"])


def test_clean_session_that_left_keeps_nothing():
    """A clean-session client that disconnected: published messages are not kept."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock)
    client.connect("c1", clean=True)
    client.subscribe("a/b", qos=1)
    client.drop()
    answer = _why(broker, ring, "c1", "a/b")
    assert answer["session"]["state"] == "ended"
    assert answer["verdict"] == "not-delivered"
    assert "clean session" in _checks(answer)["session"]["detail"]


def test_expired_session_is_reported_with_what_was_discarded():
    """A v5 session that outlived its Session Expiry Interval is 'expired', with its queue count."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock, level=5)
    client.connect("c1", clean=False, properties=Properties(session_expiry_interval=60))
    client.subscribe("a/b", qos=1)
    client.drop()
    broker.publish_message("a/b", b"x", qos=1)
    clock.advance(61)
    answer = _why(broker, ring, "c1", "a/b")
    assert answer["session"]["state"] == "expired"
    assert "1 queued or in-flight messages discarded" in answer["steps"][-1]["detail"]


@pytest.mark.parametrize("subscribed, topic, fragment", [
    ("Sensors/+/temp", "sensors/1/temp", "differs only in letter case"),
    ("sensors/+", "sensors/1/temp", "'sensors/+/#' would match deeper levels"),
    ("#", "$SYS/broker/uptime", "[MQTT-4.7.2-1]"),
    ("/sensors/1", "sensors/1", "leading '/'"),
    ("sensors/2/temp", "sensors/1/temp", "level 2 differs: '2' in the filter, '1' in the topic"),
    ("sensors/1/temp/x", "sensors/1/temp", "the topic only 3"),
])
def test_no_matching_subscription_names_the_nearest_filter_and_the_difference(
        subscribed, topic, fragment):
    """When nothing matches, the nearest filters are listed with how they differ."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock)
    client.connect("c1")
    client.subscribe(subscribed, "unrelated/topic")
    answer = _why(broker, ring, "c1", topic)
    assert answer["verdict"] == "not-delivered"
    assert answer["nearest"][0]["filter"] == subscribed
    assert fragment in answer["nearest"][0]["why"]


def test_online_match_is_delivered_at_the_lower_of_granted_and_published_qos():
    """Granted QoS 0 with published QoS 2: delivered at QoS 0."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock)
    client.connect("c1")
    client.subscribe("a/#", qos=0)
    answer = _why(broker, ring, "c1", "a/b", qos=2)
    assert answer["verdict"] == "delivered"
    assert answer["delivered_qos"] == 0
    assert answer["matching"][0] == {"filter": "a/#", "granted_qos": 0, "delivered_qos": 0,
                                     "no_local": False, "retain_as_published": False}


def test_offline_qos0_is_not_kept_but_qos1_is_queued():
    """An offline persistent session: QoS 0 is not kept (unless --queue-qos0), QoS 1 waits."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock)
    client.connect("c1", clean=False)
    client.subscribe("a/b", qos=1)
    client.drop()
    qos0 = _why(broker, ring, "c1", "a/b", qos=0)
    assert qos0["verdict"] == "not-delivered"
    assert "--queue-qos0" in _checks(qos0)["offline-qos0"]["detail"]
    assert _why(broker, ring, "c1", "a/b", qos=1)["verdict"] == "queued"
    broker2, clock2, ring2 = _setup(queue_qos0=True)
    c2 = FakeClient(broker2, clock2)
    c2.connect("c1", clean=False)
    c2.subscribe("a/b", qos=1)
    c2.drop()
    assert _why(broker2, ring2, "c1", "a/b", qos=0)["verdict"] == "queued"


def test_full_queue_says_what_the_policy_drops_and_lists_recent_drops():
    """A full queue: the policy's victim is named and the ring shows the drops."""
    broker, clock, ring = _setup(max_queued_messages=2, overflow_policy="drop-new")
    client = FakeClient(broker, clock)
    client.connect("c1", clean=False)
    client.subscribe("a/b", qos=1)
    client.drop()
    for _ in range(3):
        broker.publish_message("a/b", b"x", qos=1)
    answer = _why(broker, ring, "c1", "a/b", qos=1)
    assert answer["verdict"] == "not-delivered"
    assert answer["queue"]["full"] is True
    assert "a new message is dropped" in _checks(answer)["queue"]["detail"]
    assert answer["recent"][-1]["reason"] == "queue-full"
    assert "dropped a QoS 1 message to 'a/b': queue-full" in answer["recent"][-1]["text"]
    assert "1 queue-full" in _checks(answer)["dropped"]["detail"]


def test_no_local_subscription_skips_the_clients_own_messages():
    """v5 No Local: the publisher's own subscription does not get its message."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock, level=5)
    client.connect("c1")
    client.subscribe("a/b", qos=1, no_local=True)
    answer = _why(broker, ring, "c1", "a/b", publisher="c1")
    assert answer["verdict"] == "not-delivered"
    assert "[MQTT-3.8.3-3]" in _checks(answer)["no-local"]["detail"]
    assert _why(broker, ring, "c1", "a/b", publisher="c2")["verdict"] == "delivered"


class _Authorizer:
    """An authorizer of the seam: c1 may not read secret/#, c2 may not write."""

    def authorize_forward(self, client, message):
        return not (client.client_id == "c1" and message.topic.startswith("secret/"))

    def authorize_publish(self, client, message):
        return defer.succeed(client.client_id != "c2")

    def authorize_subscribe(self, client, topic_filter, qos):
        return True


def test_acl_verdicts_come_from_the_authorizer_seam():
    """Read and write verdicts are asked of the configured authorizer."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock)
    client.connect("c1")
    client.subscribe("#", qos=1)
    broker.authorizer = _Authorizer()
    refused = _why(broker, ring, "c1", "secret/x")
    assert refused["verdict"] == "not-delivered"
    assert _checks(refused)["acl-read"]["ok"] is False
    writer = _why(broker, ring, "c1", "open/x", publisher="c2")
    assert writer["verdict"] == "not-delivered"
    assert _checks(writer)["acl-write"]["ok"] is False
    assert _why(broker, ring, "c1", "open/x", publisher="c3")["verdict"] == "delivered"


def _shared_group(**config):
    broker, clock, ring = _setup(**config)
    for cid in ("c1", "c2"):
        client = FakeClient(broker, clock)
        client.connect(cid)
        client.subscribe("$share/g/a/#", qos=1)
    return broker, clock, ring


def test_shared_subscription_says_which_member_gets_the_next_message():
    """Round-robin: the answer names the member chosen next; after one message it moves on."""
    broker, clock, ring = _shared_group()
    answer = _why(broker, ring, "c1", "a/b")
    assert answer["matching"][0]["share_group"] == "g"
    assert answer["matching"][0]["group_members"] == ["c1", "c2"]
    assert answer["matching"][0]["next_member"] == "c1"
    assert answer["verdict"] == "delivered"
    assert "ONE of the 2 members" in _checks(answer)["shared"]["detail"]
    broker.publish_message("a/b", b"x", qos=1)  # goes to c1; c2 is next
    answer = _why(broker, ring, "c1", "a/b")
    assert answer["verdict"] == "not-delivered"
    assert "goes to 'c2', not 'c1'" in _checks(answer)["shared"]["detail"]


def test_shared_subscription_with_random_strategy_is_a_maybe():
    """A random pick cannot be predicted: the verdict is 'maybe'."""
    broker, clock, ring = _shared_group(shared_subscription_strategy="random")
    answer = _why(broker, ring, "c1", "a/b")
    assert answer["verdict"] == "maybe"
    assert "picked at random" in _checks(answer)["shared"]["detail"]


def test_queued_messages_past_their_expiry_are_counted():
    """Messages whose Message Expiry Interval passed while queued are reported."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock, level=5)
    client.connect("c1", clean=False, properties=Properties(session_expiry_interval=3600))
    client.subscribe("a/b", qos=1)
    client.drop()
    broker.publish(Message("a/b", b"x", 1, expires_at=clock.seconds() + 5))
    clock.advance(10)
    answer = _why(broker, ring, "c1", "a/b")
    assert answer["queue"]["expired_waiting"] == 1
    assert _checks(answer)["expiry"]["ok"] is False


def test_refusals_reach_the_ring_even_when_the_log_is_rate_limited():
    """Every refusal of a client is in its ring, though the log shows only a few."""
    broker, clock, ring = _setup()
    client = FakeClient(broker, clock, level=5)
    client.connect("c1")
    for _ in range(10):
        client.publish("$SYS/x", b"x", qos=1)
    recent = ring.recent("c1")
    assert recent[-1].reason == "publish-refused"
    assert recent[-1].repeated == 10
    assert ring.counts["publish-refused"] == 10


def test_ring_is_bounded_per_client_and_in_clients():
    """At most per_client incidents per client and max_clients clients are kept."""
    from twisted.internet.task import Clock
    ring = IncidentRing(Clock(), per_client=3, max_clients=2)
    for i in range(10):
        ring.record("a", "r", f"t{i}")
    assert [i.text for i in ring.recent("a")] == ["t7", "t8", "t9"]
    ring.record("b", "r", "x")
    ring.record("c", "r", "x")
    assert ring.recent("a") == [] and ring.recent("c")


def test_invalid_topic_is_a_value_error():
    broker, clock, ring = _setup()
    with pytest.raises(ValueError, match="not a valid topic name"):
        _why(broker, ring, "c1", "a/+")


def test_diagnose_prefers_a_case_mismatch_over_a_level_mismatch():
    assert diagnose_mismatch("A/b", "a/b")["score"] > diagnose_mismatch("a/+/c", "a/b")["score"]


def test_ring_entries_are_bounded_and_escaped_whatever_the_client_sends():
    """A client id of 20,000 characters with CR/ESC, refused 10 times: its ring entry is
    found under the full id, but holds the id cut to 256 characters and a text of at most
    TEXT_LIMIT characters with its control characters escaped (`mqttd why` prints it)."""
    from mqttd.admin.ring import TEXT_LIMIT
    broker, clock, ring = _setup()
    huge = "x\r\x1b[31m" + "i" * 20000
    client = FakeClient(broker, clock, level=5)
    client.connect(huge)
    for _ in range(10):
        client.publish("$SYS/x", b"x", qos=1)
    (incident,) = [i for i in ring.recent(huge) if i.reason == "publish-refused"]
    assert incident.repeated == 10
    assert len(incident.text) <= TEXT_LIMIT + 20
    assert "\r" not in incident.text and "\x1b" not in incident.text
    assert "x\\r\\x1b[31m" in incident.text
    assert all(len(key) < 300 for key in ring._rings)


def test_why_output_escapes_what_clients_chose():
    """`mqttd why` prints a client's topic filters and incident texts to the operator's
    terminal: their control characters come out escaped (no forged line, no colours)."""
    from mqttd.admin.cli import render
    text = render({
        "verdict": "not-delivered", "summary": "no subscription matches", "client": "c\x1b[2J",
        "steps": [{"ok": False, "check": "subscription", "detail": "none of 1 filter\rmatches"}],
        "nearest": [{"filter": "a/\n[mqttd#info] forged", "why": "level 1 differs"}],
        "recent": [{"reason": "publish-refused", "text": "x\x1b[31mRED", "repeated": 2}]})
    assert "\x1b" not in text and "\r" not in text
    assert "a/\\n[mqttd#info] forged: level 1 differs" in text
    assert not any(line.startswith("[mqttd#info]") for line in text.splitlines())
    assert "recent drops and refusals of c\\x1b[2J:" in text


def test_ring_is_bounded_in_bytes_over_all_clients():
    """10,000 ids x 50 refusals of 1 KiB fit the byte budget; the least recently active go first (REVIEW-S10 S10)."""
    from twisted.internet.task import Clock
    from mqttd.admin.ring import INCIDENT_OVERHEAD
    ring = IncidentRing(Clock(), max_bytes=1_000_000)
    for c in range(2000):
        for n in range(50):
            ring.record("rg%d" % c, "publish", str(n) + "r" * 1200)
        assert ring.bytes <= 1_000_000
    assert not ring.recent("rg0")                       # forgotten, oldest first
    assert len(ring.recent("rg1999")) == 50             # the latest is whole
    expected = sum(len(cid) + INCIDENT_OVERHEAD + sum(len(i.text) + INCIDENT_OVERHEAD for i in r)
                   for cid, r in ring._rings.items())
    assert ring.bytes == expected
    ring.record("rg1999", "publish", "49" + "r" * 1200)   # a repeat adds nothing
    assert ring.bytes == expected


def test_a_full_inflight_byte_window_says_the_message_waits_for_acknowledgements():
    """A subscriber that does not acknowledge: `why` names --max-inflight-bytes and the wait."""
    broker, clock, ring = _setup(max_inflight_bytes=2_000)
    client = FakeClient(broker, clock)
    client.connect("c1")
    client.subscribe("a/b", qos=1)
    answer = _why(broker, ring, "c1", "a/b", qos=1)
    assert _checks(answer)["inflight"]["ok"] is True
    for i in range(3):
        broker.publish_message("a/b", b"x" * 997, qos=1)
    answer = _why(broker, ring, "c1", "a/b", qos=1)
    step = _checks(answer)["inflight"]
    assert step["ok"] is False and "--max-inflight-bytes" in step["detail"]
    assert answer["session"]["inflight_bytes"] == 2_000
    assert answer["verdict"] == "queued"
