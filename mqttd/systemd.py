"""systemd ``Type=notify`` readiness without a dependency (``sd_notify(3)``).

:func:`notify` sends one datagram such as ``READY=1`` to the socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).  Without
that variable (not started by systemd) it does nothing and returns False.
"""
from __future__ import annotations

import os
import socket

from twisted.logger import Logger

log = Logger(namespace="mqttd.systemd")


def notify(state: str, environ=None) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``RELOADING=1``, ``STATUS=...``,
    newline-separated) to systemd; True if it was sent."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as error:
        log.warn("Could not notify systemd at {address!r}: {error}",
                 address=environ.get("NOTIFY_SOCKET"), error=error)
        return False
    return True
