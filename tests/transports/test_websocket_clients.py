"""MQTT.js over ``ws:`` and ``wss:``: the tutorial's three scenarios, in Node and in headless Chromium.

The browser run is real: Debian's ``chromium`` loads a page that this test
serves on 127.0.0.1 together with MQTT.js's browser bundle; the page runs
``tests/interop/tutorial-scenarios.js`` (the same code Node runs) and POSTs
its result back to the test's HTTP server.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import INTEROP, MQTTJS_DIR

pytestmark = pytest.mark.interop

TUTORIAL = INTEROP / "tutorial.js"
SCENARIOS = INTEROP / "tutorial-scenarios.js"
PAGE = Path(__file__).resolve().parent / "browser" / "tutorial.html"
BROWSER_WAIT = 60.0


def run_node_tutorial(node_mqtt, url, protocol_version, cafile=None):
    env = dict(os.environ, MQTTJS_MODULE=node_mqtt.module, MQTT_URL=url)
    if cafile is not None:
        env["MQTT_CAFILE"] = str(cafile)
    try:
        proc = subprocess.run([node_mqtt.node, str(TUTORIAL), "0", "127.0.0.1",
                               str(protocol_version)], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"tutorial.js still running after {e.timeout}s\n{e.stdout}\n{e.stderr}")
    lines = proc.stdout.strip().splitlines()
    assert lines, f"tutorial.js printed nothing (exit {proc.returncode})\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in result, (result, proc.stderr)
    return result


def check_tutorial(result):
    """The three scenarios' outcomes, as the tutorial states them."""
    assert result["self"] == {"topic": "presence", "payload": "Hello mqtt", "qos": 0,
                              "retain": False}
    assert result["talk"]["toB"] == {"topic": "clientA/says", "payload": "Hello from A",
                                     "qos": 0, "retain": False}
    assert result["talk"]["toA"] == {"topic": "clientB/says", "payload": "Hello from B",
                                     "qos": 0, "retain": False}
    offline = result["offline"]
    assert offline["firstSessionPresent"] is False
    assert offline["granted"] == [1]
    assert offline["sessionPresent"] is True
    assert offline["message"]["payload"] == "Hello offline subscriber"
    assert offline["message"]["qos"] == 1


@pytest.mark.parametrize("protocol_version", [4, 5], ids=["v311", "v5"])
def test_mqttjs_node_runs_the_tutorial_over_ws(broker_with, node_mqtt, protocol_version):
    """ws://127.0.0.1:PORT/mqtt with MQTT.js in Node: self-message, two clients, offline queue."""
    broker = broker_with("ws:0:interface=127.0.0.1")
    url = f"ws://127.0.0.1:{broker.port('ws')}/mqtt"
    check_tutorial(run_node_tutorial(node_mqtt, url, protocol_version))


def test_mqttjs_node_runs_the_tutorial_over_wss(broker_with, node_mqtt, pki):
    """wss:// with the test CA: the same scenarios through TLS and WebSocket."""
    broker = broker_with(f"wss:0:interface=127.0.0.1:privateKey={pki.server_key}"
                         f":certKey={pki.server_cert}")
    url = f"wss://127.0.0.1:{broker.port('wss')}/mqtt"
    check_tutorial(run_node_tutorial(node_mqtt, url, 4, cafile=pki.ca.cert_path))


def test_mqttjs_node_on_a_custom_path(broker_with, node_mqtt):
    """path=/ws serves MQTT on /ws (the default /mqtt is then not answered)."""
    broker = broker_with("ws:0:interface=127.0.0.1:path=/ws")
    url = f"ws://127.0.0.1:{broker.port('ws')}/ws"
    check_tutorial(run_node_tutorial(node_mqtt, url, 4))


# --- a real browser ------------------------------------------------------------------------

