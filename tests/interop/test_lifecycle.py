"""Signals and lifecycle of a real broker process: SIGHUP, SIGTERM, systemd, log formats."""
import json
import signal
import socket
import time

import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import (
    Disconnect, Pingreq, Pingresp, Properties, Publish, Suback, Subscribe, Subscription)

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only]


def _wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _log(broker):
    return broker.log_path.read_text(errors="replace")


def test_sighup_reloads_log_level_without_dropping_connections(mqttd_broker_factory, tmp_path):
    """SIGHUP re-reads the config file's log level; connected clients stay connected."""
    config = tmp_path / "mqttd.toml"
    config.write_text('log-level = "info"\n')
    broker = mqttd_broker_factory(extra_args=["--config", str(config)])
    client = BlockingClient(broker.port, "hup-client", level=5)
    client.send(Publish("before/reload", b"x", 0, False))
    client.send(Pingreq())  # the PUBLISH is handled before the SIGHUP (no race)
    assert isinstance(client.next_packet(5), Pingresp)
    config.write_text('log-level = "debug"\n')
    broker.signal(signal.SIGHUP)
    _wait_for(lambda: "Reloaded log_level" in _log(broker), what="reload log line")
    client.send(Pingreq())
    assert isinstance(client.next_packet(5), Pingresp)  # same connection still served
    client.send(Publish("after/reload", b"x", 0, False))
    _wait_for(lambda: "after/reload" in _log(broker), what="a debug line")
    assert "before/reload" not in _log(broker)  # debug lines only since the reload
    assert broker.running
    client.close()


def test_sigterm_sends_v5_disconnect_0x8b_and_keeps_the_stored_session(mqttd_broker_factory):
    """SIGTERM: every v5 client gets DISCONNECT 0x8B, the store is flushed, sessions survive."""
    broker = mqttd_broker_factory(persistence="file:data")
    client = BlockingClient(broker.port, "term-client", clean=False, level=5,
                            properties=Properties(session_expiry_interval=3600))
    client.send(Subscribe(1, (Subscription("term/#", 1),)))
    assert isinstance(client.next_packet(5), Suback)
    broker.signal(signal.SIGTERM)
    packet = client.next_packet(10)
    assert isinstance(packet, Disconnect) and packet.reason_code == 0x8B
    _wait_for(lambda: not broker.running, what="broker exit")
    assert broker.returncode in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
    broker.start()
    again = BlockingClient(broker.port, "term-client", clean=False, level=5,
                           properties=Properties(session_expiry_interval=3600))
    assert again.connack.session_present
    again.close()


@pytest.mark.parametrize("persistence", ["memory", "file:data"])
def test_sigterm_disconnect_0x8b_reaches_every_v5_client_whatever_the_store(
        mqttd_broker_factory, persistence):
    """The DISCONNECT 0x8B is written before the reactor stops, also when closing the store takes no reactor turn."""
    broker = mqttd_broker_factory(persistence=persistence)
    clients = [BlockingClient(broker.port, "term-%d" % i, level=5) for i in range(3)]
    v3 = BlockingClient(broker.port, "term-v3", level=4)
    broker.signal(signal.SIGTERM)
    for client in clients:
        packet = client.next_packet(10)
        assert isinstance(packet, Disconnect) and packet.reason_code == 0x8B, packet
    v3.sock.settimeout(10)
    assert v3.sock.recv(10) == b""    # v3 has no server DISCONNECT: the connection closes
    _wait_for(lambda: not broker.running, what="broker exit")
    assert broker.returncode in (0, -signal.SIGTERM)


def test_systemd_notify_ready_and_stopping(mqttd_broker_factory, tmp_path):
    """With NOTIFY_SOCKET set (Type=notify), READY=1 arrives once listening, STOPPING=1 on stop."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        broker = mqttd_broker_factory(env={"NOTIFY_SOCKET": path})
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        assert f"MAINPID={broker.pid}" in ready.splitlines()
        broker.stop()
        assert "STOPPING=1" in sock.recv(4096).decode()
    finally:
        sock.close()


def test_json_log_format_writes_one_json_event_per_line(mqttd_broker_factory):
    """--log-format json: every line is a twisted.logger JSON event with named fields."""
    broker = mqttd_broker_factory(extra_args=["--log-format", "json"])
    BlockingClient(broker.port, "json-client").close()
    _wait_for(lambda: "json-client" in _log(broker), what="client log line")
    events = [json.loads(line.strip("\x1e")) for line in _log(broker).splitlines()
              if line.strip() and not line.startswith("===")]
    listening = [e for e in events if e.get("log_namespace") == "mqttd.service"
                 and "MQTT listening" in e.get("log_format", "")]
    assert listening and listening[0]["endpoint"] == "tcp:0:interface=127.0.0.1"


def test_trace_client_logs_that_clients_packets_only(mqttd_broker_factory):
    """--trace-client ID logs each packet of that client at info, other clients' not."""
    broker = mqttd_broker_factory(extra_args=["--trace-client", "traced"])
    traced = BlockingClient(broker.port, "traced")
    traced.send(Pingreq())
    traced.next_packet(5)
    BlockingClient(broker.port, "other").close()
    traced.close()
    _wait_for(lambda: "trace traced <- Disconnect" in _log(broker), what="trace lines")
    text = _log(broker)
    assert "trace traced <- Connect(" in text and "password=None" in text
    assert "trace traced -> Connack(" in text
    assert "trace traced <- Pingreq()" in text and "trace traced -> Pingresp()" in text
    assert "trace other" not in text


