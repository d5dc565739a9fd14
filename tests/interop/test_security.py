"""Security with real clients: mosquitto_passwd files, ACLs, SCRAM AUTH, SIGHUP reloads.

A broker subprocess on a loopback port; mosquitto_pub/mosquitto_sub, paho-mqtt
and a scramp-driven raw socket as clients.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5, MQTTv311
from scramp import ScramClient

from mqttd.blockingclient import BlockingClient
from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import (
    Auth, Connack, Connect, Pingreq, Pingresp, Properties, Publish, Suback, Subscribe,
    Subscription)

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only]

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
WAIT = 10.0


def _wait_for(predicate, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _log(broker) -> str:
    return broker.log_path.read_text(errors="replace")


@pytest.fixture
def password_file(tmp_path):
    """A file made by the real mosquitto_passwd: alice/wonderland, bob/builder."""
    if MOSQUITTO_PASSWD is None:
        pytest.fail("mosquitto_passwd not found (package mosquitto): run ./dev test")
    path = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(path), "alice", "wonderland"],
                   check=True, capture_output=True, timeout=30)
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), "bob", "builder"],
                   check=True, capture_output=True, timeout=30)
    return path


def paho_connack(port, protocol, username=None, password=None, client_id="paho"):
    """The CONNACK reason code paho reports (v3 return codes come back as v5 values)."""
    results = queue.Queue()
    client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if username is not None:
        client.username_pw_set(username, password)
    client.on_connect = lambda c, u, flags, rc, props=None: results.put(rc.value)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        return results.get(timeout=WAIT)
    finally:
        client.disconnect()
        client.loop_stop()


def mosquitto_sub(clients, port, *args, timeout=WAIT):
    """Run mosquitto_sub; returns (exit status, stdout lines, stderr)."""
    proc = subprocess.run([clients.sub, "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout + 5)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_mosquitto_passwd_file_right_and_wrong_passwords(mqttd_broker_factory, password_file,
                                                         mosquitto_clients):
    """A mosquitto_passwd file works unchanged: right in, wrong 0x04/0x86, anonymous 0x05/0x87."""
    broker = mqttd_broker_factory(extra_args=["--password-file", str(password_file)])
    port = broker.port
    assert paho_connack(port, MQTTv311, "alice", "wonderland") == 0
    assert paho_connack(port, MQTTv5, "bob", "builder") == 0
    assert paho_connack(port, MQTTv5, "alice", "wrong") == 0x86
    assert paho_connack(port, MQTTv5, "nobody", "x") == 0x86
    assert paho_connack(port, MQTTv5) == 0x87
    # the v3 return codes themselves, as mosquitto_sub reads them off the wire
    rc, _, err = mosquitto_sub(mosquitto_clients, port, "-t", "x", "-u", "alice", "-P", "no",
                               "-V", "mqttv311", "-C", "1", "-W", "3")
    assert rc != 0 and "bad user name or password" in err.lower()
    rc, _, err = mosquitto_sub(mosquitto_clients, port, "-t", "x", "-V", "mqttv311",
                               "-C", "1", "-W", "3")
    assert rc != 0 and "not authori" in err.lower()
    # right password: a retained message comes through
    subprocess.run([mosquitto_clients.pub, "-h", "127.0.0.1", "-p", str(port), "-u", "bob",
                    "-P", "builder", "-t", "hello", "-m", "world", "-r", "-q", "1"],
                   check=True, capture_output=True, timeout=WAIT)
    rc, lines, err = mosquitto_sub(mosquitto_clients, port, "-t", "hello", "-u", "alice",
                                   "-P", "wonderland", "-C", "1", "-W", "5")
    assert rc == 0 and lines == ["world"], err
    log = _log(broker)
    assert "Anonymous clients are refused: authentication is configured" in log
    assert "wonderland" not in log and "builder" not in log  # never a password in the log


def test_loopback_default_lets_anonymous_in_and_says_so(mqttd_broker_factory):
    """No authentication, loopback only: anonymous clients are in (the tutorial)."""
    broker = mqttd_broker_factory()
    assert paho_connack(broker.port, MQTTv311) == 0
    assert ("Anonymous clients are allowed: every listener is on loopback and no "
            "authentication is configured") in _log(broker)


def test_allow_anonymous_with_a_password_file(mqttd_broker_factory, password_file):
    """--allow-anonymous lets clients without a user name in; wrong passwords still fail."""
    broker = mqttd_broker_factory(extra_args=["--password-file", str(password_file),
                                              "--allow-anonymous"])
    assert paho_connack(broker.port, MQTTv5) == 0
    assert paho_connack(broker.port, MQTTv5, "alice", "nope") == 0x86


def test_session_of_another_user_is_refused(mqttd_broker_factory, password_file,
                                            mosquitto_clients):
    """bob cannot take over (or clean) alice's session: v5 0x87, v3 0x05."""
    broker = mqttd_broker_factory(extra_args=["--password-file", str(password_file)])
    alice = BlockingClient(broker.port, "device-1", clean=False, username="alice",
                           password=b"wonderland")
    assert paho_connack(broker.port, MQTTv5, "bob", "builder", client_id="device-1") == 0x87
    rc, _, err = mosquitto_sub(
        mosquitto_clients, broker.port, "-t", "x", "-i", "device-1", "-u", "bob",
        "-P", "builder", "-V", "mqttv311", "-C", "1", "-W", "3")
    assert rc != 0 and "not authori" in err.lower()
    alice.send(Pingreq())
    assert isinstance(alice.next_packet(5), Pingresp)  # alice was not kicked off
    alice.close()


