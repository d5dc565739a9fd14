"""The seams between the broker core and what plugs into it (layer L2)."""
from __future__ import annotations

from zope.interface import Attribute, Interface


class IClientConnection(Interface):
    """What the broker core needs of one connected client.

    Implemented by :class:`mqttd.connection.ClientConnection`; tests use a
    recording fake.  The broker never touches a transport directly.
    """

    client_id = Attribute("The client identifier in use on this connection.")
    protocol_level = Attribute("3, 4 or 5.")

    def send(packet):
        """Encode ``packet`` for this connection's protocol level and write it."""

    def send_publish(message, qos, packet_id, dup, retain, properties):
        """Write a PUBLISH for ``message`` (may reuse pre-encoded bytes)."""

    def writable():
        """True while the outgoing buffer is below its high-water mark."""

    def disconnect(reason_code, reason_string=None):
        """Close the connection; v5 clients get a DISCONNECT with the reason first."""


class IBrokerStore(Interface):
    """Durable broker state (sessions, outbound queues, QoS 2 ids, retained).

    The broker describes every change as an operation value from
    :mod:`mqttd.persistence.records` and calls :meth:`write`; acknowledgements
    that promise durability wait for :meth:`sync`.  Implementations must give
    back, from :meth:`open`, exactly the state that the operations written
    before the last fired :meth:`sync` Deferred describe (at least that much:
    later operations may also be present).
    """

    durable = Attribute("True if data survives a process restart.")

    def open():
        """Load and return the recovered :class:`StoredState` (synchronous).

        Called once before any other method.  Never raises for a damaged file:
        what cannot be read is set aside and logged, and the rest is returned.
        """

    def write(op):
        """Record one operation.  Cheap: buffered, never blocks on the disk."""

    def sync():
        """Return a Deferred firing once every op written so far is durable.

        Concurrent calls are group-committed (one fsync serves them all).
        For a non-durable store it fires at once.
        """

    def close():
        """Flush and release files; return a Deferred."""


class IAuthenticator(Interface):
    """Decides whether a CONNECT may proceed."""

    def authenticate(connect):
        """Return (or Deferred of) a reason code: 0 to accept."""


class IAuthorizer(Interface):
    """Per-topic permissions."""

    def may_publish(client_id, username, topic):
        """True if the client may publish to ``topic``."""

    def may_subscribe(client_id, username, topic_filter):
        """True if the client may subscribe to ``topic_filter``."""