def test_sighup_reloads_the_password_file_and_keeps_connected_clients(
        mqttd_broker_factory, tmp_path):
    """A user added to the password file can connect after SIGHUP; others stay connected."""
    import subprocess
    import sys
    passwords = tmp_path / "passwords"

    def passwd(*args):
        subprocess.run([sys.executable, "-m", "mqttd.cli", "passwd", *args],
                       check=True, capture_output=True, timeout=60)
    passwd("-c", "-b", str(passwords), "alice", "wonderland")
    broker = mqttd_broker_factory(extra_args=["--password-file", str(passwords)])
    alice = BlockingClient(broker.port, "alice-1", username="alice", password=b"wonderland")
    with pytest.raises(ConnectionError):
        BlockingClient(broker.port, "bob-1", username="bob", password=b"builder")
    passwd("-b", str(passwords), "bob", "builder")
    broker.signal(signal.SIGHUP)
    _wait_for(lambda: "Reloaded password_file" in _log(broker), what="password reload")
    BlockingClient(broker.port, "bob-1", username="bob", password=b"builder").close()
    alice.send(Pingreq())
    assert isinstance(alice.next_packet(5), Pingresp)  # not dropped by the reload
    alice.close()


def test_subscribe_with_many_filters_writes_one_event_line(mqttd_broker_factory):
    """One SUBSCRIBE of 1,000 filters (the default limit): one ``subscribed`` line
    (not 1,000), a SUBACK for all, other clients served."""
    broker = mqttd_broker_factory()
    client = BlockingClient(broker.port, "many", level=4)
    filters = tuple(Subscription("x/%d/+" % i, 1) for i in range(1000))
    client.send(Subscribe(7, filters))
    probe = BlockingClient(broker.port, "probe", level=4)   # CONNACK while the big one is handled
    probe.send(Pingreq())
    assert isinstance(probe.next_packet(10), Pingresp)
    suback = client.next_packet(30)
    assert isinstance(suback, Suback) and len(suback.reason_codes) == 1000
    client.send(Pingreq())
    assert isinstance(client.next_packet(10), Pingresp)    # its lines are flushed by now
    _wait_for(lambda: "subscribed many to 1000 filters" in _log(broker), what="the event line")
    assert _log(broker).count("subscribed many") == 1
    probe.close()
    client.close()


def test_subscribe_over_the_default_filter_limit_is_refused_and_logged_once(
        mqttd_broker_factory):
    """Default settings: a v5 SUBSCRIBE of 100,000 filters gets DISCONNECT 0x97 and one
    refusal line; a probe connected meanwhile is served."""
    from mqttd.codec.packets import Disconnect
    broker = mqttd_broker_factory()
    client = BlockingClient(broker.port, "many", level=5)
    probe = BlockingClient(broker.port, "probe", level=4)
    client.send(Subscribe(7, tuple(Subscription("x/%d/+" % i, 1) for i in range(100_000))))
    answer = client.next_packet(30)
    assert isinstance(answer, Disconnect) and answer.reason_code == 0x97
    probe.send(Pingreq())
    assert isinstance(probe.next_packet(10), Pingresp)
    _wait_for(lambda: "Refused max-topic-filters-per-packet for many" in _log(broker),
              what="the refusal line")
    assert _log(broker).count("max-topic-filters-per-packet") == 1
    probe.close()
    client.close()


@pytest.mark.slow
def test_a_subscribe_of_100000_filters_with_the_limit_lifted_lets_others_be_served(
        mqttd_broker_factory):
    """--max-topic-filters-per-packet 0: the SUBSCRIBE is handled in slices; a probe's
    PINGREQ sent meanwhile is answered before the SUBACK of all 100,000 filters."""
    broker = mqttd_broker_factory(extra_args=("--max-topic-filters-per-packet", "0",
                                              "--log-level", "warn"))
    client = BlockingClient(broker.port, "many", level=4)
    probe = BlockingClient(broker.port, "probe", level=4)
    client.send(Subscribe(7, tuple(Subscription("x/%d/+" % i, 1) for i in range(100_000))))
    time.sleep(0.3)                                       # the big one is being handled
    probe.send(Pingreq())
    assert isinstance(probe.next_packet(10), Pingresp)
    suback = client.next_packet(120)
    assert isinstance(suback, Suback) and len(suback.reason_codes) == 100_000
    client.send(Pingreq())
    assert isinstance(client.next_packet(30), Pingresp)
    probe.close()
    client.close()