ACL = """\
# anonymous: nothing
user alice
topic read public/#
topic readwrite alice/#
user bob
topic write public/#
topic write alice/inbox
pattern readwrite clients/%c/#
pattern read users/%u/#
"""


def test_acl_with_patterns_on_publish_subscribe_retained_and_will(
        mqttd_broker_factory, password_file, mosquitto_clients, tmp_path):
    """mosquitto ACL syntax with %c/%u, applied by the broker to real clients."""
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    broker = mqttd_broker_factory(extra_args=["--password-file", str(password_file),
                                              "--acl-file", str(acl)])
    port = broker.port

    def pub(user, password, topic, payload, *extra):
        subprocess.run([mosquitto_clients.pub, "-h", "127.0.0.1", "-p", str(port), "-u", user,
                        "-P", password, "-t", topic, "-m", payload, "-q", "1", *extra],
                       check=True, capture_output=True, timeout=WAIT)

    pub("bob", "builder", "public/news", "retained-ok", "-r")
    pub("bob", "builder", "secret/plan", "retained-no", "-r")
    # alice subscribes to everything: '#' is allowed, delivery filters per topic
    alice = BlockingClient(port, "alice-dev", level=5, username="alice",
                           password=b"wonderland")
    alice.send(Subscribe(1, (Subscription("#", 1), Subscription("secret/#", 1))))
    packets = [alice.next_packet(5), alice.next_packet(5)]
    suback = next(p for p in packets if isinstance(p, Suback))
    assert suback.reason_codes == (1, 0x87)
    retained = [p for p in packets if isinstance(p, Publish)]
    assert [(p.topic, p.payload) for p in retained] == [("public/news", b"retained-ok")]
    pub("bob", "builder", "secret/x", "live-no")         # bob may not write: dropped (v3)
    pub("bob", "builder", "alice/inbox", "live-ok")
    pub("bob", "builder", "users/bob/x", "pattern-no")   # %u gives bob read only
    got = alice.next_packet(5)
    assert (got.topic, got.payload) == ("alice/inbox", b"live-ok")
    # a v5 publisher hears the refusal: PUBACK 0x87
    acked = queue.Queue()
    paho = Client(CallbackAPIVersion.VERSION2, client_id="bob-v5", protocol=MQTTv5)
    paho.username_pw_set("bob", "builder")
    paho.on_publish = lambda c, u, mid, rc, props: acked.put(rc.value)
    paho.connect("127.0.0.1", port)
    paho.loop_start()
    try:
        paho.publish("secret/x", b"no", qos=1)
        assert acked.get(timeout=WAIT) == 0x87
        paho.publish("clients/bob-v5/state", b"own", qos=1)  # %c pattern
        assert acked.get(timeout=WAIT) in (0, 0x10)
    finally:
        paho.disconnect()
        paho.loop_stop()
    # a will on a topic the user may not write: CONNECT refused
    rc, _, err = mosquitto_sub(mosquitto_clients, port, "-t", "alice/x", "-u", "alice",
                               "-P", "wonderland", "--will-topic", "public/will",
                               "--will-payload", "x", "-C", "1", "-W", "3")
    assert rc != 0 and "not authori" in err.lower()
    alice.close()
    assert "Refused publish for bob-v5" in _log(broker)


