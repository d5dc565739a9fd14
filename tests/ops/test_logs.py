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
    event = json.loads(out.getvalue())
    assert event["client_id"] == "c1" and event["log_namespace"] == "mqttd.x"


def test_json_format_is_one_plain_object_per_line():
    """NDJSON: no RFC 7464 record separator (per-line parsers read every line), and plain
    level / time / message strings (REVIEW-S9 R18: every line started with 0x1E)."""
    from twisted.logger import eventsFromJSONLogFile
    out = io.StringIO()
    log = Logger(namespace="mqttd.x", observer=logs.make_observer(out, "json"))
    log.info("Client {client_id} connected", client_id="c1")
    log.warn("Refused {what}", what="x\ny")
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 3 and "\x1e" not in out.getvalue()
    first, second = (json.loads(line) for line in lines[:2])
    assert (first["level"], first["message"]) == ("info", "Client c1 connected")
    assert (second["level"], second["message"]) == ("warn", "Refused x\ny")
    assert first["time"][:2] == "20" and first["time"][10] == "T"
    back = list(eventsFromJSONLogFile(io.StringIO(out.getvalue()), recordSeparator=""))
    assert [e["client_id"] for e in back[:1]] == ["c1"]


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


def test_trace_lines_are_bounded_per_second():
    """20,000 PINGREQs of a traced client in one write: at most TRACE_LINES_PER_SECOND lines, then one summary (REVIEW-S10 S15)."""
    broker, clock = make_broker(trace_clients={"tr"})
    client = FakeClient(broker, clock)
    client.connect("tr")
    with capturedLogs() as events:
        client.send_bytes(bytes((0xC0, 0)) * 20000)
        for _ in range(200):                            # the turns of the held input, bounded
            clock.advance(0)
        clock.advance(1.5)
        client.send_bytes(bytes((0xC0, 0)))
    lines = [e for e in events if e.get("log_namespace") == "mqttd.trace"]
    assert len(lines) <= 2 * trace.TRACE_LINES_PER_SECOND + 4
    summary = [e for e in lines if "left out" in e["log_format"]]
    assert summary and summary[0]["count"] >= 20000 * 2 - 2 * trace.TRACE_LINES_PER_SECOND


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


def _refused_connect_log(client_id: str) -> str:
    """What the twistd text observer writes while a v3.1.1 CONNECT with ``client_id``
    is refused by the authenticator (CONNACK 0x05)."""
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
        client.send(Connect(4, client_id, True, 0))
        assert client.received()[0].reason_code == 5
    finally:
        globalLogPublisher.removeObserver(observer)
    return out.getvalue()


def test_refusal_line_of_a_real_connect_with_a_huge_client_id_is_bounded():
    """End to end: the anonymous refusal of a CONNECT with a 60,000-character client id, through
    the twistd observer, is one line of bounded size."""
    lines = [line for line in _refused_connect_log("c" * 60000).splitlines() if "Refused" in line]
    assert lines and all(len(line) < 2000 for line in lines), [len(x) for x in lines]
    assert "...(60000 chars)" in lines[0]


def test_short_fields_pass_unchanged_and_uncopied():
    """Ordinary events are not copied: the bound costs one scan per line."""
    event = {"log_format": "{client_id}", "client_id": "dev-7", "log_namespace": "x"}
    assert logs.bound_fields(event) is event
    assert logs.bound("x" * 300).endswith("...(300 chars)")
    assert logs.bound(12345) == 12345


# --- every observer mqttd installs: bounded fields, escaped controls in text -----------

#: a client id that forges a log line and recolours the operator's terminal (REVIEW-S9 R7)
FORGED = ("x\n2026-12-01T02:20:00+0000 [mqttd.auth#info] Admin login accepted for root "
          "from 10.0.0.1\r\n\x1b[31mRED")


def test_escape_controls_writes_c0_c1_and_del_as_escapes_and_leaves_text_alone():
    """CR, LF, TAB, ESC, DEL and C1 controls become their repr escapes; other text,
    non-ASCII letters included, is returned as it is (the same object)."""
    assert logs.escape_controls("a\rb\nc\td\x1b[31m\x7f\x85\x00") == \
        "a\\rb\\nc\\td\\x1b[31m\\x7f\\x85\\x00"
    plain = "sensor/é/温度 ok"
    assert logs.escape_controls(plain) is plain


