"""examples/embed.py runs: an existing Twisted program embeds the broker."""
import pathlib
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "embed.py"

pytestmark = pytest.mark.interop


def test_embedded_broker_publishes_and_receives_in_process():
    """The example's in-process ticks reach a paho client; a client's command reaches the app."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--listen", "tcp:0:interface=127.0.0.1",
         "--duration", "20"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        port = int(line.split()[-1])
        ticks = []
        got_tick = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="embed-test")

        def on_message(_c, _u, msg):
            ticks.append(msg.payload)
            got_tick.set()
        client.on_message = on_message
        client.connect("127.0.0.1", port)
        client.subscribe("example/ticks")
        client.loop_start()
        assert got_tick.wait(10), "no tick from the embedding program"
        client.publish("example/commands", b"hello", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline and "command received" not in line:
            line = proc.stdout.readline()
        assert line.strip() == "command received: hello"
        client.loop_stop()
        client.disconnect()
        assert ticks[0].isdigit()
    finally:
        proc.kill()
        proc.wait(10)