def test_sighup_reloads_password_and_acl_files_without_dropping_connections(
        mqttd_broker_factory, password_file, tmp_path):
    """New users and rules apply on SIGHUP; connected clients stay; lost rights end subs."""
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\ntopic readwrite b/#\n")
    broker = mqttd_broker_factory(extra_args=["--password-file", str(password_file),
                                              "--acl-file", str(acl)])
    alice = BlockingClient(broker.port, "alice-1", username="alice", password=b"wonderland")
    alice.send(Subscribe(1, (Subscription("a/#", 0), Subscription("b/#", 0))))
    assert alice.next_packet(5).reason_codes == (0, 0)
    assert paho_connack(broker.port, MQTTv5, "carol", "c4rol") == 0x86
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(password_file), "carol", "c4rol"],
                   check=True, capture_output=True, timeout=30)
    acl.write_text("user alice\ntopic readwrite a/#\n")
    broker.signal(signal.SIGHUP)
    _wait_for(lambda: "Reloaded acl_file" in _log(broker) and
              "Reloaded password_file" in _log(broker), what="reload log lines")
    assert paho_connack(broker.port, MQTTv5, "carol", "c4rol") == 0
    alice.send(Pingreq())
    assert isinstance(alice.next_packet(5), Pingresp)  # same connection
    alice.send(Publish("b/1", b"gone", 0, False), Publish("a/1", b"kept", 0, False))
    got = alice.next_packet(5)
    assert (got.topic, got.payload) == ("a/1", b"kept")
    assert "no longer allowed after reload" in _log(broker)
    # a broken file is refused and the old one stays in force
    acl.write_text("tpoic read x\n")
    broker.signal(signal.SIGHUP)
    _wait_for(lambda: "Reloading acl_file failed" in _log(broker), what="failed reload")
    alice.send(Publish("a/2", b"still", 0, False))
    assert alice.next_packet(5).payload == b"still"
    alice.close()


