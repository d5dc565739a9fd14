"""Disk full under a running broker: CONNACK refusals, no false acks, QoS 0 goes on, self-recovery."""
from __future__ import annotations

import errno
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mqttd.broker import Broker, BrokerConfig
from mqttd.codec.packets import Connack, Connect, Disconnect, Properties, Puback, Publish
from mqttd.persistence.filestore import FileStore

from core.harness import FakeClient


class FaultyDisk:
    """os.write and os.fsync failing with ENOSPC while ``full``."""

    def __init__(self):
        self.full = False

    def write(self, fd, data):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def fsync(self, fd):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)


@pytest.fixture
def setup(tmp_path):
    clock = Clock()
    disk = FaultyDisk()
    store = FileStore(str(tmp_path / "data"), clock, write_function=disk.write,
                      fsync_function=disk.fsync,
                      run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    broker = Broker(clock, store, BrokerConfig())
    broker.restore(store.open())
    yield broker, clock, disk, store
    disk.full = False
    store.close()


def connect(broker, clock, client_id, level=5, persistent=True):
    c = FakeClient(broker, clock, level=level)
    props = Properties(session_expiry_interval=600) if (persistent and level == 5) \
        else Properties()
    c.send(Connect(level, client_id, not persistent, 0, properties=props))
    clock.advance(0)                     # the store sync of the turn
    return c, c.received()


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def fill_the_disk(broker, clock, disk):
    """Make the store notice: a persistent subscriber's queued message fails to sync."""
    sub, _ = connect(broker, clock, "sub")
    sub.subscribe("q/#", qos=1)
    clock.advance(0)
    sub.drop()
    disk.full = True
    pub, _ = connect(broker, clock, "pub", persistent=False)
    pub.publish("q/1", b"x", qos=1, packet_id=1)
    clock.advance(0)
    return pub


@pytest.mark.parametrize("level, code", [(5, 0x97), (4, 0x03)])
def test_persistent_connect_gets_a_connack_refusal_while_the_store_cannot_write(
        setup, level, code):
    """No DISCONNECT before CONNACK [MQTT-3.14.0-1]: CONNACK 0x97 (v3 0x03), then close."""
    broker, clock, disk, store = setup
    fill_the_disk(broker, clock, disk)
    assert store.failure is not None
    c, packets = connect(broker, clock, "late", level=level)
    assert [type(p) for p in packets] == [Connack]
    assert packets[0].reason_code == code
    assert c.disconnecting
    assert broker.stats.refused["store-unavailable"] == 1


def test_connect_whose_session_write_fails_is_refused_by_connack_not_disconnect(setup):
    """The disk fills between CONNECT and its CONNACK's sync: CONNACK 0x97, no DISCONNECT."""
    broker, clock, disk, store = setup
    disk.full = True                      # the store does not know yet
    c, packets = connect(broker, clock, "p")
    assert [type(p) for p in packets] == [Connack]
    assert packets[0].reason_code == 0x97 and not packets[0].session_present
    assert c.disconnecting


def test_qos1_publish_is_never_acknowledged_while_the_store_fails(setup):
    """A message that must be stored is not PUBACKed; the v5 publisher gets DISCONNECT 0x97."""
    broker, clock, disk, store = setup
    pub = fill_the_disk(broker, clock, disk)
    packets = pub.received()
    assert not [p for p in packets if isinstance(p, Puback)]
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x97


def test_qos0_traffic_continues_while_the_store_fails(setup):
    """Clean sessions and QoS 0 never wait for the store: they keep flowing."""
    broker, clock, disk, store = setup
    fill_the_disk(broker, clock, disk)
    a, _ = connect(broker, clock, "a", persistent=False)
    b, packets = connect(broker, clock, "b", persistent=False)
    assert packets[0].reason_code == 0
    a.subscribe("live/#")
    for i in range(20):
        b.publish("live/x", b"%d" % i)
    clock.advance(0)
    assert len(publishes(a.received())) == 20


def test_broker_acknowledges_again_once_space_is_back_without_a_restart(setup):
    """Space back: the store recovers by itself; persistent CONNECT and QoS 1 PUBACK work."""
    broker, clock, disk, store = setup
    fill_the_disk(broker, clock, disk)
    disk.full = False
    clock.advance(store.RETRY_INITIAL)
    assert store.failure is None
    c, packets = connect(broker, clock, "after")
    assert packets[0].reason_code == 0
    pub, _ = connect(broker, clock, "pub2", persistent=False)
    pub.publish("q/2", b"y", qos=1, packet_id=7)
    clock.advance(0)
    assert [p.packet_id for p in pub.received() if isinstance(p, Puback)] == [7]
    # the queued message of the offline subscriber is durable: it survives a reopen
    store.close()
    reopened = FileStore(store.path, clock, run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    state = reopened.open()
    assert [o.message.payload for o in state.sessions["sub"].outbound.values()] == [b"x", b"y"]
    reopened.close()