def test_text_lines_escape_a_client_ids_control_characters_json_keeps_them_exact():
    """A client id with CR/LF/ESC makes one text line with the characters escaped (no
    forged line, no terminal escape); the JSON line carries the id exactly (JSON
    escapes it by construction), and the 256-character bound still applies."""
    out = io.StringIO()
    log = Logger(namespace="mqttd.x", observer=logs.make_observer(out, "text"))
    log.warn("Closing connection of {client_id}: {why}", client_id=FORGED, why="bad\rwhy")
    log.warn("Refused {client_id}", client_id=FORGED + "\x1b" * 1000)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 2, lines
    assert "x\\n2026-12-01T02:20:00+0000 [mqttd.auth#info]" in lines[0]
    assert "\\r\\n\\x1b[31mRED: bad\\rwhy" in lines[0]
    assert f"...({len(FORGED) + 1000} chars)" in lines[1] and len(lines[1]) < 256 * 4 + 100
    out = io.StringIO()
    Logger(namespace="mqttd.x", observer=logs.make_observer(out, "json")).warn(
        "Closing connection of {client_id}", client_id=FORGED)
    assert json.loads(out.getvalue())["client_id"] == FORGED


def test_refusal_of_a_real_connect_with_a_forged_client_id_is_one_escaped_line():
    """End to end through the twistd text observer: the refusal of a CONNECT whose
    client id carries a forged line is one line, no raw CR or ESC."""
    text = _refused_connect_log(FORGED)
    assert "\r" not in text and "\x1b" not in text
    assert not any(line.startswith("2026-12-01T02:20:00") for line in text.splitlines())
    assert "Admin login accepted for root from 10.0.0.1\\r\\n\\x1b[31mRED" in text


class _Syslog:
    """Stands in for the stdlib syslog calls of twistd's SyslogObserver."""

    def __init__(self, monkeypatch):
        from twisted.python.syslog import SyslogObserver
        self.opened, self.messages = [], []
        monkeypatch.setattr(SyslogObserver, "openlog",
                            lambda _self, *args: self.opened.append(args))
        monkeypatch.setattr(SyslogObserver, "syslog",
                            lambda _self, priority, message: self.messages.append(message))


def _twistd_options(tmp_path, *argv, **parent):
    from mqttd import tap
    options = tap.Options()
    options.parseOptions(["--persistence", "memory", *argv])
    options.parent = parent
    return options


def test_twistd_syslog_gets_mqttds_observer_with_the_bound_escapes_and_level(
        monkeypatch, tmp_path):
    """Under `twistd --syslog` mqttd installs its own observer around twistd's syslog
    observer (it used to leave twistd's, unbounded and unfiltered): a 60,000-character
    client id with a newline is one syslog message of bounded size, controls escaped,
    under --prefix, and --log-level applies."""
    from mqttd import tap
    monkeypatch.setattr(tap, "install_signal_handlers", lambda reactor, service: None)
    syslog = _Syslog(monkeypatch)
    options = _twistd_options(tmp_path, "--log-level", "warn", syslog=True,
                              prefix="mqttd-test")
    service = tap.makeService(options)
    observer = service.log_observer
    assert observer is not None and syslog.opened[0][0] == "mqttd-test"
    log = Logger(namespace="mqttd.connection", observer=observer)
    log.info("hidden {client_id}", client_id="c1")
    log.warn("Refused {client_id}", client_id=FORGED + "X" * 60000)
    assert len(syslog.messages) == 1, syslog.messages
    (message,) = syslog.messages
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert len(message) < 1200 and "chars)" in message
    # the namespace stands where twistd's syslog lines show a system ("[-]" before)
    assert message.startswith("[mqttd.connection] Refused x\\n2026-12-01")


def test_twistd_logfile_observer_bounds_and_escapes_fields(monkeypatch, tmp_path):
    """The --logfile observer (the other branch of the same choice) bounds and escapes
    the same way, in the --log-format it is given."""
    from mqttd import tap
    path = tmp_path / "mqttd.log"
    for fmt in ("text", "json"):
        options = _twistd_options(tmp_path, "--log-format", fmt, logfile=str(path))
        observer = tap._log_observer(options, logs.LogSettings("info"))
        Logger(namespace="mqttd.x", observer=observer).warn(
            "Refused {client_id}", client_id=FORGED + "X" * 60000)
    text = path.read_text()
    first, second = text.split("\n", 1)
    assert "\r" not in first and "\x1b" not in first and "...(60098 chars)" in first
    event = json.loads(second.strip("\x1e\n"))
    assert event["client_id"].endswith("...(60098 chars)")
    assert event["client_id"].startswith(FORGED)