def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class PageServer:
    """Serves the tutorial page, MQTT.js's browser bundle and the scenarios; receives the result."""

    def __init__(self, ws_url: str):
        self.result = None
        self.got_result = threading.Event()
        files = {
            "/": (PAGE.read_text().replace("__WS_URL__", ws_url).encode(), "text/html"),
            "/mqtt.min.js": ((MQTTJS_DIR / "dist" / "mqtt.min.js").read_bytes(),
                             "application/javascript"),
            "/tutorial-scenarios.js": (SCENARIOS.read_bytes(), "application/javascript"),
        }
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body, kind = files.get(self.path.split("?")[0], (None, None))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = min(int(self.headers.get("Content-Length", "0")), 1 << 20)
                outer.result = json.loads(self.rfile.read(length))
                self.send_response(204)
                self.end_headers()
                outer.got_result.set()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol_version", [4, 5], ids=["v311", "v5"])
def test_mqttjs_in_headless_chromium_runs_the_tutorial_over_ws(broker_with, node_mqtt, tmp_path,
                                                               protocol_version):
    """MQTT.js's browser bundle in Debian's chromium runs the three scenarios over ws://."""
    chromium = find_chromium()
    if chromium is None:
        pytest.fail("chromium is not installed: run ./dev test (it installs it)", pytrace=False)
    broker = broker_with("ws:0:interface=127.0.0.1")
    ws_url = f"ws://127.0.0.1:{broker.port('ws')}/mqtt"
    server = PageServer(ws_url)
    profile = tmp_path / "chromium-profile"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", f"{server.url}?v={protocol_version}"]
    browser = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "chromium.log", "wb"))
    try:
        deadline = time.monotonic() + BROWSER_WAIT
        while not server.got_result.wait(0.2):
            if browser.poll() is not None:
                break
            if time.monotonic() > deadline:
                break
        log = (tmp_path / "chromium.log").read_text(errors="replace")[-3000:]
        assert server.result is not None, (
            f"the page reported nothing in {BROWSER_WAIT}s (chromium exit "
            f"{browser.poll()})\n{log}")
        assert "error" not in server.result, server.result
        assert server.result["userAgent"].find("Chrome") >= 0
        assert server.result["protocolVersion"] == protocol_version
        check_tutorial(server.result)
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(10)
        server.close()


def _ws_handshake_status(port, origin=None, host="127.0.0.1"):
    """The HTTP status line of one WebSocket opening handshake on a raw socket."""
    import socket
    lines = ["GET /mqtt HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: mqtt"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return head.split(b"\r\n", 1)[0].decode()


def test_forged_origin_gets_403_from_a_loopback_ws_listener(broker_with):
    """A foreign page (or a DNS-rebinding one) in a local browser cannot use the anonymous loopback
    broker: 403, one refusal line naming the origin; Node-style clients and loopback pages still get in."""
    broker = broker_with("ws:0:interface=127.0.0.1")
    port = broker.port("ws")
    assert _ws_handshake_status(port, "http://evil.example").startswith("HTTP/1.1 403 ")
    assert _ws_handshake_status(port, f"http://evil.example:{port}",
                                host="evil.example").startswith("HTTP/1.1 403 ")
    assert " 101 " in _ws_handshake_status(port)                     # no Origin: MQTT.js in Node
    assert " 101 " in _ws_handshake_status(port, "http://127.0.0.1:8080")
    log = broker.broker.log_path.read_text(errors="replace")
    assert "origin 'http://evil.example' not allowed" in log


def test_allowed_origins_option_admits_the_listed_site(broker_with):
    """ws:...:allowedOrigins=app.example.com lets that site's pages in, and only them."""
    broker = broker_with("ws:0:interface=127.0.0.1:allowedOrigins=app.example.com")
    port = broker.port("ws")
    assert " 101 " in _ws_handshake_status(port, "https://app.example.com")
    assert _ws_handshake_status(port, "https://evil.example").startswith("HTTP/1.1 403 ")
