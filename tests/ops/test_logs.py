"""Log format and level, packet tracing and systemd notification, in-process."""
import io
import json
import socket

from twisted.logger import Logger, capturedLogs

from mqttd import debuglog, logs, systemd, trace
from mqttd.codec.packets import Connect, Publish, Will
from tests.core.harness import FakeClient, make_broker


def test_level_filter_drops_lower_levels_and_can_change_at_run_time():
    """--log-level warn hides info lines; set_level (SIGHUP reload) changes it at once."""
    out = io.StringIO()
    settings = logs.LogSettings("warn")
    observer = logs.make_observer(out, "text", settings)
    log = Logger(namespace="t", observer=observer)
    log.info("hidden {x}", x=1)
    log.warn("shown {x}", x=2)
    settings.set_level("debug")
    log.debug("now shown {x}", x=3)
    text = out.getvalue()
    assert "hidden" not in text and "shown 2" in text and "now shown 3" in text
    assert debuglog.enabled
    settings.set_level("info")
    assert not debuglog.enabled


def test_text_lines_are_twisteds_text_lines_with_the_time_formatted_once_per_second():
    """The text observer caches the formatted second (half a connect's CPU on PyPy):
    its lines stay byte-identical to textFileLogObserver's, across second boundaries."""
    from twisted.logger import LogLevel, textFileLogObserver
    ours, theirs = io.StringIO(), io.StringIO()
    mine, reference = logs.text_observer(ours), textFileLogObserver(theirs)
    for t in (1000.0, 1000.25, 1000.999, 1001.0, 999.5, 1001.5, None):
        event = {"log_format": "clientConnected {client_id}", "client_id": "c1",
                 "log_namespace": "mqttd.events", "log_level": LogLevel.info,
                 "log_time": t}
        mine(dict(event))
        reference(dict(event))
    assert ours.getvalue() == theirs.getvalue()
    assert len(set(line[:25] for line in ours.getvalue().splitlines())) >= 4


def test_text_lines_match_twisted_for_every_kind_of_event():
    """The str.format_map fast path and its fallbacks (calls, attributes, specs,
    conversions, missing fields, failures, log_system, newlines, no format) write
    exactly what textFileLogObserver writes."""
    from twisted.logger import LogLevel, textFileLogObserver
    from twisted.python.failure import Failure

    class Peer:
        host = "127.0.0.1"

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_namespace": "mqttd.x", "log_level": LogLevel.warn, "log_time": 1234.5}
    events = [
        {"log_format": "plain {a} {b!r} {c:>5} {p.host}", "a": 1, "b": "x", "c": 7,
         "p": Peer()},
        {"log_format": "called {f()}", "f": lambda: "yes"},
        {"log_format": "missing {nope}"},
        {"log_format": "positional {} {0}"},
        {"log_format": "two\nlines {a}", "a": "and\nmore"},
        {"log_format": "failed {a}", "a": 1, "log_failure": failure},
        {"log_format": "system {a}", "a": 1, "log_system": "sys"},
        {"log_format": "", "a": 1},
        {"log_format": b"bytes {a}", "a": 1},
        {"a": 1},
        {"log_format": "no level {a}", "a": 1, "log_level": None},
    ]
    ours, theirs = io.StringIO(), io.StringIO()
    mine, reference = logs.text_observer(ours), textFileLogObserver(theirs)
    for extra in events:
        mine({**base, **extra})
        reference({**base, **extra})
    assert ours.getvalue() == theirs.getvalue()
    assert "plain 1 'x'     7 127.0.0.1" in ours.getvalue()


def test_json_format_round_trips_named_fields():
    """--log-format json writes events whose named fields survive as JSON."""
    out = io.StringIO()
    log = Logger(namespace="mqttd.x", observer=logs.make_observer(out, "json"))
    log.info("Client {client_id} connected", client_id="c1")
    event = json.loads(out.getvalue().strip("\x1e\n"))
    assert event["client_id"] == "c1" and event["log_namespace"] == "mqttd.x"


def test_trace_logs_packets_of_a_traced_client_without_payload_bytes():
    """A traced client's packets are logged both ways; payloads and passwords never."""
    broker, clock = make_broker(trace_clients={"c1"})
    client = FakeClient(broker, clock)
    with capturedLogs() as events:
        client.send(Connect(4, "c1", True, 0, "user", b"secret",
                            will=Will("w", b"will-bytes", 0, False)))
        client.received()
        client.publish("a/b", b"payload-bytes")
    from twisted.logger import formatEvent
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "mqttd.trace"]
    assert lines[0].startswith("trace c1 <- Connect(")
    assert "password=<hidden>" in lines[0] and "secret" not in lines[0]
    assert "will-bytes" not in lines[0] and "payload=<10 bytes>" in lines[0]
    assert any(line.startswith("trace c1 -> Connack(") for line in lines)
    assert any("Publish(" in line and "payload=<13 bytes>" in line for line in lines)
    assert all(e["log_level"].name == "info" for e in events
               if e.get("log_namespace") == "mqttd.trace")


