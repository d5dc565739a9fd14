"""A reactor turn's writes leave at its end without a poll; reads share one buffer (mqttd.turnwrites).

Each test runs Twisted's own TCP server transport over one end of a local
``socketpair`` with a ``MemoryReactorClock``: what the reactor is asked to
watch is visible (``reactor.writers``) and the bytes really go through a socket.
"""
import errno
import socket

import pytest
from twisted.internet import main, tcp
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from zope.interface import implementer

from mqttd.turnwrites import READ_SIZE, TurnWriterServer, coalesce_writes

from tests.logcapture import logged


class _Recorder(Protocol):
    def __init__(self):
        self.lost = []

    def connectionLost(self, reason=None):
        self.lost.append(reason)


@pytest.fixture
def pair():
    """(reactor, TurnWriterServer over one end of a socketpair, the other end, protocol)."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    reactor = MemoryReactorClock()
    protocol = _Recorder()
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)
    protocol.makeConnection(transport)
    assert coalesce_writes(transport)
    yield reactor, transport, peer, protocol
    peer.close()
    ours.close()


def _received(peer) -> bytes:
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_writes_of_a_turn_leave_together_at_its_end_without_watching_the_socket():
    """Two writes in one turn are one send at the turn's end; the poller is never asked."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    reactor = MemoryReactorClock()
    protocol = _Recorder()
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)
    protocol.makeConnection(transport)
    sends = []
    real_send = ours.send

    class _Counting:
        def __getattr__(self, name):
            return getattr(ours, name)

        def send(self, data):
            sends.append(bytes(data))
            return real_send(data)

    transport.socket = _Counting()
    assert coalesce_writes(transport)
    transport.write(b"CONNACK")
    transport.write(b"SUBACK")
    assert reactor.writers == set() and _received(peer) == b""
    reactor.advance(0)
    assert sends == [b"CONNACKSUBACK"]
    assert _received(peer) == b"CONNACKSUBACK"
    assert reactor.writers == set()
    transport.write(b"next turn")
    reactor.advance(0)
    assert _received(peer) == b"next turn" and reactor.writers == set()
    peer.close()
    ours.close()


def test_what_the_socket_does_not_take_goes_back_to_the_reactor(pair):
    """A full kernel buffer: the rest waits for the poller, as Twisted does, then writes coalesce again."""
    reactor, transport, peer, _ = pair
    big = b"x" * (8 << 20)
    transport.write(big)
    reactor.advance(0)
    assert transport in reactor.writers
    transport.write(b"tail")       # while watched: not queued a second time
    got = []
    for _ in range(10_000):
        got.append(_received(peer))
        if transport not in reactor.writers:
            break
        assert transport.doWrite() is None     # what the reactor does when writable
    got.append(_received(peer))
    assert b"".join(got) == big + b"tail"
    assert reactor.writers == set()
    transport.write(b"again")
    assert reactor.writers == set()
    reactor.advance(0)
    assert _received(peer) == b"again"


def test_lose_connection_after_writes_sends_them_then_closes_through_the_reactor(pair):
    """loseConnection: the buffered bytes leave first and the close is Twisted's own."""
    reactor, transport, peer, protocol = pair
    transport.write(b"DISCONNECT")
    transport.loseConnection()
    reactor.advance(0)
    assert transport in reactor.writers
    why = transport.doWrite()
    assert why is not None          # the reactor then calls connectionLost(why)
    assert _received(peer) == b"DISCONNECT"


def test_abort_drops_queued_writes_and_loses_the_connection_once(pair):
    """abortConnection before the turn ends: nothing is sent, nothing is watched."""
    reactor, transport, peer, protocol = pair
    transport.write(b"never")
    transport.abortConnection()
    reactor.advance(0)
    reactor.advance(0)
    assert reactor.writers == set()
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ConnectionAborted)
    assert _received(peer) == b""


