"""The live dashboard in headless Chromium (Debian's chromium): live data in the DOM, screenshots."""
import shutil
import subprocess
import time

import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import Publish, Suback, Subscribe, Subscription

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def chromium(tmp_path):
    path = CHROMIUM if shutil.which(CHROMIUM) else shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed (Debian package chromium): run ./dev test",
                    pytrace=False)

    def run(url, *mode):
        command = [path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={tmp_path / 'chromium-profile'}",
                   "--window-size=1280,900", "--virtual-time-budget=6000", *mode, url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=90,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    return run


def test_dashboard_shows_live_clients_rates_topics_and_the_why_view(
        mqttd_broker_factory, chromium, tmp_path):
    """Overview: the connected client, its queue, top topics, a chart; client page: why."""
    broker = mqttd_broker_factory(extra_args=["--admin-listen", "tcp:0:interface=127.0.0.1"])
    admin = f"http://127.0.0.1:{broker.ready['http']['admin'][0]['port']}"
    reader = BlockingClient(broker.port, "sensor-reader")
    reader.send(Subscribe(1, (Subscription("Sensors/+/temp", 1),)))
    assert isinstance(reader.next_packet(5), Suback)
    publisher = BlockingClient(broker.port, "sensor-1")
    # the top-topics counter starts when the dashboard first asks; open it once
    chromium(admin + "/", "--dump-dom")
    for _ in range(3):  # traffic across several 2 s samples: a chart with points
        publisher.send(*(Publish("sensors/1/temp", b"21.5", 0, False) for _ in range(25)))
        time.sleep(2.1)
    dom = chromium(admin + "/", "--dump-dom")
    assert 'data-loaded="overview"' in dom
    assert 'data-client="sensor-reader"' in dom and 'data-client="sensor-1"' in dom
    assert 'id="clients-online" class="value">2<' in dom
    assert "sensors/1/temp</td>" in dom  # top topics
    points = int(dom.split('data-points="')[1].split('"')[0])
    assert points >= 2
    chromium(admin + "/", f"--screenshot={tmp_path / 'dashboard.png'}")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000

    page = admin + "/#/client/sensor-reader?topic=sensors/1/temp&qos=1"
    dom = chromium(page, "--dump-dom")
    assert 'data-loaded="client"' in dom
    assert "Sensors/+/temp</code>" in dom
    assert 'id="why-verdict"' in dom and "NOT-DELIVERED" in dom
    assert "differs only in letter case" in dom
    chromium(page, f"--screenshot={tmp_path / 'client.png'}")
    assert (tmp_path / "client.png").stat().st_size > 10_000
    reader.close()
    publisher.close()
