"""One client's protocol rules, without a transport (layer L3).

:class:`ClientConnection` turns bytes into packets with the sans-IO codec,
dispatches each packet through one table per connection state, enforces the
connection-level rules (CONNECT first and only once, keepalive, topic rules,
acknowledgement order) and calls the broker core for everything that concerns
sessions and routing.  The Twisted ``Protocol`` in :mod:`mqttd.protocol` is a
thin shim around it; tests drive it with ``StringTransport`` and ``task.Clock``.

Errors take one road: :meth:`ClientConnection.fail` logs a structured line and
answers with a CONNACK (during CONNECT), a DISCONNECT with the reason code
(MQTT 5) or a plain close (MQTT 3), then closes the connection.
"""
from __future__ import annotations

import collections
import errno
from typing import Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from mqttd import topics, trace
from mqttd.aliases import InboundAliases, OutboundAliases
from mqttd.broker import Broker, ClientInfo
from mqttd.codec import encode, publish_template
from mqttd.codec.encoder import PublishTemplate
from mqttd.codec.errors import (
    MQTTError, ProtocolError, ReasonCode, UnsupportedProtocolVersion, V5_TO_V3_CONNACK)
from mqttd.codec.packets import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Auth, Connack, Connect, Disconnect, Pingreq, Pingresp,
    Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Unsuback,
    Unsubscribe)
from mqttd.codec.reader import PacketReader
from mqttd.hooks import (
    HOOK_FAILED, AuthOutcome, AuthRequest, AuthStep, auth_outcome, call_hook)
from mqttd.interfaces import IClientConnection
from mqttd.messages import SYS_ORIGIN, Message, forwarded_properties, will_message
from mqttd.persistence.records import OutboundStage, SubscriptionRecord
from mqttd.ratelimit import InboundBucket

log = Logger(namespace="mqttd.connection")

_CONNECTING, _CONNECTED, _CLOSED = "connecting", "connected", "closed"
#: MQTT 5 has no bridge bit: a CONNECT user property with this name marks a
#: bridging broker instead (mqttd's bridges send it; the value is its broker id)
BRIDGE_PROPERTY = "mqttd-bridge"
#: topic filters of one SUBSCRIBE or UNSUBSCRIBE handled per reactor turn; a
#: longer one (only with --max-topic-filters-per-packet above it or 0) is
#: handled in slices
FILTERS_PER_TURN = 1000
_ACK_FIRST_BYTE = {Puback: 0x40, Pubrec: 0x50, Pubrel: 0x62, Pubcomp: 0x70}
#: properties a server may leave out of any packet to respect the client's
#: Maximum Packet Size [MQTT-3.1.2-25]
_OPTIONAL_PROPERTIES = {"reason_string": None, "user_properties": ()}
#: CONNACK properties whose absence means the same value (MQTT 5.0 §3.2.2.3):
#: left out next when a CONNACK still does not fit
_CONNACK_DEFAULTS = {
    "receive_maximum": 65535, "topic_alias_maximum": 0, "maximum_qos": 2,
    "retain_available": 1, "wildcard_subscription_available": 1,
    "subscription_identifier_available": 1, "shared_subscription_available": 1,
}
_NO_HANDLERS: dict = {}
#: the packet classes by name, for ClientConnection._HANDLER_NAMES
_PACKETS = {cls.__name__: cls for cls in (
    Auth, Connect, Disconnect, Pingreq, Puback, Pubcomp, Publish, Pubrec, Pubrel, Subscribe,
    Unsubscribe)}


def _peer_host(peer: Optional[str]) -> str:
    """``host`` of ``host:port`` (who a connection is before its CONNECT)."""
    if not peer:
        return "-"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class _InboundAck:
    """A PUBACK (as bytes) that ends one inbound QoS 1 flow of a v5 client: its
    emission frees a place of the server's Receive Maximum [MQTT-3.3.4-8]."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


@attrs.frozen
class _Refused:
    """A SUBACK code decided before any hook was asked."""

    code: int


def template_key(message: Message, level: int, qos: int) -> tuple:
    """Key of a message's PUBLISH bytes in a fan-out cache (levels 3 and 4 share a form)."""
    return (id(message), 5 if level == MQTT_5 else 4, qos)