def test_send_error_goes_back_to_the_reactor_which_loses_the_connection(pair):
    """A peer that is gone: the send error reaches the reactor's doWrite, Twisted's path."""
    reactor, transport, peer, protocol = pair
    peer.close()
    transport.write(b"to nobody")
    reactor.advance(0)
    assert transport in reactor.writers
    why = transport.doWrite()
    assert isinstance(why, ConnectionLost) or getattr(why, "errno", None) in (
        errno.EPIPE, errno.ECONNRESET)


@implementer(IPushProducer)
class _FailingProducer:
    def __init__(self):
        self.paused = 0

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        raise RuntimeError("resume failed")

    def stopProducing(self):
        pass


def test_an_exception_in_the_write_path_is_logged_and_loses_that_connection(pair):
    """A producer failing in resumeProducing: one error line, that connection lost, as the reactor does."""
    reactor, transport, peer, protocol = pair
    producer = _FailingProducer()
    transport.registerProducer(producer, True)
    transport.bufferSize = 16
    transport.write(b"y" * 64)      # over bufferSize: the producer is paused
    assert producer.paused == 1
    with logged(LogLevel.error) as events:
        reactor.advance(0)
    assert len(events) == 1 and events[0]["log_failure"].check(RuntimeError)
    assert len(protocol.lost) == 1
    assert reactor.writers == set() and transport not in reactor.readers


def test_only_socket_transports_are_changed():
    """StringTransport stays as it is; a wrapper's socket transport is found underneath."""
    assert coalesce_writes(StringTransport()) is False
    ours, peer = socket.socketpair()
    reactor = MemoryReactorClock()
    transport = tcp.Server(ours, _Recorder(), ("127.0.0.1", 1), None, 1, reactor)

    class _Wrapper:
        pass
    wrapper = _Wrapper()
    wrapper.transport = transport
    assert coalesce_writes(wrapper) is True
    assert type(transport) is TurnWriterServer
    assert coalesce_writes(transport) is True
    ours.close()
    peer.close()


class _Keeper(_Recorder):
    def __init__(self):
        super().__init__()
        self.data = []

    def dataReceived(self, data):
        self.data.append(data)


def _server_with(protocol):
    ours, peer = socket.socketpair()
    reactor = MemoryReactorClock()
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)
    protocol.makeConnection(transport)
    coalesce_writes(transport)
    return transport, ours, peer


def test_reads_through_the_shared_buffer_hand_over_copies_of_just_what_came():
    """Each read's bytes are the protocol's own: a later read into the shared buffer never changes them."""
    protocol = _Keeper()
    transport, ours, peer = _server_with(protocol)
    peer.sendall(b"CONNECT")
    assert transport.doRead() is None
    peer.sendall(b"SUBSCRIBE and more")
    assert transport.doRead() is None
    assert protocol.data == [b"CONNECT", b"SUBSCRIBE and more"]
    assert all(type(d) is bytes for d in protocol.data)
    assert transport.doRead() is None and protocol.data[2:] == []     # EWOULDBLOCK: nothing
    peer.close()
    assert transport.doRead() is main.CONNECTION_DONE
    ours.close()


def test_a_read_takes_at_most_buffer_size_bytes_and_larger_sizes_use_twisteds_read():
    """bufferSize bounds each read as in Twisted; over the shared buffer's size Twisted's doRead runs."""
    protocol = _Keeper()
    transport, ours, peer = _server_with(protocol)
    transport.bufferSize = 10
    peer.sendall(b"0123456789abcdef")
    transport.doRead()
    transport.doRead()
    assert protocol.data == [b"0123456789", b"abcdef"]
    transport.bufferSize = READ_SIZE * 4
    blob = bytes(range(256)) * 1024          # 256 KiB
    peer.setblocking(False)
    sent = peer.send(blob)
    got = []
    for _ in range(100):
        before = len(protocol.data)
        transport.doRead()
        if len(protocol.data) == before:
            break
        got.extend(protocol.data[before:])
    assert b"".join(got) == blob[:sent]
    peer.close()
    ours.close()
