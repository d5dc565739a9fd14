"""Has the peer of a paused transport closed its end? (stdlib only)

A connection whose reads are paused (its input is held, see
``docs/security.rst``, *Held input*) does not see the client's FIN: Twisted
reads it only after every byte before it, and a paused transport reads
nothing.  :func:`peer_closed` asks the socket under a transport directly:
on Linux ``poll()`` reports ``POLLRDHUP`` as soon as the peer's FIN has
arrived, even with unread data in front of it (and ``POLLHUP``/``POLLERR``
after a reset), without reading anything.  It finds the socket through
wrapping transports (TLS, PROXY protocol, WebSocket: each keeps the one it
wraps as ``.transport``).
"""
from __future__ import annotations

import select
import socket
import sys
from typing import Optional

#: Linux only (since 2.6.17); elsewhere :func:`peer_closed` answers None.  (PyPy's
#: select module lacks the constant: it is 0x2000 on every Linux architecture.)
_POLLRDHUP = getattr(select, "POLLRDHUP",
                     0x2000 if sys.platform.startswith("linux") and hasattr(select, "poll")
                     else None)
_CLOSED = (_POLLRDHUP or 0) | getattr(select, "POLLHUP", 0) | getattr(select, "POLLERR", 0)
#: wrappers followed at most (TLS over PROXY over TCP is 3)
_MAX_DEPTH = 8


def socket_of(transport) -> Optional[socket.socket]:
    """The stream socket under ``transport`` (following ``.transport``), or None."""
    for _ in range(_MAX_DEPTH):
        if transport is None:
            return None
        get = getattr(transport, "getHandle", None)
        if get is not None:
            try:
                handle = get()
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                return handle
        transport = getattr(transport, "transport", None)
    return None


def peer_closed(transport) -> Optional[bool]:
    """True if the peer of ``transport`` has closed (FIN or reset) -- whatever
    data it sent before is still unread; False if not; None if this cannot be
    told (not a socket, or no ``POLLRDHUP`` on this platform).  One
    non-blocking ``poll()`` system call; nothing is read."""
    if _POLLRDHUP is None:
        return None
    sock = socket_of(transport)
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except OSError:
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, _POLLRDHUP)
    try:
        events = poller.poll(0)
    except OSError:
        return None
    return any(mask & _CLOSED for _, mask in events)


__all__ = ["peer_closed", "socket_of"]
