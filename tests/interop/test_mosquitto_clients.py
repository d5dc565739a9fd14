"""mosquitto_pub / mosquitto_sub (MQTT 3.1, 3.1.1 and 5.0) against the broker.

mosquitto_sub runs with ``-d`` so the test can see its SUBACK before publishing
(no sleeping); its messages are printed with ``-F`` as ``MSG|topic|qos|retain|payload``.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.interop

WAIT = 10  # seconds: mosquitto_sub -W, and every wait below
FORMAT = "MSG|%t|%q|%r|%p"  # ("@" starts a date format in -F)
VERSIONS = ["mqttv31", "mqttv311", "mqttv5"]


def unique(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


class Sub:
    """A running ``mosquitto_sub -d``; its stdout is read line by line on a thread."""

    def __init__(self, clients, broker, topic, *args, version="mqttv311", count=1):
        # mosquitto_sub block-buffers a pipe: stdbuf makes it line-buffered so the
        # SUBACK line shows up as it happens.
        stdbuf = shutil.which("stdbuf")
        self.cmd = [
            *([stdbuf, "-oL"] if stdbuf else []),
            clients.sub, "-h", broker.host, "-p", str(broker.port), "-V", version,
            "-t", topic, "-C", str(count), "-W", str(WAIT), "-d", "-F", FORMAT, *args,
        ]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next_line(self, deadline):
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("mosquitto_sub: no output in time; so far:\n" + "\n".join(self.seen))
        if line is not None:
            self.seen.append(line)
        return line

    def wait_subscribed(self):
        deadline = time.monotonic() + WAIT
        while True:
            line = self._next_line(deadline)
            if line is None:
                raise AssertionError("mosquitto_sub exited before SUBACK:\n" + "\n".join(self.seen))
            if "received SUBACK" in line:
                return

    def finish(self):
        """Wait for exit; returns ``[(topic, qos, retain, payload)]`` of the messages printed."""
        try:
            rc = self.proc.wait(WAIT + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("mosquitto_sub did not exit:\n" + "\n".join(self.seen))
        deadline = time.monotonic() + 5
        while self._next_line(deadline) is not None:
            pass
        assert rc == 0, "mosquitto_sub exit %s:\n%s" % (rc, "\n".join(self.seen))
        out = []
        for line in self.seen:
            if line.startswith("MSG|"):
                topic, qos, retain, payload = line[4:].split("|", 3)
                out.append((topic, int(qos), int(retain), payload))
        return out

    def expect(self, messages):
        """Wait for exit and compare what was printed; the failure shows the whole -d output."""
        got = self.finish()
        assert got == messages, "mosquitto_sub printed %r, expected %r; its output:\n%s" % (
            got, messages, "\n".join(self.seen))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def subs(mosquitto_clients):
    started = []

    def start(broker, topic, *args, **kwargs):
        s = Sub(mosquitto_clients, broker, topic, *args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def pub(clients, broker, topic, *args, version="mqttv311"):
    proc = subprocess.run(
        [clients.pub, "-h", broker.host, "-p", str(broker.port), "-V", version, "-t", topic, *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT,
    )
    assert proc.returncode == 0, "mosquitto_pub exit %s: %s%s" % (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("version", VERSIONS)
def test_mosquitto_pub_to_mosquitto_sub(mqttd_broker, mosquitto_clients, subs, version):
    """mosquitto_sub -C 1 receives what mosquitto_pub -q 1 sends, for each protocol version."""
    topic = "t/" + version
    s = subs(mqttd_broker, topic, "-q", "1", version=version)
    s.wait_subscribed()
    pub(mosquitto_clients, mqttd_broker, topic, "-m", "hello", "-q", "1", version=version)
    s.expect([(topic, 1, 0, "hello")])


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_retained_message_and_clearing(mqttd_broker, mosquitto_clients, subs, version):
    """-r keeps the message for later subscribers (retain flag set); -r -n clears it."""
    topic = "ret/" + version
    pub(mosquitto_clients, mqttd_broker, topic, "-m", "kept", "-q", "1", "-r", version=version)
    s = subs(mqttd_broker, topic, "-q", "1", version=version)
    s.expect([(topic, 1, 1, "kept")])

    pub(mosquitto_clients, mqttd_broker, topic, "-n", "-q", "1", "-r", version=version)
    # After clearing, the first message a new subscriber sees is a fresh, non-retained marker.
    s = subs(mqttd_broker, "ret/#", "-q", "1", version=version)
    s.wait_subscribed()
    pub(mosquitto_clients, mqttd_broker, "ret/marker", "-m", "marker", "-q", "1", version=version)
    s.expect([("ret/marker", 1, 0, "marker")])


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_persistent_session_gets_offline_message(mqttd_broker, mosquitto_clients, subs, version):
    """mosquitto_sub -c -i ID -q 1 subscribes and leaves; a QoS 1 message waits for its return."""
    client_id = unique("fixedid")
    topic = "persist/" + version
    session = ["-c", "-i", client_id, "-q", "1"]
    if version == "mqttv5":
        session += ["-x", "300"]  # v5 sessions end with the connection unless given an expiry
    first = subs(mqttd_broker, topic, *session, "-E", version=version)
    first.expect([])

    pub(mosquitto_clients, mqttd_broker, topic, "-m", "queued while away", "-q", "1", version=version)

    back = subs(mqttd_broker, topic, *session, version=version)
    back.expect([(topic, 1, 0, "queued while away")])