def test_untraced_client_is_not_wrapped():
    """Clients not named by --trace-client pay nothing: reader and transport untouched."""
    broker, clock = make_broker(trace_clients={"someone-else"})
    client = FakeClient(broker, clock)
    client.connect("c1")
    assert not isinstance(client.conn.reader, trace._TracingReader)
    assert client.conn.transport is client.transport


def test_describe_leaves_out_empty_properties():
    assert trace.describe(Publish("t", b"xy", 1, False, packet_id=3)) == (
        "Publish(topic='t', payload=<2 bytes>, qos=1, retain=False, dup=False, packet_id=3)")


def test_sd_notify_sends_to_notify_socket(tmp_path):
    """sd_notify: one datagram to $NOTIFY_SOCKET; nothing (False) without it."""
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path})
        assert sock.recv(100) == b"READY=1"
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_trace_covers_a_refused_connect_and_its_connack():
    """--trace-client traces the CONNECT and the refusing CONNACK too (the case one most needs to debug)."""
    from twisted.logger import formatEvent

    class Refuse:
        def authenticate(self, request):
            return 0x86
    broker, clock = make_broker(trace_clients={"c1"})
    broker.authenticator = Refuse()
    client = FakeClient(broker, clock)
    with capturedLogs() as events:
        client.send(Connect(4, "c1", True, 0, "user", b"wrong"))
        client.received()
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "mqttd.trace"]
    assert lines[0].startswith("trace c1 <- Connect(") and "wrong" not in lines[0]
    assert "trace c1 -> Connack(session_present=False, reason_code=4)" in lines


def test_trace_hides_authentication_data_of_connect_and_auth_both_ways():
    """SCRAM nonces, salt and proofs in a trace are a password verifier: shown as their size only
    (REVIEW-SEC2 N17)."""
    from twisted.logger import formatEvent

    from mqttd.codec.packets import Auth, Properties
    from mqttd.hooks import AuthOutcome, AuthStep

    class Exchange:
        def step(self, data):
            if data == b"client-first-NONCE":
                return AuthStep(AuthOutcome.CONTINUE, data=b"server-first-SALT")
            return AuthStep(AuthOutcome.SUCCESS, data=b"server-final-SIG", username="sc")

    class Enhanced:
        def start(self, method, client):
            return Exchange()
    broker, clock = make_broker(trace_clients={"scc1"})
    broker.enhanced_authenticator = Enhanced()
    client = FakeClient(broker, clock, level=5)
    with capturedLogs() as events:
        client.send(Connect(5, "scc1", True, 0, properties=Properties(
            authentication_method="SCRAM-SHA-256", authentication_data=b"client-first-NONCE")))
        client.received()
        client.send(Auth(0x18, Properties(authentication_method="SCRAM-SHA-256",
                                          authentication_data=b"client-final-PROOF")))
        assert client.received()[0].reason_code == 0
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "mqttd.trace"]
    text = "\n".join(lines)
    assert len(lines) >= 4, text
    for secret in ("NONCE", "SALT", "PROOF", "SIG"):
        assert secret not in text, text
    assert "authentication_data=<hidden, 18 bytes>" in lines[0]
    assert "authentication_method='SCRAM-SHA-256'" in lines[0]


def test_long_client_supplied_fields_are_cut_in_text_and_json_lines():
    """A 60,000-character client id costs the log a bounded line, saying how long it was
    (REVIEW-SEC2 N12: the limiter bounded lines, not bytes: ~60 KB per refusal line)."""
    huge = "000123" + "X" * 59994
    for fmt in ("text", "json"):
        out = io.StringIO()
        log = Logger(namespace="mqttd.x", observer=logs.make_observer(out, fmt))
        log.warn("Refused {what} for {client_id} from {peer}: {detail}", what="anonymous",
                 client_id=huge, peer="127.0.0.1:5", detail=f"username {huge!r}")
        line = out.getvalue()
        assert len(line) < 4000, (fmt, len(line))     # JSON repeats fields (log_flattened)
        assert "000123XXX" in line and "...(60000 chars)" in line
        assert "127.0.0.1:5" in line


def test_refusal_line_of_a_real_connect_with_a_huge_client_id_is_bounded():
    """End to end: the anonymous refusal of a CONNECT with a 60,000-character client id, through
    the twistd observer, is one line of bounded size."""
    class Refuse:
        def authenticate(self, request):
            return 0x87
    out = io.StringIO()
    observer = logs.make_observer(out, "text")
    from twisted.logger import globalLogPublisher
    globalLogPublisher.addObserver(observer)
    try:
        broker, clock = make_broker()
        broker.authenticator = Refuse()
        client = FakeClient(broker, clock)
        client.send(Connect(4, "c" * 60000, True, 0))
        assert client.received()[0].reason_code == 5
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [line for line in out.getvalue().splitlines() if "Refused" in line]
    assert lines and all(len(line) < 2000 for line in lines), [len(x) for x in lines]
    assert "...(60000 chars)" in lines[0]


def test_short_fields_pass_unchanged_and_uncopied():
    """Ordinary events are not copied: the bound costs one scan per line."""
    event = {"log_format": "{client_id}", "client_id": "dev-7", "log_namespace": "x"}
    assert logs.bound_fields(event) is event
    assert logs.bound("x" * 300).endswith("...(300 chars)")
    assert logs.bound(12345) == 12345