class RawClient:
    """A raw MQTT 5 socket on the project's codec (for AUTH exchanges)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.reader = PacketReader(level=5)
        self.pending = []

    def send(self, packet):
        self.sock.sendall(encode(packet, 5))

    def next(self):
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by broker")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True


def _scram(raw, scram, first_packet):
    raw.send(first_packet(scram.get_client_first().encode()))
    challenge = raw.next()
    assert isinstance(challenge, Auth) and challenge.reason_code == 0x18
    scram.set_server_first(challenge.properties.authentication_data.decode())
    raw.send(Auth(0x18, Properties(authentication_method="SCRAM-SHA-256",
                                   authentication_data=scram.get_client_final().encode())))
    return raw.next()


def test_scram_sha_256_auth_packets_over_a_socket(mqttd_broker_factory, tmp_path):
    """mqttd passwd --scram credentials; CONNECT/AUTH/CONNACK, re-auth, wrong proof 0x86."""
    from mqttd.auth.passwd import main as passwd
    path = tmp_path / "passwd"
    assert passwd(["-c", "-b", "--scram", "--iterations", "4096", str(path), "dave",
                   "s3cret"]) == 0
    broker = mqttd_broker_factory(extra_args=["--password-file", str(path)])
    method = "SCRAM-SHA-256"

    def connect(data):
        return Connect(5, "dave-1", True, 0, properties=Properties(
            authentication_method=method, authentication_data=data))

    raw = RawClient(broker.port)
    scram = ScramClient([method], "dave", "s3cret")
    connack = _scram(raw, scram, connect)
    assert isinstance(connack, Connack) and connack.reason_code == 0
    scram.set_server_final(connack.properties.authentication_data.decode())  # server proven
    again = ScramClient([method], "dave", "s3cret")
    done = _scram(raw, again, lambda data: Auth(0x19, Properties(
        authentication_method=method, authentication_data=data)))
    assert isinstance(done, Auth) and done.reason_code == 0
    raw.send(Pingreq())
    assert isinstance(raw.next(), Pingresp)
    wrong = RawClient(broker.port)
    connack = _scram(wrong, ScramClient([method], "dave", "guess"), connect)
    assert isinstance(connack, Connack) and connack.reason_code == 0x86
    assert wrong.closed()
    unknown = RawClient(broker.port)
    unknown.send(Connect(5, "x", True, 0, properties=Properties(authentication_method="GSSAPI")))
    assert unknown.next().reason_code == 0x8C
    # the SCRAM entry also serves a plain password
    assert paho_connack(broker.port, MQTTv5, "dave", "s3cret") == 0


@pytest.mark.parametrize("version,wrong,anonymous", [(4, 4, 5), (5, 0x86, 0x87)],
                         ids=["v311", "v5"])
def test_mqttjs_logs_in_with_a_password_file(mqttd_broker_factory, password_file, node_mqtt,
                                             version, wrong, anonymous):
    """MQTT.js: right password in; wrong and missing ones get the CONNACK codes."""
    script = Path(__file__).resolve().parent / "mqttjs_auth.js"
    broker = mqttd_broker_factory(extra_args=["--password-file", str(password_file)])

    def login(*credentials):
        proc = subprocess.run([node_mqtt.node, str(script), str(broker.port), broker.host,
                               str(version), *credentials],
                              env=dict(os.environ, MQTTJS_MODULE=node_mqtt.module),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30)
        lines = proc.stdout.strip().splitlines()
        assert lines, proc.stderr
        return json.loads(lines[-1])

    assert login("alice", "wonderland") == {"connected": True, "code": 0}
    assert login("alice", "nope") == {"connected": False, "code": wrong}
    assert login() == {"connected": False, "code": anonymous}


def test_admin_user_logs_in_with_the_password_file(mqttd_broker_factory, password_file):
    """--admin-user alice: HTTP Basic with her mosquitto_passwd password is 200, wrong ones 401, logged."""
    import base64
    import urllib.error
    import urllib.request
    broker = mqttd_broker_factory(extra_args=[
        "--password-file", str(password_file), "--admin-user", "alice",
        "--admin-listen", "tcp:0:interface=127.0.0.1"])
    port = broker.ready["http"]["admin"][0]["port"]

    def get(user, password):
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/info",
                                         headers={"Authorization": "Basic " + token})
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, None

    status, info = get("alice", "wonderland")
    assert status == 200 and info["broker_id"]
    assert get("alice", "wrong")[0] == 401
    assert get("bob", "builder")[0] == 401            # a broker user, but no --admin-user
    _wait_for(lambda: "Refused admin-login" in _log(broker), what="the refusal line")
    log = _log(broker)
    assert "AttributeError" not in log and "wonderland" not in log and "builder" not in log


def test_one_user_that_took_every_session_does_not_lock_out_another(mqttd_broker_factory,
                                                                      password_file):
    """REVIEW-S9 R10 with --max-sessions-per-user >= --max-sessions: alice's throwaway
    sessions fill the cap; bob's new persistent session still gets CONNACK 0 (it was 0x03),
    one of alice's offline sessions makes room, and the start-up log warned."""
    broker = mqttd_broker_factory(extra_args=[
        "--password-file", str(password_file),
        "--max-sessions", "4", "--max-sessions-per-user", "10"])
    for i in range(6):                   # 2 more than the cap: alice evicts her own
        BlockingClient(broker.port, f"alice-junk-{i}", clean=False, username="alice",
                       password=b"wonderland", timeout=WAIT).close()
    bob = BlockingClient(broker.port, "bob-device", clean=False, username="bob",
                         password=b"builder", timeout=WAIT)
    assert bob.connack.reason_code == 0 and not bob.connack.session_present
    bob.close()
    _wait_for(lambda: "fair share" in _log(broker), what="the eviction line")
    log = _log(broker)
    assert "--max-sessions-per-user 10 is not below --max-sessions 4" in log
    assert "Evicting session alice-junk-2 of 'alice'" in log
    # bob's session is there: it resumes
    again = BlockingClient(broker.port, "bob-device", clean=False, username="bob",
                           password=b"builder", timeout=WAIT)
    assert again.connack.session_present
    again.close()


def test_an_anonymous_flood_does_not_cost_another_client_its_queued_message(
        mqttd_broker_factory):
    """REVIEW-S10 S6 on loopback (every anonymous client one address): 20 throwaway
    persistent sessions under --max-sessions-per-user 5 evict their own empty sessions;
    the offline subscriber's queued QoS 1 message is still delivered when it returns."""
    broker = mqttd_broker_factory(extra_args=["--max-sessions-per-user", "5"])
    victim = BlockingClient(broker.port, "victim", clean=False, timeout=WAIT)
    victim.send(Subscribe(1, (Subscription("s6/#", 1),)))
    assert isinstance(victim.next_packet(WAIT), Suback)
    victim.close()
    publisher = BlockingClient(broker.port, "s6-pub", timeout=WAIT)
    publisher.send(Publish("s6/x", b"kept", 1, packet_id=1))
    assert publisher.next_packet(WAIT).__class__.__name__ == "Puback"
    publisher.close()
    for i in range(20):
        BlockingClient(broker.port, f"s6-junk-{i}", clean=False, timeout=WAIT).close()
    back = BlockingClient(broker.port, "victim", clean=False, timeout=WAIT)
    assert back.connack.session_present
    message = back.next_packet(WAIT)
    assert isinstance(message, Publish) and message.payload == b"kept"
    back.close()
    _wait_for(lambda: "anonymous@127.0.0.1" in _log(broker), what="the eviction lines")
