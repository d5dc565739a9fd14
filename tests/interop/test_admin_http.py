"""The admin listeners of a real broker: Prometheus scrapes /metrics, `mqttd why` asks the API."""
import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from brokerproc import start_on_free_port, wait_until_ready
from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import Suback, Subscribe, Subscription

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only]

HTTP = ["--metrics-listen", "tcp:0:interface=127.0.0.1",
        "--admin-listen", "tcp:0:interface=127.0.0.1"]


def _http_port(broker, kind):
    entry = broker.ready["http"][kind][0]
    assert entry["host"] == "127.0.0.1"
    return entry["port"]


#: what Prometheus logs (level info) once its web listener is up
PROMETHEUS_READY = "Server is ready to receive web requests."


def _text(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@pytest.fixture
def prometheus_bin():
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed (Debian package prometheus): run ./dev test",
                    pytrace=False)
    return path


def test_real_prometheus_scrapes_mqttd_metrics(mqttd_broker_factory, prometheus_bin, tmp_path):
    """Debian's Prometheus, started here on loopback, scrapes /metrics and answers a query."""
    broker = mqttd_broker_factory(extra_args=HTTP)
    client = BlockingClient(broker.port, "scraped-client")
    metrics_port = _http_port(broker, "metrics")
    assert b"mqttd_connections{" in _get(f"http://127.0.0.1:{metrics_port}/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: mqttd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    log_path = tmp_path / "prometheus.log"

    def start_prometheus(web_port):
        """Prometheus cannot report a port: on one picked first, on another if it
        was taken meanwhile (it exits with "address already in use")."""
        log_path.write_bytes(b"")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [prometheus_bin, f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(tmp_path))
        try:
            wait_until_ready(proc, lambda: PROMETHEUS_READY in _text(log_path),
                             lambda: _text(log_path), f"prometheus on port {web_port}")
        except BaseException:
            proc.kill()
            proc.wait(15)
            raise
        return proc, web_port

    proc, web_port = start_on_free_port(start_prometheus)
    try:
        query = (f"http://127.0.0.1:{web_port}/api/v1/query?query="
                 "mqttd_connections%7Bprotocol%3D%223.1.1%22%7D")
        deadline = time.monotonic() + 60
        result = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                answer = json.loads(_get(query, timeout=2))
            except OSError:
                answer = None
            if answer and answer["status"] == "success" and answer["data"]["result"]:
                result = answer["data"]["result"]
                break
            time.sleep(0.5)
        assert result, "Prometheus never had the mqttd series; log:\n" + \
            (tmp_path / "prometheus.log").read_text()
        series = result[0]
        assert series["metric"]["job"] == "mqttd"
        assert series["metric"]["listener"] == "tcp:0:interface=127.0.0.1"
        assert float(series["value"][1]) == 1.0
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        client.close()


def test_mqttd_why_explains_from_the_running_broker(mqttd_broker_factory):
    """`mqttd why CLIENT TOPIC` asks the admin API and names the case mismatch."""
    broker = mqttd_broker_factory(extra_args=HTTP)
    client = BlockingClient(broker.port, "sensor-reader")
    client.send(Subscribe(1, (Subscription("Sensors/+/temp", 1),)))
    assert isinstance(client.next_packet(5), Suback)
    admin = f"http://127.0.0.1:{_http_port(broker, 'admin')}"
    result = subprocess.run(
        [sys.executable, "-m", "mqttd.cli", "why", "sensor-reader", "sensors/1/temp",
         "--admin", admin], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("NOT-DELIVERED: no subscription of 'sensor-reader'")
    assert "differs only in letter case" in result.stdout
    ok = subprocess.run(
        [sys.executable, "-m", "mqttd.cli", "why", "sensor-reader", "Sensors/1/temp",
         "--admin", admin], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("DELIVERED")
    clients = json.loads(_get(f"{admin}/api/clients"))
    assert clients["clients"][0]["client_id"] == "sensor-reader"
    client.close()


def test_mqttd_why_reports_an_unreachable_api():
    """No admin API there: one line on stderr and exit 3."""
    import socket as socket_module
    # a port bound here but not listening: refused, and nobody can take it meanwhile
    held = socket_module.socket()
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mqttd.cli", "why", "c", "t", "--admin",
             f"http://127.0.0.1:{port}", "--timeout", "5"], capture_output=True, text=True,
            timeout=60)
    finally:
        held.close()
    assert result.returncode == 3
    assert result.stderr.startswith("mqttd why: cannot reach the admin API")


def test_an_admin_port_in_use_stops_the_start_with_one_line(tmp_path):
    """--metrics-listen on a taken port: exit status 1 and 'cannot listen on ...', as for MQTT."""
    import socket as socket_module
    from brokerproc import find_twistd
    taken = socket_module.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [find_twistd(), "-n", "--pidfile", "", "mqttd", "--persistence", "memory",
             "--listen", "tcp:0:interface=127.0.0.1",
             "--metrics-listen", f"tcp:{port}:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    finally:
        taken.close()
    assert result.returncode == 1
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in result.stdout + result.stderr
