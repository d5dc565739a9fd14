"""A reactor turn's writes leave at its end, without a trip through the poller; reads
share one buffer (layer L4).

Twisted's TCP transport buffers what ``write()`` is given and asks the reactor
to watch the socket for writability (with epoll: one ``epoll_ctl``); the next
poll reports the socket writable, ``doWrite`` sends the buffer in one
``send``, and the transport stops being watched (a second ``epoll_ctl``).  A
socket whose kernel buffer has room is writable at once, so in the usual case
that round trip costs two system calls and one event dispatch per connection
and turn to learn what is known already.  For a client that connects and
subscribes it was four ``epoll_ctl`` and two of its five reactor events.

:func:`coalesce_writes` changes one accepted ``twisted.internet.tcp.Server``
(its class, to :class:`TurnWriterServer`, a subclass that only overrides
``startWriting``): a write then queues the transport with its reactor's
:class:`TurnFlusher`, and at the start of the next reactor iteration -- one
``callLater(0)`` per turn that wrote, run before the next poll -- the flusher
calls each queued transport's own ``doWrite``.  What stays the same:

- everything written to one connection during a turn still leaves in one
  ``send`` (a subscriber's many PUBLISHes of a turn, as before);
- what the socket does not take (a full kernel buffer) goes back to the
  reactor's watch, and the transport stays there until its buffer is empty;
  push-producer pausing (``bufferSize``) is Twisted's, unchanged;
- closing (``loseConnection``, a half-close, ``abortConnection``) and send
  errors take Twisted's own path through the reactor;
- an exception from the write path (a producer's ``resumeProducing``) is
  logged and loses that connection, as the reactor does for ``doWrite``.

The same class reads differently too: ``tcp.Connection.doRead`` asks the socket
for ``recv(bufferSize)`` -- 64 KiB, mqttd's write buffer -- and on PyPy each
such call allocates a 64 KiB string in the young generation before shrinking
it to what arrived, so a 40-byte CONNECT cost as much nursery as 64 KiB of
PUBLISHes and minor collections came every few hundred connections.
:meth:`TurnWriterServer.doRead` receives into one buffer shared by every
connection of the process (``recv_into``; the reactor reads one socket at a
time) and hands the protocol a copy of just the bytes that came.  Same size
limit per read, same results (``CONNECTION_DONE`` at end of stream,
``CONNECTION_LOST`` on an error, nothing on ``EWOULDBLOCK``).

Only an exact ``tcp.Server`` is changed (a TLS or PROXY wrapper's underlying
socket transport is one); other transports are left alone.
"""
from __future__ import annotations

import weakref
from typing import List, Optional

from errno import EWOULDBLOCK

from twisted.internet import main, tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: bytes of the shared read buffer: Twisted's default bufferSize (a transport
#: whose bufferSize is larger reads with Twisted's own doRead)
READ_SIZE = 1 << 16
_READ_BUFFER = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUFFER)


class TurnFlusher:
    """The transports of one reactor that wrote during this turn.

    :param clock: the reactor the transports belong to (``IReactorTime``);
        :meth:`flush` runs as its ``callLater(0)``, i.e. at the start of the
        reactor's next iteration, before it polls.
    """

    __slots__ = ("clock", "_queued", "_call", "__weakref__")

    def __init__(self, clock):
        self.clock = clock
        self._queued: List["TurnWriterServer"] = []
        self._call = None

    def queue(self, transport: "TurnWriterServer") -> None:
        self._queued.append(transport)
        if self._call is None:
            self._call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send what each queued transport buffered (in the order they wrote)."""
        self._call = None
        queued, self._queued = self._queued, []
        for transport in queued:
            transport._turn_queued = False
            transport._flush_turn()


class TurnWriterServer(tcp.Server):
    """``tcp.Server`` whose writes wait for the end of the turn, not for a poll,
    and whose reads go through one shared buffer.

    Set on an accepted transport by :func:`coalesce_writes`; see the module.
    """

    #: queued with the flusher for this turn
    _turn_queued = False
    #: handed back to the reactor's watch for writability (a full socket,
    #: closing): Twisted's own path until ``doWrite`` empties the buffer
    _watched = False
    _turn: Optional[TurnFlusher] = None

    def doRead(self):
        # tcp.Connection.doRead, receiving into the shared buffer (see the module)
        size = self.bufferSize
        if size > READ_SIZE:
            return tcp.Server.doRead(self)
        try:
            received = self.socket.recv_into(_READ_BUFFER, size)
        except OSError as error:
            if error.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return self._dataReceived(_READ_VIEW[:received].tobytes())

    def startWriting(self) -> None:
        # called by write(), writeSequence(), loseConnection(), loseWriteConnection()
        # and unregisterProducer() while closing
        if self._watched or self._turn_queued:
            return
        self._turn_queued = True
        self._turn.queue(self)

    def stopWriting(self) -> None:
        self._watched = False
        tcp.Server.stopWriting(self)

    def _watch(self) -> None:
        self._watched = True
        tcp.Server.startWriting(self)

    def _flush_turn(self) -> None:
        if self._watched or not self.connected or self._aborting:
            return
        if self.disconnecting or self._writeDisconnecting or self._writeDisconnected:
            # closing: doWrite's end of buffer closes it (Twisted's path)
            self._watch()
            return
        try:
            why = self.doWrite()
        except BaseException:
            failure = Failure()
            log.failure("Writing to {peer} failed", failure, peer=self.client)
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)
            self.connectionLost(failure)
            return
        if why is not None or self._tempDataLen or self.offset < len(self.dataBuffer):
            # the socket took only part of it (or failed: the reactor's
            # doWrite meets the error again and loses the connection)
            self._watch()


_flushers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _flusher(reactor) -> TurnFlusher:
    flusher = _flushers.get(reactor)
    if flusher is None:
        flusher = _flushers[reactor] = TurnFlusher(reactor)
    return flusher


def coalesce_writes(transport) -> bool:
    """Make ``transport`` -- or the socket transport under its wrappers (TLS,
    PROXY) -- send its writes at the end of the reactor turn; see the module.

    :returns: True if a ``tcp.Server`` was found and changed (or already was);
        False for any other transport (left as it is).
    """
    for _ in range(8):
        if transport is None:
            return False
        kind = type(transport)
        if kind is TurnWriterServer:
            return True
        if kind is tcp.Server:
            transport._turn = _flusher(transport.reactor)
            transport.__class__ = TurnWriterServer
            return True
        transport = getattr(transport, "transport", None)
    return False
