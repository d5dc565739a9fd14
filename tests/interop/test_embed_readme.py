"""The README's embedding example runs as written, with a durable store, across a restart."""
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from brokerproc import READY_TIMEOUT, PortInUse, address_in_use, start_on_free_port
from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import Publish, Suback, Subscribe, Subscription

pytestmark = pytest.mark.interop

README = pathlib.Path(__file__).resolve().parents[2] / "README.rst"
MARK = "``tests/interop/test_embed_readme.py``)::"


def readme_example() -> str:
    text = README.read_text()
    lines = text[text.index(MARK) + len(MARK):].splitlines()[1:]
    block = []
    for line in lines:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def _wait_port(port, proc, timeout=READY_TIMEOUT):
    """Wait (bounded) until the app listens on ``port``; PortInUse if it could not
    bind it (taken meanwhile), an assertion with its output if it exited otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read()
            if address_in_use(out):
                raise PortInUse(out[-2000:])
            raise AssertionError(f"the app exited with {proc.returncode}:\n{out[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"nothing listening on {port} after {timeout:.0f} s:\n"
                         f"{proc.communicate(timeout=15)[0][-2000:]}")


def test_readme_embedding_example_serves_persistent_sessions_across_a_restart(tmp_path):
    """The example opens its file store: a persistent client's queue survives a restart."""
    code = readme_example()
    assert 'store_from_spec("file:/var/lib/myapp/mqtt", reactor)' in code
    assert '"tcp:1883"' in code
    script = tmp_path / "app.py"

    def start_on(port):
        # the example names its port: written into it, another one if it was taken
        script.write_text(code.replace("/var/lib/myapp/mqtt", str(tmp_path / "data"))
                          .replace('"tcp:1883"', f'"tcp:{port}:interface=127.0.0.1"'))
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
        _wait_port(port, proc)
        return proc, port

    def start():
        return start_on_free_port(start_on)

    def stop(proc):
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        return out

    app, port = start()
    try:
        client = BlockingClient(port, "field-device", clean=False)
        client.send(Subscribe(1, (Subscription("app/#", 1),)))
        packets = [client.next_packet(5), client.next_packet(5)]
        assert any(isinstance(p, Suback) for p in packets)
        retained = [p for p in packets if isinstance(p, Publish)]
        assert retained and retained[0].payload == b"up" and retained[0].retain
        client.sock.close()  # gone without DISCONNECT; the session stays
    finally:
        out = stop(app)
    assert "hello field-device" in out
    app, port = start()  # a new process: the store is reopened, the session restored
    try:
        again = BlockingClient(port, "field-device", clean=False)
        assert again.connack.session_present
        publish = again.next_packet(5)  # published by the app at start, queued for it
        assert isinstance(publish, Publish) and publish.payload == b"up"
        again.close()
    finally:
        stop(app)