@implementer(IClientConnection)
class ClientConnection:
    """The server side of one MQTT network connection.

    :param transport: an ``ITransport`` (``write``, ``loseConnection``,
        ``abortConnection``, ``getPeer``).
    :param clock: ``IReactorTime`` for the CONNECT and keepalive timers.
    """

    # Memory: an idle connection is mostly this object.  What every connection
    # sets, and what the packet path reads, are slots (8 bytes each, the fastest
    # attribute access); what few connections ever set is a class default below,
    # stored in the instance's __dict__ only when it differs (the dict, about
    # 1.3 KB with this many attributes, is made on the first such store: most
    # connections never have one).
    __slots__ = (
        "broker", "transport", "clock", "peer", "reader", "state", "client_id",
        "protocol_level", "session", "info", "send_window", "listener",
        "release_transport", "bridge", "_max_qos", "_retain_available", "_limited",
        "_online", "_paused", "_mark", "_last_received", "_connect_call", "_handlers",
        "_stats", "_assigned", "_connect_packet", "_keepalive", "_keepalive_call",
        "_held", "_hold_call", "_waiting", "_bucket", "_rate_call", "_pending", "_stash",
        "_inflight_in", "_client_max_packet", "_in_aliases", "_out_aliases", "_receive_max",
        "_public_only", "_claiming", "_barrier", "_barrier_turn", "__dict__", "__weakref__")

    #: a listener that authenticates clients itself (a TLS listener with
    #: ``identityAsUsername=yes``, mosquitto's ``use_identity_as_username``)
    #: sets this to a callable ``() -> Optional[str]``, asked at CONNECT:
    #: its answer replaces the CONNECT's username (the password is not
    #: checked: the certificate is the credential); None refuses the
    #: CONNECT with 0x87 Not authorized (v3: 0x05).
    transport_identity = None
    #: set by the protocol when its listener is over its max_connections
    over_listener_limit = 0
    _will_on_close = True
    _close_reason = "connection lost"
    #: the enhanced-authentication exchange in progress and its method
    _auth_exchange = None
    _auth_method: Optional[str] = None

    def __init__(self, broker: Broker, transport, clock, peer: Optional[str] = None):
        self.broker = broker
        self.transport = transport
        self.clock = clock
        self.peer = peer
        config = broker.config
        # before CONNECT succeeds only a small packet is accepted, refused from
        # its fixed header before any of its body is buffered
        self.reader = PacketReader(level=None, max_packet_size=min(
            config.max_connect_packet_size, config.max_packet_size),
            max_topic_filters=config.max_topic_filters_per_packet)
        self.state = _CONNECTING
        self.client_id: Optional[str] = None
        self.protocol_level: Optional[int] = None
        self.session = None
        self.info: Optional[ClientInfo] = None
        #: the listener it came in on (set by the protocol; metrics and admin)
        self.listener: Optional[str] = None
        #: called once before the connection closes its transport (the Twisted
        #: shim unregisters its push producer here, see _lose_connection)
        self.release_transport = None
        #: True when the client set the bridge bit in CONNECT (see _on_connect)
        self.bridge = False
        #: an MQTT 5 client that is no bridge: the broker's private user properties
        #: (Broker.add_private_user_properties) are removed from what it gets
        self._public_only = False
        self._client_max_packet = None
        #: v5 topic aliases: the client's (resolved here) and ours (sent)
        self._in_aliases: Optional[InboundAliases] = None
        self._out_aliases: Optional[OutboundAliases] = None
        #: v5 inbound QoS 1 PUBLISHes whose PUBACK is not written yet, and the
        #: Receive Maximum they count against (None: not enforced, v3)
        self._inflight_in = 0
        self._receive_max: Optional[int] = None
        self._held = False
        self._hold_call = None
        #: hooks (authenticate, authorize_*) whose Deferred answer is awaited:
        #: input waits meanwhile, so acknowledgements keep their order
        self._waiting = 0
        self._connect_packet: Optional[Connect] = None
        #: inbound token buckets (--max-inbound-rate), or None: not limited
        self._bucket = None
        self._rate_call = None
        self._stash = ()
        self._keepalive = 0.0
        self._keepalive_call = None
        #: output waiting behind a store barrier: ``()`` until there is any
        #: (then a deque; an empty deque costs 760 bytes on CPython)
        self._pending = ()
        #: the store barrier of this reactor turn's sync that output already waits
        #: for, and the broker's sync_turns when it was taken (see _output)
        self._barrier = None
        self._barrier_turn = -1
        self._assigned = None
        #: outbound QoS 1/2 window: min(broker limit, client's Receive Maximum)
        self.send_window = min(config.max_inflight, 65535)  # packet ids [MQTT-2.2.1-3]
        self._max_qos = config.max_qos
        self._retain_available = config.retain_available
        #: --max-qos or --retain-available restrict PUBLISH (one check when not)
        self._limited = config.max_qos < 2 or not config.retain_available
        self._online = False
        self._paused = False
        #: waiting for the broker's claim_session answer (the session seam)
        self._claiming = False
        #: the broker's write count when the current packet's handling began
        self._mark = 0
        self._last_received = clock.seconds()
        self._connect_call = clock.callLater(config.connect_timeout, self._connect_timeout)
        #: packet class -> handler function (called with self): a table shared
        #: by every connection in the same state (see _handler_table)
        self._handlers = self._handler_table("connect")
        self._stats = broker.stats

    #: the packets each state handles: state -> {packet class name: method name}
    _HANDLER_NAMES = {
        "connect": {"Connect": "_on_connect"},
        "auth": {"Auth": "_on_auth_during_connect", "Disconnect": "_on_disconnect_during_connect"},
        "connected": {"Publish": "_on_publish", "Puback": "_on_puback", "Pubrec": "_on_pubrec",
                      "Pubrel": "_on_pubrel", "Pubcomp": "_on_pubcomp", "Subscribe": "_on_subscribe",
                      "Unsubscribe": "_on_unsubscribe", "Pingreq": "_on_pingreq",
                      "Disconnect": "_on_disconnect", "Auth": "_on_auth"},
    }

    def _handler_table(self, state: str) -> dict:
        """The handler table of ``state`` for this connection's class: packet
        class -> function, called ``handler(self, packet)``.  One dict per
        class and state, shared by every connection (a dict of ten bound
        methods per connection cost about 1 KB each)."""
        cls = type(self)
        tables = cls.__dict__.get("_handler_tables")
        if tables is None:
            tables = {}
            setattr(cls, "_handler_tables", tables)
        table = tables.get(state)
        if table is None:
            table = tables[state] = {
                _PACKETS[name]: getattr(cls, method)
                for name, method in self._HANDLER_NAMES[state].items()}
        return table

    # --- input -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self._stats.bytes_received += len(data)
        try:
            packets = self.reader.feed(data)
        except MQTTError as error:
            # the packets before the bad one are handled first, as they would
            # be had they arrived in an earlier chunk
            before, error.decoded_before = error.decoded_before, []
            if before and not (self._held or self._waiting or self._rate_call):
                self._last_received = self.clock.seconds()
                if self._bucket is not None:
                    self._admit(before)
                else:
                    self._process(before)
            self.fail(error)
            return
        if packets:
            # only complete packets count for keepalive [MQTT-3.1.2-22]: a
            # client trickling the bytes of an endless packet is still idle
            self._last_received = self.clock.seconds()
        if self._bucket is not None:  # --max-inbound-rate: charged packet by packet
            if self._held or self._waiting or self._rate_call is not None:
                self._stash = list(self._stash) + packets
            elif packets:
                self._admit(packets)
            return
        if self._held or self._waiting:
            # a transport may still deliver what it had already read
            self._stash = list(self._stash) + packets
            return
        self._process(packets)

    def _process(self, packets) -> None:
        broker = self.broker
        for index, packet in enumerate(packets):
            if self.state == _CLOSED:
                return
            handler = self._handlers.get(packet.__class__)
            self._mark = broker.write_count
            try:
                if handler is None:
                    self._unexpected(packet)
                else:
                    handler(self, packet)
            except MQTTError as error:
                self.fail(error)
                return
            except Exception:
                # a bug, not the client's fault: this connection ends with 0x83
                # (v5), its teardown still runs, everyone else is unaffected
                self._internal_error(packet)
                return
            if self._held or self._waiting:
                # held back by a congested subscriber or waiting for a hook's
                # answer: what was already read waits too
                self._stash = packets[index + 1:]
                return

    def _internal_error(self, packet) -> None:
        log.failure("Handling {packet} from {client_id} ({peer}) failed; closing "
                    "its connection", packet=type(packet).__name__,
                    client_id=self.client_id or "-", peer=self.peer)
        self._stats.protocol_errors += 1
        if self.state == _CONNECTING:
            self._close("internal error")
        else:
            self.disconnect(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR,
                            log_reason="internal error")

    def _unexpected(self, packet) -> None:
        if isinstance(packet, Connect):
            raise ProtocolError("second CONNECT on a connection", spec="MQTT-3.1.0-2")
        if self.state == _CONNECTING:
            raise ProtocolError("first packet must be CONNECT", spec="MQTT-3.1.0-1")
        raise ProtocolError(f"{type(packet).__name__} is not sent by clients")

    # --- output ------------------------------------------------------------------

    def send(self, packet) -> None:
        first = _ACK_FIRST_BYTE.get(packet.__class__)
        if first is not None and packet.properties is NO_PROPERTIES:
            # the four acknowledgements, by far the most frequent: no generic encode
            pid = packet.packet_id
            code = packet.reason_code
            if code == 0 or self.protocol_level != MQTT_5:
                data = bytes((first, 2, pid >> 8, pid & 0xFF))
            else:
                data = bytes((first, 3, pid >> 8, pid & 0xFF, code))
        else:
            data = encode(packet, self.protocol_level or MQTT_3_1_1)
        limit = self._client_max_packet
        if limit is not None and len(data) > limit:
            data = self._fit(packet, data, limit)
            if data is None:
                return
        self._stats.bytes_sent += len(data)
        self.transport.write(data)

    def _fit(self, packet, data: bytes, limit: int) -> Optional[bytes]:
        """``packet`` encoded within the client's Maximum Packet Size, or None.

        Every packet the server sends is bound by it [MQTT-3.1.2-24]: the
        Reason String and User Properties are left out first
        [MQTT-3.1.2-25].  A packet that still does not fit is not sent; the
        connection is then useless to the client (it would wait forever for
        that SUBACK, CONNACK...), so it is closed (a DISCONNECT is sent
        without its properties if even that fits).  PUBLISH never gets here:
        :meth:`send_publish` drops and counts it.
        """
        props = getattr(packet, "properties", None)
        if props is not None and props is not NO_PROPERTIES and (
                props.reason_string is not None or props.user_properties):
            packet = attrs.evolve(packet, properties=attrs.evolve(props, **_OPTIONAL_PROPERTIES))
            data = encode(packet, self.protocol_level or MQTT_3_1_1)
            if len(data) <= limit:
                return data
        if isinstance(packet, Connack):
            props = packet.properties
            defaults = {name: None for name, value in _CONNACK_DEFAULTS.items()
                        if getattr(props, name) == value}
            if defaults:
                packet = attrs.evolve(packet, properties=attrs.evolve(props, **defaults))
                data = encode(packet, MQTT_5)
                if len(data) <= limit:
                    return data
        if isinstance(packet, Disconnect):
            data = encode(Disconnect(packet.reason_code), MQTT_5)
            return data if len(data) <= limit else None
        self._warn("client-maximum-packet-size",
                   "Cannot send {packet} of {size} bytes to {client_id}: its Maximum "
                   "Packet Size is {limit}; closing", packet=type(packet).__name__ if packet is not None
                   else "acknowledgement", size=len(data), client_id=self.client_id or "-",
                   limit=limit)
        if self.state != _CLOSED:
            if isinstance(packet, Connack):  # no DISCONNECT before a CONNACK [MQTT-3.14.0-1]
                self.clock.callLater(0, self._close, "CONNACK too large for the client")
            else:
                self.clock.callLater(0, self.disconnect, ReasonCode.PACKET_TOO_LARGE,
                                     None, "packet too large for the client")
        return None

    # --- client-triggered log lines, rate-limited --------------------------------------

    def _who(self) -> str:
        """The key of this client in rate limits: its id, or its host before CONNECT."""
        return self.client_id or _peer_host(self.peer)

    def _warn(self, reason: str, format: str, **fields) -> None:
        """One WARN line per client and ``reason`` at most ``burst`` per window;
        the next line says how many were suppressed (see :mod:`mqttd.ratelimit`)."""
        broker = self.broker
        broker.log_limiter.warn(log, (self._who(), reason), format, **fields)
        if broker.incident_listeners:  # the admin's per-client ring (not rate-limited)
            broker.incident(self.client_id or self.peer, reason,
                            formatEvent(dict(fields, log_format=format)))

    def cached_template(self, message: Message, qos: int, cache: dict):
        """The PUBLISH bytes already made for this connection's form, or None."""
        if self._public_only and self.broker.private_user_properties:
            message = self.broker.public_form(message, cache)
        return cache.get(template_key(message, self.protocol_level, qos))

    def send_publish(self, message: Message, qos: int, packet_id, dup: bool,
                     cache: Optional[dict] = None, template=None) -> None:
        # (a connection that sends topic aliases replaces this method by
        # _send_aliased at CONNECT: no cost here for the others)
        if template is None and self._public_only and self.broker.private_user_properties:
            # the broker's own user properties (the mesh guard's stamps) reach
            # bridges only: this client gets the publisher's unaltered [MQTT-3.3.2-17]
            message = self.broker.public_form(message, cache)
        if template is None and cache is not None:
            key = template_key(message, self.protocol_level, qos)
            template = cache.get(key)
            if template is None:
                template = cache[key] = publish_template(
                    message.topic, message.payload, qos, message.retain,
                    message.properties, self.protocol_level)
        elif template is None:
            template = publish_template(message.topic, message.payload, qos,
                                        message.retain, message.properties,
                                        self.protocol_level)
        data = template.encode(packet_id, dup)
        if self._client_max_packet is not None and len(data) > self._client_max_packet:
            # [MQTT-3.1.2-24, 3.1.2-25]: a PUBLISH over the client's Maximum Packet
            # Size is discarded as if it had been sent
            if self.session is not None:
                self.broker.count_dropped(self.session, "client-maximum-packet-size", message)
                if packet_id is not None:
                    self.clock.callLater(0, self._discard_inflight, packet_id)
            return
        if message.origin != SYS_ORIGIN:  # $SYS traffic is not counted
            stats = self._stats
            size = len(data)
            stats.bytes_sent += size
            stats.messages_out[qos] += 1
            stats.bytes_out[qos] += size
        self.transport.write(data)

    def _no_template(self, message: Message, qos: int, cache: dict) -> None:
        return None  # the topic aliases make this connection's bytes its own

    def _send_aliased(self, message: Message, qos: int, packet_id, dup: bool,
                      cache: Optional[dict] = None, template=None) -> None:
        """:meth:`send_publish` with a topic alias (the client's Topic Alias Maximum
        allows it): the topic name only when the alias is new or rebound
        [MQTT-3.3.2-11]; shared bytes (``cache``, ``template``) are not used."""
        if self._public_only and self.broker.private_user_properties:
            message = self.broker.public_form(message, cache)   # [MQTT-3.3.2-17]
        aliases = self._out_aliases
        topic = message.topic
        alias, known = aliases.alias_for(topic)
        props = attrs.evolve(message.properties, topic_alias=alias)
        data = publish_template("" if known else topic, message.payload, qos,
                                message.retain, props, MQTT_5).encode(packet_id, dup)
        if self._client_max_packet is not None and len(data) > self._client_max_packet:
            if self.session is not None:  # [MQTT-3.1.2-25]
                self.broker.count_dropped(self.session, "client-maximum-packet-size", message)
                if packet_id is not None:
                    self.clock.callLater(0, self._discard_inflight, packet_id)
            return
        aliases.sent(topic, alias, known)
        if message.origin != SYS_ORIGIN:  # $SYS traffic is not counted
            stats = self._stats
            size = len(data)
            stats.bytes_sent += size
            stats.messages_out[qos] += 1
            stats.bytes_out[qos] += size
        self.transport.write(data)

    def _discard_inflight(self, packet_id: int) -> None:
        # an oversized in-flight message can never be delivered: acknowledge it
        # on the client's behalf so the session does not keep it forever
        session = self.session
        if session is not None:
            record = session.inflight.get(packet_id)
            if record is not None and record.qos == 1:
                self.broker.puback(session, packet_id)
            elif record is not None:
                self.broker.pubrec(session, packet_id, failed=True)

    def writable(self) -> bool:
        return self._online and not self._paused

    def _output(self, item, durable: bool) -> None:
        """Send a packet, its bytes, or run a callable, in order, after the store if asked.

        Acknowledgements that promise durability wait for the broker's store
        barrier; later output waits behind them so the order of
        acknowledgements is the order of the packets received [MQTT-4.6.0-2].
        """
        barrier = None
        if durable:
            broker = self.broker
            if broker.write_count != self._mark:
                # one barrier per connection and reactor turn: the turn's one
                # store sync covers every write made before it starts, so the
                # PUBACKs of a chunk of 100 PUBLISHes share one Deferred
                barrier = self._barrier
                if (barrier is None or self._barrier_turn != broker.sync_turns
                        or barrier.called):
                    barrier = broker.barrier(self._mark)
                    if barrier is not None:
                        self._barrier = barrier
                        self._barrier_turn = broker.sync_turns
                        barrier.addCallbacks(self._flush_pending, self._store_failed)
        pending = self._pending
        if barrier is None and not pending:
            self._emit(item)
            return
        if pending.__class__ is tuple:
            pending = self._pending = collections.deque()
        pending.append((barrier, item))

    def _flush_pending(self, result=None):
        pending = self._pending
        transport = self.transport
        chunks = None   # consecutive acknowledgements as bytes: one write
        while pending:
            barrier, item = pending[0]
            if barrier is not None and not barrier.called:
                break
            pending.popleft()
            if self.state == _CLOSED:
                continue
            if item.__class__ is bytes and self._client_max_packet is None:
                if chunks is None:
                    chunks = [item]
                else:
                    chunks.append(item)
                continue
            if chunks is not None:
                self._write_chunks(transport, chunks)
                chunks = None
            self._emit(item)
        if chunks is not None and self.state != _CLOSED:
            self._write_chunks(transport, chunks)
        if not pending:
            self._barrier = None
        return result

    def _write_chunks(self, transport, chunks) -> None:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._stats.bytes_sent += len(data)
        transport.write(data)

    def _emit(self, item) -> None:
        cls = item.__class__
        if cls is _InboundAck:
            self._inflight_in -= 1
            item = item.data
            cls = bytes
        if cls is bytes:
            limit = self._client_max_packet
            if limit is not None and len(item) > limit:  # [MQTT-3.1.2-24]
                self._fit(None, item, limit)
                return
            self._stats.bytes_sent += len(item)
            self.transport.write(item)
        elif callable(item):
            item()
        else:
            self.send(item)

    def _store_failed(self, failure):
        """The store could not make an acknowledgement durable: never send it.

        Before CONNACK the answer is a CONNACK refusal (v5 0x97 for a full
        disk, else 0x88; v3 0x03), never a DISCONNECT [MQTT-3.14.0-1]; after
        it, v5 DISCONNECT 0x97 / 0x83 or a v3 close.  The store logs the failure
        itself (once); this line is rate-limited per client.
        """
        self._pending = ()
        error = failure.value
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if self.state == _CONNECTED and not self._online:
            self.broker.stats.connects_refused += 1
            self.broker.stats.count_refusal("store-unavailable")
            self._will_on_close = False     # it never connected
            self._refuse(ReasonCode.QUOTA_EXCEEDED if full else ReasonCode.SERVER_UNAVAILABLE,
                         f"the store cannot write ({error})")
            return None
        self._warn("store-failed", "Store cannot write ({error}); disconnecting {client_id} "
                   "without acknowledging", error=str(error), client_id=self.client_id)
        self.disconnect(ReasonCode.QUOTA_EXCEEDED if full
                        else ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "storage failure")
        return None

    # --- flow control from the transport (push producer) ---------------------------

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._online and self.session is not None:
            self.broker.drain(self.session)

    # --- closing --------------------------------------------------------------------

    def disconnect(self, reason_code: int = ReasonCode.NORMAL_DISCONNECTION,
                   reason_string: Optional[str] = None,
                   log_reason: Optional[str] = None) -> None:
        """Close from the server side; MQTT 5 clients get a DISCONNECT first."""
        if self.state == _CLOSED:
            return
        if self.state == _CONNECTED and self.protocol_level == MQTT_5:
            props = Properties(reason_string=reason_string) if reason_string else Properties()
            self.send(Disconnect(reason_code, props))
        self._close(log_reason or f"closed by server (reason 0x{reason_code:02X})")

    def _lose_connection(self) -> None:
        # ITransport.loseConnection closes only once no producer is registered:
        # TLS honours that (a refused or kicked TLS client would stay
        # connected), plain TCP happens not to.  The shim that registered the
        # producer hands us how to unregister it.
        release, self.release_transport = self.release_transport, None
        if release is not None:
            release()
        self.transport.loseConnection()

    def _close(self, reason: str = "closed by server") -> None:
        self._close_reason = reason
        self._online = False
        self.state = _CLOSED
        self._cancel_timers()
        self._release()
        self._lose_connection()

    def _release(self) -> None:
        """Drop what a closed connection holds, at once rather than at the next
        full GC: the partial packet buffer, stashed and pending packets, and the
        handler table of bound methods (a reference cycle through ``self``)."""
        self.reader.release()
        self._handlers = _NO_HANDLERS
        self._stash = ()
        self._pending = ()

    def fail(self, error: MQTTError) -> None:
        """Answer a protocol error as the spec says, log it, close."""
        if self.state == _CLOSED:
            return
        self._stats.protocol_errors += 1
        refusal = getattr(error, "refusal", None)
        if refusal is not None:  # a limit of this broker, not a broken client
            self.broker.refused(refusal, self.client_id, self.peer,
                                f"{error}; closing (reason 0x{error.reason_code:02X})",
                                reason_code=error.reason_code)
        else:
            self._warn(type(error).__name__,
                       "Closing connection of {client_id} from {peer}: {error} "
                       "(reason 0x{reason_code:02X})", client_id=self.client_id or "-",
                       peer=self.peer, error=str(error), reason_code=error.reason_code,
                       spec=error.spec)
        if self.state == _CONNECTING:
            if isinstance(error, UnsupportedProtocolVersion):
                if not error.answer:
                    pass  # [MQTT-3.1.4-1]: close without a CONNACK
                elif error.protocol_level == MQTT_5:
                    self.protocol_level = MQTT_5
                    self.send(Connack(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION))
                else:  # [MQTT-3.1.2-2]: return code 0x01, v3 form
                    self.protocol_level = MQTT_3_1_1
                    self.send(Connack(False, 0x01))
            elif self.reader.level == MQTT_5:
                self.protocol_level = MQTT_5
                self.send(Connack(False, error.reason_code))
            self._close(f"protocol error: {error}")
            return
        self.disconnect(error.reason_code, error.message[:200], f"protocol error: {error}")

    def connection_lost(self, reason=None) -> None:
        if self._bucket is not None:
            self.broker.inbound_memory.remember(self._bucket_keys(), self._bucket,
                                                self.clock.seconds())
            self._bucket = None
        self.state = _CLOSED
        self._online = False
        self._cancel_timers()
        self._release()
        if self._claiming:  # gone while its session was being claimed
            self._claiming = False
            self.broker.claim_abandoned(self.client_id, self)
        session = self.session
        if session is not None:
            self.broker.connection_lost(session, self, publish_will=self._will_on_close,
                                        reason=self._close_reason)

    def _cancel_timers(self) -> None:
        for call in (self._connect_call, self._keepalive_call, self._hold_call,
                     self._rate_call):
            if call is not None and call.active():
                call.cancel()
        self._connect_call = self._keepalive_call = self._hold_call = None
        self._rate_call = None

    # --- hooks that may answer later -----------------------------------------------

    def _await(self, result, then, hook: str) -> None:
        """Call ``then(answer)`` with a hook's answer, now or when its Deferred fires.

        While a Deferred is pending, nothing more is read from this connection
        (later packets wait), so acknowledgements keep their order
        [MQTT-4.6.0-2].  A hook that raised, failed or did not answer within
        ``hook_timeout`` answers :data:`~mqttd.hooks.HOOK_FAILED` (a refusal),
        with a log line.
        """
        if not isinstance(result, defer.Deferred):
            if isinstance(result, Failure):
                result = self._hook_failed(result, hook)
            then(result)
            return
        box = []
        result.addBoth(box.append)
        if box:  # already answered
            answer = box[0]
            then(self._hook_failed(answer, hook) if isinstance(answer, Failure) else answer)
            return
        self._waiting += 1
        self.transport.pauseProducing()
        timer = self.clock.callLater(self.broker.config.hook_timeout, result.cancel)

        def answered(_):
            if timer.active():
                timer.cancel()
            self._waiting -= 1
            if self.state == _CLOSED:
                return
            answer = box[0]
            if isinstance(answer, Failure):
                answer = self._hook_failed(answer, hook)
            self._mark = self.broker.write_count
            try:
                then(answer)
            except MQTTError as error:
                self.fail(error)
                return
            self._resume_input()
        result.addCallback(answered)

    def _hook_failed(self, failure: Failure, hook: str):
        why = ("no answer within the hook timeout"
               if failure.check(defer.CancelledError, defer.TimeoutError) else
               failure.getErrorMessage() or failure.type.__name__)
        log.failure("Hook {hook} failed for {client_id} from {peer}: {why}; refusing",
                    failure, hook=hook, client_id=self.client_id or "-", peer=self.peer,
                    why=why)
        return HOOK_FAILED

    def _resume_input(self) -> None:
        """Process what waited for a hook, then read again (unless still blocked)."""
        if self._waiting or self._held or self.state == _CLOSED:
            return
        self._last_received = self.clock.seconds()  # we were not reading
        self._run_stash()
        if not (self._waiting or self._held or self._rate_call) and self.state != _CLOSED:
            self.transport.resumeProducing()

    def _run_stash(self) -> None:
        """Handle the packets read while input was blocked (through the inbound
        rate limit when there is one)."""
        stash, self._stash = self._stash, ()
        if stash:
            if self._bucket is not None:
                self._admit(list(stash))
            else:
                self._process(stash)

    # --- inbound rate limit (token bucket; backpressure, not disconnect) -------------

    def _admit(self, packets: list) -> None:
        """Handle ``packets`` one by one while the inbound bucket affords each
        PUBLISH; at the first it does not, keep it and the rest (decoded, in
        order), pause reading and come back when the bucket has refilled.

        So the limit bounds what reaches subscribers even inside one read of
        many packets: at most one second's worth passes at once (the bucket's
        depth), then the configured rate.  Other packets (acknowledgements,
        PINGREQ, ...) are not charged but keep their place in the order.
        """
        bucket = self._bucket
        clock = self.clock
        for index, packet in enumerate(packets):
            if self.state == _CLOSED:
                return
            if self._held or self._waiting:
                self._stash = packets[index:] + list(self._stash)
                return
            if packet.__class__ is Publish:
                raw = packet.raw
                wait = bucket.take(len(raw) if raw is not None else len(packet.payload),
                                   clock.seconds())
                if wait:
                    self._stash = packets[index:] + list(self._stash)
                    self._rate_pause(wait)
                    return
            self._process((packet,))

    def _rate_pause(self, wait: float) -> None:
        bucket = self._bucket
        if not bucket.throttled:
            bucket.throttled = True  # one count and line per throttled stretch
            self.broker.refused("inbound-rate", self.client_id, self.peer,
                                f"over the inbound rate limit ({bucket.rate:g} PUBLISH/s, "
                                f"{bucket.bytes_rate:g} bytes/s); reads paused")
        self.transport.pauseProducing()
        self._rate_call = self.clock.callLater(wait, self._rate_resume)

    def _rate_resume(self) -> None:
        self._rate_call = None
        if self.state == _CLOSED or self._held or self._waiting:
            return
        self._run_stash()
        if self.state != _CLOSED and not (self._held or self._waiting or self._rate_call):
            self._bucket.throttled = False
            self.transport.resumeProducing()

    def _bucket_keys(self) -> tuple:
        """Where the inbound bucket is remembered: client id and peer host."""
        return (("client", self.client_id), ("host", _peer_host(self.peer)))

    def _connect_timeout(self) -> None:
        self._connect_call = None
        self._warn("connect-timeout", "No CONNECT from {peer} within {timeout} s; closing",
                   peer=self.peer, timeout=self.broker.config.connect_timeout)
        self._close("connect timeout")

    def _check_keepalive(self) -> None:
        self._keepalive_call = None
        if self.state == _CLOSED:
            return
        idle = self.clock.seconds() - self._last_received
        if idle >= self._keepalive:
            # [MQTT-3.1.2-24] (3.1.1), [MQTT-3.1.2-22] (5.0): close after 1.5
            # keepalive periods without a complete packet
            partial = self.reader.buffered
            self._warn("keepalive",
                       "Keepalive of {client_id} expired after {idle:.1f} s without a "
                       "complete packet ({partial} bytes of one pending); closing",
                       client_id=self.client_id, idle=idle, partial=partial)
            self.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, log_reason="keepalive timeout")
            return
        self._keepalive_call = self.clock.callLater(self._keepalive - idle,
                                                    self._check_keepalive)

    # --- CONNECT --------------------------------------------------------------------

    def _refuse(self, reason_code: int, why: str, spec: Optional[str] = None,
                what: Optional[str] = None, detail: Optional[str] = None, **fields) -> None:
        """Answer the CONNECT with ``reason_code`` (v3: its v3 equivalent) and close.

        One log line per refusal, rate-limited: with ``what`` (a refusal kind
        counted in ``BrokerStats.refused``) the broker's ``Refused WHAT for ID
        from PEER: DETAIL (CONNACK 0x..)`` line, else ``Refusing CONNECT ...``.
        """
        if self.protocol_level == MQTT_5:
            code = reason_code
        else:
            code = V5_TO_V3_CONNACK.get(reason_code, 0x03)
        if what is not None:
            # the line names the code the client got (v3: its v3 equivalent)
            self.broker.refused(what, self.client_id, self.peer,
                                f"{detail or why} (CONNACK 0x{code:02X})",
                                reason_code=reason_code, **fields)
        else:
            self._warn("connect-refused", "Refusing CONNECT of {client_id} from {peer}: {why} "
                       "(reason 0x{reason_code:02X})", client_id=self.client_id or "-",
                       peer=self.peer, why=why, reason_code=reason_code, spec=spec)
        self.send(Connack(False, code))
        self._close(f"CONNECT refused: {why}")

    def _on_connect(self, packet: Connect) -> None:
        if self._connect_call is not None and self._connect_call.active():
            self._connect_call.cancel()
        self._connect_call = None
        broker = self.broker
        config = broker.config
        level = self.protocol_level = packet.protocol_level
        # a broker bridging to us (level 0x83/0x84): as mosquitto does, its
        # subscriptions get No Local + Retain As Published, so what it sends us
        # never echoes back and retained flags travel unchanged
        props = packet.properties
        mqttd_peer = level == MQTT_5 and any(
            name == BRIDGE_PROPERTY for name, _value in props.user_properties)
        self.bridge = packet.bridge or mqttd_peer
        # only another mqttd's bridge gets the broker's private user properties
        # (it understands them); everyone else, a mosquitto bridge included,
        # gets the publishers' user properties unaltered [MQTT-3.3.2-17]
        self._public_only = level == MQTT_5 and not mqttd_peer
        client_id = packet.client_id
        self.client_id = client_id or None
        if client_id and client_id in config.trace_clients:
            # --trace-client: from the CONNECT on, so a refused CONNECT and its
            # CONNACK are traced too (the case one most needs to debug)
            trace.install(self, packet)
        if config.max_connections and broker.open_connections > config.max_connections:
            return self._refuse(ReasonCode.QUOTA_EXCEEDED, "max_connections reached",
                                what="max-connections",
                                detail=f"{broker.open_connections - 1} connections open, "
                                       f"max_connections is {config.max_connections}")
        if broker.unavailable is not None:
            return self._refuse(ReasonCode.SERVER_UNAVAILABLE, broker.unavailable,
                                what="unavailable", detail=broker.unavailable)
        if self.over_listener_limit:
            return self._refuse(ReasonCode.QUOTA_EXCEEDED, "listener max_connections reached",
                                what="max-connections",
                                detail=f"listener has {self.over_listener_limit} connections "
                                       f"(its limit)")
        if level == MQTT_5:
            if props.receive_maximum:
                self.send_window = min(self.send_window, props.receive_maximum)
            if props.maximum_packet_size:
                self._client_max_packet = props.maximum_packet_size
            if props.topic_alias_maximum:  # the client accepts our aliases [MQTT-3.3.2-11]
                self._out_aliases = OutboundAliases(props.topic_alias_maximum)
                self.send_publish = self._send_aliased
                self.cached_template = self._no_template
            self._in_aliases = InboundAliases(config.max_topic_alias)
            self._receive_max = config.max_inflight_incoming
        assigned = None
        if not client_id:
            if level == MQTT_3_1:
                return self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                    "MQTT 3.1 requires a client identifier")
            if level == MQTT_3_1_1 and not packet.clean_start:
                return self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                    "empty client identifier with clean session 0",
                                    spec="MQTT-3.1.3-8")
            client_id = broker.assign_client_id()  # [MQTT-3.1.3-6]
            if level == MQTT_5:
                assigned = client_id
        self.client_id = client_id
        owner = broker.internal_owner(client_id)
        if owner is not None:
            # an internal session (a bridge's local end) is no network client's
            # to claim, take over or discard, whatever the auth policy: the id
            # itself is not allowed (v5 0x85; v3 0x02 Identifier rejected)
            # [MQTT-3.1.3-8, MQTT-3.1.3-9]
            broker.stats.connects_refused += 1
            return self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                "client id of an internal session", spec="MQTT-3.1.3-8",
                                what="internal-client-id",
                                detail=f"{client_id!r} is reserved for the internal "
                                       f"session of {owner}")
        will = packet.will
        if will is not None:
            try:
                topics.validate_topic_name(will.topic)
            except MQTTError as error:
                if level != MQTT_5:
                    # a CONNECT that does not conform is closed without a
                    # CONNACK [MQTT-3.1.4-1]; 0x03 would claim "server unavailable"
                    raise ProtocolError(f"will topic: {error.message}",
                                        spec="MQTT-3.1.4-1") from None
                return self._refuse(ReasonCode.TOPIC_NAME_INVALID,
                                    f"will topic: {error.message}", spec="MQTT-3.1.3-11")
            response_topic = will.properties.response_topic
            if response_topic is not None:
                try:
                    topics.validate_topic_name(response_topic)
                except MQTTError as error:  # [MQTT-3.3.2-14] applies to the will too
                    return self._refuse(ReasonCode.PROTOCOL_ERROR,
                                        f"will response topic: {error.message}",
                                        spec="MQTT-3.3.2-14")
            if will.qos > config.max_qos:
                return self._refuse(ReasonCode.QOS_NOT_SUPPORTED,
                                    f"will QoS {will.qos} above the maximum QoS "
                                    f"{config.max_qos}", spec="MQTT-3.2.2-12")
            if will.retain and not config.retain_available:
                return self._refuse(ReasonCode.RETAIN_NOT_SUPPORTED,
                                    "retained will but retain is not available",
                                    spec="MQTT-3.2.2-13")
        levels = config.max_topic_levels
        if will is not None and levels and will.topic.count("/") >= levels:
            return self._refuse(ReasonCode.TOPIC_NAME_INVALID, "will topic too deep",
                                what="max-topic-levels",
                                detail=f"will topic has more than {levels} levels")
        self._connect_packet = packet
        self.info = ClientInfo(client_id, level, packet.username, self.peer,
                               packet.clean_start, packet.keepalive, False,
                               bridge=self.bridge)
        self._assigned = assigned
        identity = self.transport_identity
        if identity is not None:
            # the listener authenticated the client (TLS client certificate,
            # mosquitto's use_identity_as_username): that identity is the
            # username and no password or AUTH exchange is asked for
            username = identity()
            if username is None:
                return self._refuse(ReasonCode.NOT_AUTHORIZED, "no certificate identity",
                                    what="authentication",
                                    detail="no client certificate identity on a listener "
                                           "that uses it as the username")
            return self._authenticated(username)
        if level == MQTT_5 and props.authentication_method is not None:
            return self._start_exchange(props.authentication_method,
                                        props.authentication_data, reauth=False)
        authenticator = broker.authenticator
        if authenticator is None:
            return self._authenticated(packet.username)
        request = AuthRequest(client_id, packet.username, packet.password, self.peer,
                              level, packet)
        self._await(call_hook(authenticator.authenticate, request),
                    self._authenticate_answered, "authenticate")

    def _authenticate_answered(self, answer) -> None:
        packet = self._connect_packet
        code, username = auth_outcome(answer, packet.username)
        if code == ReasonCode.CONNECTION_RATE_EXCEEDED:
            # the authenticator's work is bounded (e.g. password hashing): not
            # a wrong password, a "try again later"
            return self._refuse(code, "authentication busy", what="connection-rate",
                                detail=f"too many authentications in progress "
                                       f"(username {packet.username!r})",
                                username=packet.username)
        if code:
            what = "anonymous" if packet.username is None else "authentication"
            return self._refuse(code, "authentication failed", what=what,
                                detail=f"username {packet.username!r}",
                                username=packet.username)
        self._authenticated(username)

    # --- MQTT 5 enhanced authentication [MQTT-4.12] -------------------------------------

    def _start_exchange(self, method: str, data, reauth: bool) -> None:
        enhanced = self.broker.enhanced_authenticator
        exchange = None
        if enhanced is not None:
            try:
                exchange = enhanced.start(method, self.info)
            except Exception:
                log.failure("Enhanced authentication {method} failed to start for "
                            "{client_id}", method=method, client_id=self.client_id)
                exchange = None
                return self._auth_failed(ReasonCode.NOT_AUTHORIZED, reauth,
                                         detail=f"method {method!r} failed to start")
        if exchange is None:
            return self._auth_failed(ReasonCode.BAD_AUTHENTICATION_METHOD, reauth,
                                     f"authentication method {method!r} not supported",
                                     detail=f"unknown authentication method {method!r}")
        self._auth_exchange = exchange
        self._auth_method = method
        self._await(call_hook(exchange.step, data),
                    lambda step: self._exchange_stepped(step, reauth), "authenticate")

    def _exchange_stepped(self, step, reauth: bool) -> None:
        if self.state == _CLOSED:
            return
        if not isinstance(step, AuthStep):
            step = AuthStep(AuthOutcome.FAILURE)
        method = self._auth_method
        if step.outcome == AuthOutcome.CONTINUE:
            self.send(Auth(ReasonCode.CONTINUE_AUTHENTICATION, Properties(
                authentication_method=method, authentication_data=step.data)))
            if not reauth:
                self._handlers = self._handler_table("auth")
                # the client has connect_timeout seconds for its next AUTH
                self._connect_call = self.clock.callLater(
                    self.broker.config.connect_timeout, self._connect_timeout)
            return
        self._auth_exchange = None
        if step.outcome == AuthOutcome.SUCCESS:
            if not reauth:
                self._authenticated(step.username, auth_data=step.data)
                return
            if step.username is not None and step.username != self.info.username:
                self.broker.refused("authentication", self.client_id, self.peer,
                                    f"re-authenticated as {step.username!r}, not "
                                    f"{self.info.username!r}")
                self.disconnect(ReasonCode.NOT_AUTHORIZED, "identity changed")
                return
            log.info("Re-authenticated {client_id} ({method})", client_id=self.client_id,
                     method=method)
            self._output(Auth(ReasonCode.SUCCESS, Properties(
                authentication_method=method, authentication_data=step.data)), durable=False)
            return
        detail = getattr(step, "detail", None)
        self._auth_failed(step.reason_code, reauth, "authentication failed",
                          detail=f"{method} authentication failed"
                                 + (f": {detail}" if detail else ""))

    def _auth_failed(self, code: int, reauth: bool, why: str = "authentication failed",
                     detail: Optional[str] = None):
        """Refuse the CONNECT (or end the connection on re-authentication) with
        ``code``; one rate-limited refusal line ``authentication`` with ``detail``."""
        self._auth_exchange = None
        if reauth:
            if code == ReasonCode.BAD_USER_NAME_OR_PASSWORD:
                code = ReasonCode.NOT_AUTHORIZED  # 0x86 is no DISCONNECT reason code
            self.broker.refused("authentication", self.client_id, self.peer,
                                f"{detail or why} (DISCONNECT 0x{code:02X})",
                                reason_code=code)
            self.disconnect(code, why)  # [MQTT-4.12.1-2]
        else:
            self._refuse(code, why, what="authentication", detail=detail)

    def _on_auth_during_connect(self, packet: Auth) -> None:
        if self._connect_call is not None and self._connect_call.active():
            self._connect_call.cancel()
        self._connect_call = None
        if packet.reason_code != ReasonCode.CONTINUE_AUTHENTICATION:
            raise ProtocolError("AUTH during CONNECT must continue authentication "
                                "(0x18)", spec="MQTT-4.12.0-2")
        self._continue_exchange(packet, reauth=False)

    def _on_disconnect_during_connect(self, packet: Disconnect) -> None:
        self._close("disconnect during authentication")

    def _continue_exchange(self, packet: Auth, reauth: bool) -> None:
        props = packet.properties
        if self._auth_exchange is None:
            raise ProtocolError("AUTH continue without an authentication in progress",
                                spec="MQTT-4.12.0-2")
        if props.authentication_method != self._auth_method:
            raise ProtocolError("AUTH with another authentication method",
                                spec="MQTT-4.12.0-5")
        self._await(call_hook(self._auth_exchange.step, props.authentication_data),
                    lambda step: self._exchange_stepped(step, reauth), "authenticate")

    def _on_auth(self, packet: Auth) -> None:
        """AUTH on a live connection: re-authentication [MQTT-4.12.1]."""
        if self.protocol_level != MQTT_5 or self._auth_method is None:
            raise ProtocolError("AUTH without enhanced authentication", spec="MQTT-4.12.0-1")
        method = packet.properties.authentication_method
        if packet.reason_code == ReasonCode.REAUTHENTICATE:
            if method != self._auth_method:
                raise ProtocolError("re-authentication with another method",
                                    spec="MQTT-4.12.1-1")
            if self._auth_exchange is not None:
                raise ProtocolError("re-authentication while one is in progress")
            return self._start_exchange(method, packet.properties.authentication_data,
                                        reauth=True)
        if packet.reason_code == ReasonCode.CONTINUE_AUTHENTICATION:
            return self._continue_exchange(packet, reauth=True)
        raise ProtocolError(f"AUTH from a client with reason 0x{packet.reason_code:02X}")

    # --- the rest of CONNECT: ownership, will permission, session -----------------------

    def _authenticated(self, username: Optional[str], auth_data=None) -> None:
        """Authentication passed; check session ownership and the will, then connect."""
        packet = self._connect_packet
        broker = self.broker
        if username != self.info.username:
            self.info = attrs.evolve(self.info, username=username)
        owner = broker.session_owner_conflict(self.client_id, username)
        if owner is not None:
            return self._refuse(ReasonCode.NOT_AUTHORIZED,
                                "client id owned by another user", what="session-owner",
                                detail=f"session belongs to {owner!r}, not {username!r}",
                                username=username)
        will = packet.will
        check = broker.authorize_publish
        if will is None or check is None:
            return self._connected(auth_data)
        message = will_message(will, self.client_id)   # the PUBLISH it would become

        def will_answered(answer):
            if answer is not True:
                return self._refuse(ReasonCode.NOT_AUTHORIZED, "will topic not authorized",
                                    what="will",
                                    detail=f"no write permission for will topic "
                                           f"{will.topic!r}", topic=will.topic)
            self._connected(auth_data)
        self._await(call_hook(check, self.info, message), will_answered, "authorize_publish")

    def _connected(self, auth_data=None) -> None:
        packet = self._connect_packet
        self._connect_packet = None
        broker = self.broker
        config = broker.config
        level = self.protocol_level
        props = packet.properties
        client_id = self.client_id
        granted_expiry = None
        if level == MQTT_5:
            expiry = props.session_expiry_interval or 0
            if config.max_session_expiry is not None and expiry > config.max_session_expiry:
                # the CONNACK's Session Expiry Interval tells the client the
                # value used instead of its own [MQTT-3.2.2-3.2 / §3.2.2.3.2]
                expiry = granted_expiry = config.max_session_expiry
        else:
            expiry = 0 if packet.clean_start else None
        keepalive = packet.keepalive
        server_keepalive = None
        if config.max_keepalive and (keepalive == 0 or keepalive > config.max_keepalive):
            # --max-keepalive also bounds keepalive 0 (no keepalive).  v5: the
            # Server Keep Alive tells the client [MQTT-3.2.2-21]; v3 has no way to
            # tell it, so (as mosquitto does) the CONNECT is refused with 0x02
            if level != MQTT_5:
                return self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                    f"keepalive {keepalive} s is 0 or over the maximum of "
                                    f"{config.max_keepalive} s")
            keepalive = server_keepalive = config.max_keepalive
        refusal = broker.session_refusal(client_id, expiry is None or expiry > 0)
        if refusal is not None:
            code, why, reason = refusal
            broker.stats.connects_refused += 1
            broker.stats.count_refusal(reason)
            return self._refuse(code, why)
        opening = (packet, auth_data, expiry, granted_expiry, keepalive, server_keepalive)
        # the session seam: a cluster first claims the client id cluster-wide
        # (and loads its session); a single node answers None at once
        claim = broker.claim_session(self, client_id, packet.clean_start,
                                     expiry is None or expiry > 0, packet.will,
                                     self.info.username)
        if claim is None:
            return self._open(opening)
        self._claiming = True
        self._await(claim, lambda answer: self._claimed(answer, opening), "claim_session")

    def _claimed(self, answer, opening) -> None:
        """The session seam answered: None opens the session, a refusal
        ``(reason_code, why, stats_reason)`` or a failed claim refuses."""
        self._claiming = False
        if answer is not None:
            broker = self.broker
            broker.stats.connects_refused += 1
            if answer is HOOK_FAILED:
                answer = (ReasonCode.SERVER_UNAVAILABLE, "session claim failed",
                          "claim-failed")
            code, why, reason = answer
            broker.stats.count_refusal(reason)
            broker.claim_abandoned(self.client_id, self)
            return self._refuse(code, why)
        self._open(opening)

    def _open(self, opening) -> None:
        packet, auth_data, expiry, granted_expiry, keepalive, server_keepalive = opening
        broker = self.broker
        config = broker.config
        level = self.protocol_level
        props = packet.properties
        client_id = self.client_id
        session, present = broker.open_session(
            self, client_id, level, packet.clean_start, expiry, packet.will,
            owner=self.info.username, info=self.info)
        self.session = session
        self.state = _CONNECTED
        self.reader.max_packet_size = config.max_packet_size
        self._handlers = self._handler_table("connected")
        if keepalive:
            self._keepalive = keepalive * 1.5
            self._keepalive_call = self.clock.callLater(self._keepalive,
                                                        self._check_keepalive)
        if present:
            self.info = attrs.evolve(self.info, session_present=present)
            session.info = self.info
        if config.max_inbound_rate or config.max_inbound_bytes_rate:
            now = self.clock.seconds()
            self._bucket = InboundBucket(config.max_inbound_rate,
                                         config.max_inbound_bytes_rate, now)
            # a reconnect (same client id or same host) continues where the
            # last connection left its bucket, not from a full one
            broker.inbound_memory.recall(self._bucket_keys(), self._bucket, now)
        if level == MQTT_5:
            response_information = None
            if props.request_response_information and config.response_information:
                response_information = config.response_information + client_id
            # absent properties mean the spec's defaults: Receive Maximum 65535,
            # Maximum QoS 2, Retain / Wildcard Subscription Available 1
            ack_props = Properties(
                assigned_client_identifier=self._assigned,
                session_expiry_interval=granted_expiry,
                server_keep_alive=server_keepalive,
                maximum_packet_size=config.max_packet_size,
                receive_maximum=(config.max_inflight_incoming
                                 if config.max_inflight_incoming < 65535 else None),
                maximum_qos=config.max_qos if config.max_qos < 2 else None,
                retain_available=None if config.retain_available else 0,
                topic_alias_maximum=config.max_topic_alias or None,
                subscription_identifier_available=1,
                shared_subscription_available=1,
                response_information=response_information,
                authentication_method=self._auth_method,
                authentication_data=auth_data,
                # tells an mqttd bridge that this broker speaks its private
                # user properties (the mesh guard's stamps travel on this link)
                user_properties=(() if self._public_only
                                 else ((BRIDGE_PROPERTY, config.broker_id),)),
            )
        else:
            ack_props = Properties()
        self._output(Connack(present, 0, ack_props), durable=True)
        self._output(self._went_online, durable=False)

    def _went_online(self) -> None:
        if self.state != _CONNECTED:
            return
        self._online = True
        self.broker.emit("clientConnected", client=self.info)
        self.broker.session_online(self.session)

    # --- PUBLISH and its flows ---------------------------------------------------------

    def _on_publish(self, packet: Publish) -> None:
        qos = packet.qos
        props = packet.properties
        level = self.protocol_level
        topic = packet.topic
        if self._limited:
            if qos > self._max_qos:
                raise MQTTError(f"PUBLISH QoS {qos} above the Maximum QoS {self._max_qos}",
                                ReasonCode.QOS_NOT_SUPPORTED, spec="MQTT-3.2.2-11")
            if packet.retain and not self._retain_available:
                raise MQTTError("retained PUBLISH but Retain Available is 0",
                                ReasonCode.RETAIN_NOT_SUPPORTED, spec="MQTT-3.2.2-14")
        if level == MQTT_5:
            if props.topic_alias is not None:
                # the alias is this connection's: resolved here, never forwarded
                # (forwarded_properties drops it, so the received bytes are not reused)
                topic = self._in_aliases.resolve(topic, props.topic_alias)
            if qos:
                self._check_receive_maximum(packet)
            if props.subscription_identifiers:
                raise ProtocolError("PUBLISH from a client carries a subscription "
                                    "identifier", spec="MQTT-3.3.4-6")
            if props.response_topic is not None:
                try:
                    topics.validate_topic_name(props.response_topic)
                except MQTTError as error:
                    raise ProtocolError(f"Response Topic: {error.message}",
                                        spec="MQTT-3.3.2-14") from None
        # one $SYS topic is open to clients: a bridging broker's state
        # notification ($SYS/broker/connection/<id>/state), as in mosquitto
        if topic.startswith("$SYS") and not topics.is_bridge_state_topic(topic):
            self._warn("publish-refused", "Refused PUBLISH of {client_id} to {topic}: "
                       "clients cannot publish into $SYS", client_id=self.client_id,
                       topic=topic)
            return self._ack_refused(packet, ReasonCode.NOT_AUTHORIZED)
        broker = self.broker
        levels = broker.config.max_topic_levels
        if levels and topic.count("/") >= levels:
            broker.refused("max-topic-levels", self.client_id, self.peer,
                           f"PUBLISH topic has more than {levels} levels")
            raise MQTTError(f"topic name has more than max_topic_levels={levels} levels",
                            ReasonCode.TOPIC_NAME_INVALID)
        expiry = props.message_expiry_interval
        # inbound -> outbound: only what the spec forwards (§3.3.2.3)
        forwarded = forwarded_properties(props)
        message = Message(topic, packet.payload, qos, packet.retain, forwarded,
                          self.client_id,
                          None if expiry is None else self.clock.seconds() + expiry)
        check = broker.authorize_publish
        if check is not None:
            try:
                allowed = check(self.info, message)
            except Exception:
                allowed = Failure()
            if allowed is not True:
                self._await(allowed, lambda answer: self._publish_answered(
                    packet, message, answer), "authorize_publish")
                return
        self._publish_allowed(packet, message)

    def _publish_answered(self, packet: Publish, message: Message, answer) -> None:
        if answer is True:
            return self._publish_allowed(packet, message)
        self.broker.refused("publish", self.client_id, self.peer,
                            f"no write permission for {packet.topic!r}", topic=packet.topic)
        if self.protocol_level == MQTT_5:
            return self._ack_refused(packet, ReasonCode.NOT_AUTHORIZED)
        # MQTT 3 has no refusal in PUBACK/PUBREC: acknowledged and dropped (as mosquitto)
        pid = packet.packet_id
        if packet.qos == 1:
            self._output(Puback(pid), durable=False)
        elif packet.qos == 2:
            if not self.broker.inbound_qos2_seen(self.session, pid):
                self.broker.inbound_qos2_add(self.session, pid)
            self._output(Pubrec(pid), durable=True)

    def _publish_allowed(self, packet: Publish, message: Message) -> None:
        qos = packet.qos
        level = self.protocol_level
        # the bytes as received serve every subscriber of the same protocol
        # family at the same QoS: no re-encoding (unless properties were dropped)
        raw = packet.raw if message.properties is packet.properties else None
        cache = None if raw is None else {
            template_key(message, level, qos): PublishTemplate.from_raw(raw, qos)}
        broker = self.broker
        if qos == 0:
            broker.publish(message, self.info, cache)
            if broker.backpressure:
                self._hold_publisher()
            return
        pid = packet.packet_id
        if qos == 1:
            receivers = broker.publish(message, self.info, cache)
            if level != MQTT_5:
                # PUBACK as bytes: the most frequent packet the broker sends
                self._output(bytes((0x40, 2, pid >> 8, pid & 0xFF)), durable=True)
            else:  # frees its place of the Receive Maximum once written
                self._output(_InboundAck(
                    bytes((0x40, 2, pid >> 8, pid & 0xFF)) if receivers else
                    bytes((0x40, 3, pid >> 8, pid & 0xFF, ReasonCode.NO_MATCHING_SUBSCRIBERS))),
                    durable=True)
        else:
            session = self.session
            if broker.inbound_qos2_seen(session, pid):
                # a re-sent PUBLISH before PUBREL: acknowledge, never deliver twice
                # [MQTT-4.3.3-10]
                self._output(Pubrec(pid), durable=False)
                return
            broker.inbound_qos2_add(session, pid)
            receivers = broker.publish(message, self.info, cache)
            code = 0 if receivers or level != MQTT_5 else ReasonCode.NO_MATCHING_SUBSCRIBERS
            self._output(Pubrec(pid, code), durable=True)
        if broker.backpressure:
            self._hold_publisher()

    def _check_receive_maximum(self, packet: Publish) -> None:
        """A v5 client may not have more QoS 1/2 PUBLISHes unacknowledged than the
        Receive Maximum we announced [MQTT-3.3.4-7]; 0x93 if it does [MQTT-3.3.4-8].

        A QoS 1 PUBLISH counts until its PUBACK is written, a QoS 2 one until its
        PUBREL arrives (a re-sent QoS 2 PUBLISH is already counted)."""
        if packet.qos == 2 and self.broker.inbound_qos2_seen(self.session, packet.packet_id):
            return
        if self._inflight_in + len(self.session.inbound_qos2) >= self._receive_max:
            raise MQTTError(f"more than Receive Maximum {self._receive_max} QoS 1/2 "
                            f"PUBLISHes unacknowledged", ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                            spec="MQTT-3.3.4-8")
        if packet.qos == 1:
            self._inflight_in += 1

    def _hold_publisher(self) -> None:
        """Stop reading from this publisher until the subscribers it feeds catch up."""
        broker = self.broker
        broker.backpressure = False
        if self._held or self.state != _CONNECTED:
            return
        if self.session is not None and self.session.congested_since is not None:
            return  # never wait for ourselves (we would not read our own PUBACKs)
        self._held = True
        self.transport.pauseProducing()
        broker.hold_publisher(self)
        self._hold_call = self.clock.callLater(broker.config.max_publisher_pause,
                                               self.release_publisher)

    def release_publisher(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._hold_call is not None and self._hold_call.active():
            self._hold_call.cancel()
        self._hold_call = None
        if self.state == _CLOSED:
            return
        if self._waiting:
            return  # the hook's answer resumes input
        self._last_received = self.clock.seconds()  # we were not reading
        self._run_stash()
        if not (self._held or self._waiting or self._rate_call) and self.state != _CLOSED:
            self.transport.resumeProducing()

    def _ack_refused(self, packet: Publish, code: int) -> None:
        if packet.qos == 1:
            if self._receive_max is not None:  # counted in _on_publish
                pid = packet.packet_id
                self._output(_InboundAck(bytes((0x40, 3, pid >> 8, pid & 0xFF, code))),
                             durable=False)
                return
            self._output(Puback(packet.packet_id, code), durable=False)
        elif packet.qos == 2:
            self._output(Pubrec(packet.packet_id, code), durable=False)

    def _check_ack_type(self, packet, expected_qos: int, stage=None) -> None:
        """An acknowledgement of the wrong type for the message in flight under
        its packet id is a protocol violation, closed [MQTT-4.8.0-1]: PUBACK
        for a QoS 2 message, PUBREC for a QoS 1 one, PUBCOMP before PUBREC
        [MQTT-4.3.2-1, 4.3.3-1].  An unknown packet id is not: it may answer a
        message already completed before a reconnect."""
        record = self.session.inflight.get(packet.packet_id)
        if record is None:
            return
        if record.qos != expected_qos or (stage is not None and record.stage != stage):
            raise ProtocolError(
                f"{type(packet).__name__} for packet id {packet.packet_id}, a QoS "
                f"{record.qos} message at stage {record.stage.name}",
                spec="MQTT-4.8.0-1" if self.protocol_level != MQTT_5 else "MQTT-4.13.1-1")

    def _unknown_ack(self, packet) -> None:
        # normal after a reconnect (the message was completed meanwhile): info, rate-limited
        self.broker.log_limiter.emit(
            log.info, (self._who(), "unknown-ack"),
            "{packet} for unknown packet id {packet_id} from {client_id}",
            packet=type(packet).__name__, packet_id=packet.packet_id, client_id=self.client_id)

    def _on_puback(self, packet: Puback) -> None:
        if not self.broker.puback(self.session, packet.packet_id):
            self._check_ack_type(packet, 1)
            self._unknown_ack(packet)

    def _on_pubrec(self, packet: Pubrec) -> None:
        failed = self.protocol_level == MQTT_5 and packet.reason_code >= 0x80
        self._check_ack_type(packet, 2)
        if self.broker.pubrec(self.session, packet.packet_id, failed):
            self._output(Pubrel(packet.packet_id), durable=True)
        elif not failed:
            self._output(Pubrel(packet.packet_id,
                                ReasonCode.PACKET_IDENTIFIER_NOT_FOUND), durable=False)

    def _on_pubrel(self, packet: Pubrel) -> None:
        found = self.broker.inbound_qos2_release(self.session, packet.packet_id)
        code = 0 if found else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
        self._output(Pubcomp(packet.packet_id, code), durable=True)

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        if not self.broker.pubcomp(self.session, packet.packet_id):
            self._check_ack_type(packet, 2, OutboundStage.PUBREL_SENT)
            self._unknown_ack(packet)

    # --- SUBSCRIBE / UNSUBSCRIBE ----------------------------------------------------------

    def _on_subscribe(self, packet: Subscribe) -> None:
        for request in packet.subscriptions:
            if request.no_local and request.topic_filter.startswith(topics.SHARE_PREFIX):
                raise ProtocolError(f"No Local on the shared subscription "
                                    f"{request.topic_filter!r}", spec="MQTT-3.8.3-4")
        if len(packet.subscriptions) > FILTERS_PER_TURN:
            return self._subscribe_in_slices(packet)
        answers, pending = self._subscribe_answers(packet.subscriptions)
        if not pending:
            return self._subscribe_answered(packet, answers)
        self._await(self._gathered(answers), lambda answer: self._subscribe_answered(
            packet, answer if isinstance(answer, list) else [HOOK_FAILED] * len(answers)),
            "authorize_subscribe")

    def _subscribe_answers(self, requests) -> tuple:
        """Check each requested filter (syntax, --max-topic-levels, then the
        authorize_subscribe hook): ``(answers, pending)``, an answer per filter
        (True, a refusal, or a hook's answer: value or Deferred) and whether
        one of them is a Deferred."""
        v5 = self.protocol_level == MQTT_5
        broker = self.broker
        check = broker.authorize_subscribe
        levels = broker.config.max_topic_levels
        answers = []   # a final code, or a hook answer (value or Deferred) to wait for
        pending = False
        for request in requests:
            topic_filter = request.topic_filter
            try:
                topics.validate_topic_filter(topic_filter)
            except MQTTError as error:
                if not v5:
                    # 3.x has no per-filter refusal for a malformed filter: a
                    # protocol violation closes the connection [MQTT-4.8.0-1]
                    raise ProtocolError(f"SUBSCRIBE with an invalid topic filter: "
                                        f"{error.message}", spec="MQTT-4.8.0-1") from None
                self._warn("subscribe-refused",
                           "Refused subscription of {client_id} to {filter!r}: {error}",
                           client_id=self.client_id, filter=topic_filter, error=str(error))
                answers.append(_Refused(ReasonCode.TOPIC_FILTER_INVALID))
                continue
            # a shared subscription's levels are those of the filter it shares
            if levels and topics.parse_shared(topic_filter)[1].count("/") >= levels:
                broker.refused("max-topic-levels", self.client_id, self.peer,
                               f"filter {topic_filter!r} has more than {levels} levels")
                answers.append(_Refused(ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80))
                continue
            if check is None:
                answers.append(True)
                continue
            answer = call_hook(check, self.info, topic_filter, request.qos)
            if isinstance(answer, defer.Deferred):
                pending = True
            answers.append(answer)
        return answers, pending

    @staticmethod
    def _gathered(answers) -> defer.Deferred:
        """The hook answers (some Deferreds) as one Deferred of their list."""
        waits = [a if isinstance(a, defer.Deferred) else defer.succeed(a) for a in answers]
        gathered = defer.DeferredList(waits, consumeErrors=True)
        gathered.addCallback(lambda results: [value for _ok, value in results])
        return gathered

    def _subscribe_answered(self, packet: Subscribe, answers) -> None:
        codes, granted = self._apply_subscriptions(packet, packet.subscriptions, answers)
        self._acknowledge_subscribe(packet, codes, granted)
        if granted:
            self._output(lambda: self._subscribed(granted), durable=False)

    def _apply_subscriptions(self, packet: Subscribe, requests, answers) -> tuple:
        """Subscribe the filters answered True: ``(codes, granted)``, a SUBACK
        code per filter and ``(record, is_new)`` per subscription made."""
        v5 = self.protocol_level == MQTT_5
        broker = self.broker
        session = self.session
        limit = broker.config.max_subscriptions_per_client
        # the codec allows one identifier in a SUBSCRIBE, 1..268435455
        ids = packet.properties.subscription_identifiers if v5 else ()
        sid = ids[0] if ids else None
        max_qos = self._max_qos
        codes = []
        granted = []
        for request, answer in zip(requests, answers):
            topic_filter = request.topic_filter
            if answer is not True:
                if isinstance(answer, Failure):
                    self._hook_failed(answer, "authorize_subscribe")
                if answer.__class__ is _Refused:  # refused before asking the hook
                    codes.append(answer.code)
                    continue
                broker.refused("subscribe", self.client_id, self.peer,
                               f"no read permission for filter {topic_filter!r}",
                               topic_filter=topic_filter)
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)
                continue
            if (limit and topic_filter not in session.subscriptions
                    and len(session.subscriptions) >= limit):
                broker.refused("max-subscriptions-per-client", self.client_id, self.peer,
                               f"already {limit} subscriptions; {topic_filter!r} refused",
                               topic_filter=topic_filter)
                codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else 0x80)
                continue
            qos = request.qos if request.qos <= max_qos else max_qos  # [MQTT-3.2.2-10]
            if self.bridge:  # mosquitto's rule for bridge connections
                record = SubscriptionRecord(topic_filter, qos, True, True,
                                            request.retain_handling, sid)
            else:
                record = SubscriptionRecord(topic_filter, qos, request.no_local,
                                            request.retain_as_published,
                                            request.retain_handling, sid)
            is_new = broker.subscribe(session, record, persist=False)
            codes.append(qos)
            granted.append((record, is_new))
        return codes, granted

    def _acknowledge_subscribe(self, packet: Subscribe, codes, granted) -> None:
        if granted:
            self.broker.save_subscriptions(self.session)  # one record per packet
        self._output(Suback(packet.packet_id, tuple(codes)), durable=True)

    # a SUBSCRIBE of more filters than FILTERS_PER_TURN: a slice per reactor turn

    def _subscribe_in_slices(self, packet: Subscribe) -> None:
        """Handle ``packet`` :data:`FILTERS_PER_TURN` filters per reactor turn:
        checks and subscriptions, then (after its one SUBACK) the retained
        replays.  Nothing more is read from this connection meanwhile, so its
        later packets and their acknowledgements come after [MQTT-4.6.0-2];
        the other clients are served between the slices."""
        self._waiting += 1
        self.transport.pauseProducing()
        done = defer.ensureDeferred(self._subscribe_slices(packet))
        done.addErrback(self._slice_failed, packet)

    async def _subscribe_slices(self, packet: Subscribe) -> None:
        requests = packet.subscriptions
        codes, granted = [], []
        for start in range(0, len(requests), FILTERS_PER_TURN):
            if start:
                await self._next_turn()
            if self.state == _CLOSED:
                return
            part = requests[start:start + FILTERS_PER_TURN]
            answers, pending = self._subscribe_answers(part)
            if pending:
                answers = await self._hook_answers(answers)
                if self.state == _CLOSED:
                    return
            part_codes, part_granted = self._apply_subscriptions(packet, part, answers)
            codes += part_codes
            granted += part_granted
        self._mark = self.broker.write_count  # the packet's one store write is next
        self._acknowledge_subscribe(packet, codes, granted)
        if granted:
            replayed = defer.Deferred()
            self._output(lambda: self._subscribed_slices(granted, replayed, packet),
                         durable=False)
            await replayed
        if self.state == _CLOSED:
            return
        self._waiting -= 1
        self._resume_input()

    def _hook_answers(self, answers) -> defer.Deferred:
        """The hook answers of one slice, with the hook timeout of :meth:`_await`."""
        answered = defer.Deferred()
        self._await(self._gathered(answers), lambda answer: answered.callback(
            answer if isinstance(answer, list) else [HOOK_FAILED] * len(answers)),
            "authorize_subscribe")
        return answered

    def _next_turn(self) -> defer.Deferred:
        """Fires in the next reactor turn.  The client is not idle meanwhile: the
        broker is busy with its packet, so its keepalive is counted from now
        [MQTT-3.1.2-22] (as after a hook's answer, see :meth:`_resume_input`)."""
        self._last_received = self.clock.seconds()
        turn = defer.Deferred()
        self.clock.callLater(0, turn.callback, None)
        return turn

    def _subscribed_slices(self, granted, replayed: defer.Deferred, packet) -> None:
        def step(start):
            if self.state == _CLOSED:
                return
            try:
                self._subscribed(granted[start:start + FILTERS_PER_TURN])
            except Exception:
                return self._slice_failed(Failure(), packet)
            if start + FILTERS_PER_TURN < len(granted):
                self.clock.callLater(0, step, start + FILTERS_PER_TURN)
            else:
                replayed.callback(None)
        step(0)

    def _slice_failed(self, failure: Failure, packet) -> None:
        if self.state == _CLOSED:
            return
        if failure.check(MQTTError):
            self.fail(failure.value)
        else:
            log.failure("Handling {packet} from {client_id} ({peer}) failed; closing "
                        "its connection", failure, packet=type(packet).__name__,
                        client_id=self.client_id or "-", peer=self.peer)
            self._stats.protocol_errors += 1
            self.disconnect(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR,
                            log_reason="internal error")

    def _subscribed(self, granted) -> None:
        broker = self.broker
        session = self.session
        for record, is_new in granted:
            broker.emit("subscribed", topic=record.topic_filter, client=self.info)
            if record.topic_filter.startswith(topics.SHARE_PREFIX):
                continue  # no retained messages for a shared subscription [MQTT 5.0 §4.8.2]
            handling = record.retain_handling
            if handling == 0 or (handling == 1 and is_new):  # [MQTT-3.3.1-9, 3.3.1-10]
                broker.send_retained(session, record)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        if len(packet.topic_filters) > FILTERS_PER_TURN:
            self._waiting += 1  # later packets wait: their answers follow the UNSUBACK
            self.transport.pauseProducing()
            done = defer.ensureDeferred(self._unsubscribe_slices(packet))
            done.addErrback(self._slice_failed, packet)
            return
        codes, changed = self._unsubscribe_filters(packet.topic_filters)
        self._acknowledge_unsubscribe(packet, codes, changed)

    def _unsubscribe_filters(self, topic_filters) -> tuple:
        """Remove these subscriptions: ``(codes, changed)``, an UNSUBACK code per
        filter and whether one was removed."""
        broker = self.broker
        codes = []
        changed = False
        v5 = self.protocol_level == MQTT_5
        for topic_filter in topic_filters:
            try:
                topics.validate_topic_filter(topic_filter)
            except MQTTError as error:
                if not v5:  # [MQTT-4.8.0-1]
                    raise ProtocolError(f"UNSUBSCRIBE with an invalid topic filter: "
                                        f"{error.message}", spec="MQTT-4.8.0-1") from None
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            removed = broker.unsubscribe(self.session, topic_filter, persist=False)
            codes.append(0 if removed else ReasonCode.NO_SUBSCRIPTION_EXISTED)
            if removed:
                changed = True
                broker.emit("unsubscribed", topic=topic_filter, client=self.info)
        return codes, changed

    def _acknowledge_unsubscribe(self, packet: Unsubscribe, codes, changed: bool) -> None:
        if changed:
            self.broker.save_subscriptions(self.session)  # one record per packet
        reason_codes = tuple(codes) if self.protocol_level == MQTT_5 else ()
        self._output(Unsuback(packet.packet_id, reason_codes), durable=True)

    async def _unsubscribe_slices(self, packet: Unsubscribe) -> None:
        """An UNSUBSCRIBE of more than :data:`FILTERS_PER_TURN` filters, a slice
        per reactor turn (input held, see :meth:`_subscribe_in_slices`)."""
        filters = packet.topic_filters
        codes, changed = [], False
        for start in range(0, len(filters), FILTERS_PER_TURN):
            if start:
                await self._next_turn()
            if self.state == _CLOSED:
                return
            part_codes, part_changed = self._unsubscribe_filters(
                filters[start:start + FILTERS_PER_TURN])
            codes += part_codes
            changed = changed or part_changed
        self._mark = self.broker.write_count  # the packet's one store write is next
        self._acknowledge_unsubscribe(packet, codes, changed)
        self._waiting -= 1
        self._resume_input()

    # --- the rest -------------------------------------------------------------------------

    def _on_pingreq(self, packet: Pingreq) -> None:
        self._output(Pingresp(), durable=False)

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.session
        if self.protocol_level == MQTT_5:
            interval = packet.properties.session_expiry_interval
            if interval is not None:
                if not session.persistent and interval > 0:
                    raise ProtocolError("session expiry set on DISCONNECT after 0 on "
                                        "CONNECT", spec="MQTT-3.14.2-2")
                self.broker.session_expiry_changed(session, interval)
            # [MQTT-3.14.4-3]: the will is discarded unless reason 0x04
            self._will_on_close = packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL
        else:
            self._will_on_close = False  # [MQTT-3.14.4-3]
        self.state = _CLOSED
        self._online = False
        self._cancel_timers()
        self._lose_connection()
        self.broker.connection_lost(session, self, publish_will=self._will_on_close,
                                    reason="disconnect")



__all__ = ["ClientConnection"]
