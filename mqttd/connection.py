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
:class:`ClientConnection` is composed of one part per responsibility, each a
mixin with ``__slots__ = ()`` in its own module (the instance stays one slot
table): :class:`~mqttd.connecting.Connecting` (CONNECT, authentication, the
CONNACK), :class:`~mqttd.publishing.Publishing` (inbound PUBLISH and the
acknowledgements), :class:`~mqttd.subscribing.Subscribing` (SUBSCRIBE /
UNSUBSCRIBE), :class:`~mqttd.inflow.InputFlow` (awaited hooks, the inbound
rate limit, timers) and :class:`~mqttd.outbound.Outbound` (the output path).
This module keeps construction, input dispatch, warnings and closing; every
name importable from it before the split still is.
"""
from __future__ import annotations

from typing import Optional

from twisted.logger import Logger, formatEvent
from zope.interface import implementer

from mqttd.aliases import InboundAliases, OutboundAliases
from mqttd.broker import Broker, ClientInfo
from mqttd.codec.errors import MQTTError, ProtocolError, ReasonCode, UnsupportedProtocolVersion
from mqttd.codec.packets import (
    MQTT_3_1_1, MQTT_5, Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties,
    Puback, Pubcomp, Publish, Pubrec, Pubrel, Subscribe, Unsubscribe)
from mqttd.codec.reader import PacketReader
from mqttd.connecting import Connecting
from mqttd.connstate import _CLOSED, _CONNECTED, _CONNECTING, _peer_host
from mqttd.inflow import DECODE_SLICE, TURN_BUDGET, TURN_CHECK_MASK, InputFlow
from mqttd.interfaces import IClientConnection
from mqttd.outbound import Outbound
from mqttd.publishing import Publishing
from mqttd.subscribing import Subscribing
# the names importable from here before the connection was split into the
# modules above (features, tests and embedders import them from mqttd.connection)
from mqttd.connecting import BRIDGE_PROPERTY  # noqa: F401
from mqttd.outbound import (  # noqa: F401
    _ACK_FIRST_BYTE, _CONNACK_DEFAULTS, _OPTIONAL_PROPERTIES, _InboundAck, template_key)
from mqttd.subscribing import FILTERS_PER_TURN, _Refused  # noqa: F401

log = Logger(namespace="mqttd.connection")

_NO_HANDLERS: dict = {}
#: the packet classes by name, for ClientConnection._HANDLER_NAMES
_PACKETS = {cls.__name__: cls for cls in (
    Auth, Connect, Disconnect, Pingreq, Puback, Pubcomp, Publish, Pubrec, Pubrel, Subscribe,
    Unsubscribe)}


@implementer(IClientConnection)
class ClientConnection(Connecting, Publishing, Subscribing, InputFlow, Outbound):
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
        "_held", "_hold_call", "_waiting", "_bucket", "_rate_call", "_pending", "_stash", "_gate",
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
    #: set by the protocol: called once when the CONNECT packet arrives (the
    #: connection is no longer half-open, see mqttd.protocol.Admission)
    connect_received = None
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
            max_topic_filters=config.max_topic_filters_per_packet,
            max_user_properties=config.max_user_properties)
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
        #: input held while blocked (a HeldInput, see mqttd.inflow), or None
        self._gate = None
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
        if self._gate is not None or self._held or self._waiting or self._rate_call is not None:
            # input is blocked (or what was held is being handled): kept raw
            self._hold_input(data)
            return
        if len(data) > DECODE_SLICE:
            self._take_input(data)
            return
        # (the body of _decode, inline: this is the hot path)
        try:
            packets = self.reader.feed(data)
        except MQTTError as error:
            self._decode_failed(error)
            return
        if packets:
            # only complete packets count for keepalive [MQTT-3.1.2-22]: a
            # client trickling the bytes of an endless packet is still idle
            self._last_received = self.clock.seconds()
            if self._bucket is not None:  # --max-inbound-rate: charged packet by packet
                self._admit(packets)
            else:
                self._process(packets)

    def _take_input(self, data: bytes) -> None:
        """Decode and handle ``data`` slice by slice: when input blocks, the
        rest stays raw (held), so at most one slice's packets wait decoded.

        Called for reads longer than :data:`~mqttd.inflow.DECODE_SLICE` and
        for held input being handled (any size: one slice, no clock read)."""
        end = len(data)
        if end <= DECODE_SLICE:
            self._decode(data)
            return
        started = self.clock.seconds()
        for start in range(0, end, DECODE_SLICE):
            self._decode(data[start:start + DECODE_SLICE])
            if self.state == _CLOSED:
                return
            rest = start + DECODE_SLICE
            if rest >= end:
                return
            if not (self._held or self._waiting or self._rate_call is not None) and \
                    self.clock.seconds() - started >= TURN_BUDGET:
                self._yield_turn()   # this read had its share of the turn (REVIEW-S9 R8)
            if self._held or self._waiting or self._rate_call is not None:
                self._hold_input(data[rest:], first=True)
                return

    def _decode_failed(self, error: MQTTError) -> None:
        # the packets before the bad one are handled first, as they would
        # be had they arrived in an earlier chunk
        before, error.decoded_before = error.decoded_before, []
        if before:
            self._last_received = self.clock.seconds()
            if self._bucket is not None:
                self._admit(before)
            else:
                self._process(before)
        self.fail(error)

    def _decode(self, data: bytes) -> None:
        """Decode ``data`` and handle its packets (a slice of a long read, or
        held input being handled)."""
        try:
            packets = self.reader.feed(data)
        except MQTTError as error:
            self._decode_failed(error)
            return
        if packets:
            # only complete packets count for keepalive [MQTT-3.1.2-22]: a
            # client trickling the bytes of an endless packet is still idle
            self._last_received = self.clock.seconds()
            if self._bucket is not None:  # --max-inbound-rate: charged packet by packet
                self._admit(packets)
            else:
                self._process(packets)

    def _process(self, packets) -> None:
        """Handle ``packets`` in order until input blocks; a long run of costly
        packets yields the reactor after :data:`~mqttd.inflow.TURN_BUDGET`
        seconds (REVIEW-S9 R8)."""
        broker = self.broker
        # the turn budget's clock starts with the first packet (one read of
        # the clock per list of two or more packets; a single packet is never
        # cut short)
        started = self.clock.seconds() if len(packets) > 1 else 0.0
        # a connection still logging in may take its inbound bucket in this
        # list (checked per packet only then: the hot path stays as it was)
        unmetered = self.state == _CONNECTING and self._bucket is None
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
            if unmetered and self._bucket is not None:
                # the connection just took its host's inbound bucket (CONNECT,
                # or the AUTH that completed it): the packets read together
                # with it are charged like any later ones, or a client
                # pipelining CONNECT + PUBLISHes escapes the limit (REVIEW-S10 S1)
                if index + 1 < len(packets):
                    self._admit(list(packets[index + 1:]))
                return
            if (index & TURN_CHECK_MASK == TURN_CHECK_MASK or index & (index + 1) == 0) \
                    and index + 1 < len(packets):
                # after packets 1, 2, 4, 8, 16 and then every 16: has this read
                # had its share of the reactor turn?  (So a few costly packets
                # are cut short too: checking only every 16th let 16 packets of
                # 15 ms each hold the reactor for 240 ms, REVIEW-S10 S8)
                if self.clock.seconds() - started >= TURN_BUDGET:
                    self._stash = packets[index + 1:]
                    self._yield_turn()   # the rest next turn, after the others
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


    # --- closing --------------------------------------------------------------------

    def disconnect(self, reason_code: int = ReasonCode.NORMAL_DISCONNECTION,
                   reason_string: Optional[str] = None,
                   log_reason: Optional[str] = None) -> None:
        """Close from the server side; MQTT 5 clients get a DISCONNECT first.

        Before the CONNACK is on the wire (it waits for the store, or a
        cluster claim) the client is refused with CONNACK 0x88 Server
        unavailable (v3: 0x03) instead: the first packet a server sends is a
        CONNACK and no DISCONNECT precedes it [MQTT-3.2.0-1, MQTT-3.14.0-1]
        (e.g. the loser of two simultaneous CONNECTs on two cluster nodes)."""
        if self.state == _CLOSED:
            return
        if self.state == _CONNECTED and not self._online:
            self._pending = ()      # the success CONNACK never goes out
            self._will_on_close = False     # it never connected
            self._refuse(ReasonCode.SERVER_UNAVAILABLE, reason_string or
                         f"closed by the server before its CONNACK (reason "
                         f"0x{reason_code:02X})", spec="MQTT-3.14.0-1")
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
        if self._bucket is not None:
            self._leave_turns()
        if self._gate is not None or self._stash:
            self._settle_held_input()   # (before the reader is released)
            self._report_dropped()
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
            self._leave_turns()
            if self._will_on_close and self.session is not None and \
                    self.session.connection is self:
                if self._gate is not None or self._stash:
                    self._settle_held_input()   # a held DISCONNECT decides first
                if self._will_on_close and not self._will_affordable():
                    self._will_on_close = False
            self.broker.inbound_buckets.release(self.client_id, self._bucket,
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
        if self._will_on_close and self._bucket is not None and not self._will_affordable():
            self._will_on_close = False   # over the inbound rate (REVIEW-S9 R14)
        self.state = _CLOSED
        self._online = False
        self._cancel_timers()
        self._lose_connection()
        self.broker.connection_lost(session, self, publish_will=self._will_on_close,
                                    reason="disconnect")


__all__ = ["ClientConnection"]
