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
from typing import Optional

from twisted.logger import Logger
from zope.interface import implementer

from mqttd import topics
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
from mqttd.interfaces import IClientConnection
from mqttd.messages import Message
from mqttd.persistence.records import SubscriptionRecord

log = Logger(namespace="mqttd.connection")

_CONNECTING, _CONNECTED, _CLOSED = "connecting", "connected", "closed"
_ACK_FIRST_BYTE = {Puback: 0x40, Pubrec: 0x50, Pubrel: 0x62, Pubcomp: 0x70}


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

    def __init__(self, broker: Broker, transport, clock, peer: Optional[str] = None):
        self.broker = broker
        self.transport = transport
        self.clock = clock
        self.peer = peer
        config = broker.config
        self.reader = PacketReader(level=None, max_packet_size=config.max_packet_size)
        self.state = _CONNECTING
        self.client_id: Optional[str] = None
        self.protocol_level: Optional[int] = None
        self.session = None
        self.info: Optional[ClientInfo] = None
        #: a listener that authenticates clients itself (a TLS listener with
        #: ``identityAsUsername=yes``, mosquitto's ``use_identity_as_username``)
        #: sets this to a callable ``() -> Optional[str]``, asked at CONNECT:
        #: its answer replaces the CONNECT's username (the password is not
        #: checked: the certificate is the credential); None refuses the
        #: CONNECT with 0x87 Not authorized (v3: 0x05).
        self.transport_identity = None
        #: called once before the connection closes its transport (the Twisted
        #: shim unregisters its push producer here, see _lose_connection)
        self.release_transport = None
        #: outbound QoS 1/2 window: min(broker limit, client's Receive Maximum)
        self.send_window = min(config.max_inflight, 65535)  # packet ids [MQTT-2.2.1-3]
        self._client_max_packet = None
        self._online = False
        self._paused = False
        self._will_on_close = True
        self._pending = collections.deque()
        #: the broker's write count when the current packet's handling began
        self._mark = 0
        self._close_reason = "connection lost"
        self._held = False
        self._hold_call = None
        self._stash = ()
        self._keepalive = 0.0
        self._keepalive_call = None
        self._last_received = clock.seconds()
        self._connect_call = clock.callLater(config.connect_timeout, self._connect_timeout)
        self._handlers = {Connect: self._on_connect}
        self._stats = broker.stats

    # --- input -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self._last_received = self.clock.seconds()
        self._stats.bytes_received += len(data)
        try:
            packets = self.reader.feed(data)
        except MQTTError as error:
            self.fail(error)
            return
        if self._held:  # a transport may still deliver what it had already read
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
                    handler(packet)
            except MQTTError as error:
                self.fail(error)
                return
            if self._held:
                # held back by a congested subscriber: what was already read
                # waits too, so the pause takes effect at once
                self._stash = packets[index + 1:]
                return

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
        self._stats.bytes_sent += len(data)
        self.transport.write(data)

    def cached_template(self, message: Message, qos: int, cache: dict):
        """The PUBLISH bytes already made for this connection's form, or None."""
        return cache.get(template_key(message, self.protocol_level, qos))

    def send_publish(self, message: Message, qos: int, packet_id, dup: bool,
                     cache: Optional[dict] = None, template=None) -> None:
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
            # [MQTT-3.1.2-25]: never send more than the client's Maximum Packet Size
            if self.session is not None:
                self.broker.count_dropped(self.session, "client-maximum-packet-size", message)
                if packet_id is not None:
                    self.clock.callLater(0, self._discard_inflight, packet_id)
            return
        stats = self._stats
        stats.messages_sent += 1
        stats.bytes_sent += len(data)
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
        barrier = self.broker.barrier(self._mark) if durable else None
        if barrier is None and not self._pending:
            self._emit(item)
            return
        self._pending.append((barrier, item))
        if barrier is not None:
            barrier.addCallbacks(self._flush_pending, self._store_failed)

    def _flush_pending(self, result=None):
        pending = self._pending
        while pending:
            barrier, item = pending[0]
            if barrier is not None and not barrier.called:
                break
            pending.popleft()
            if self.state != _CLOSED:
                self._emit(item)
        return result

    def _emit(self, item) -> None:
        if item.__class__ is bytes:
            self._stats.bytes_sent += len(item)
            self.transport.write(item)
        elif callable(item):
            item()
        else:
            self.send(item)

    def _store_failed(self, failure):
        log.failure("Store write failed; disconnecting {client_id} without acknowledging",
                    failure, client_id=self.client_id)
        self._pending.clear()
        self.disconnect(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "storage failure")
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
        self._lose_connection()

    def fail(self, error: MQTTError) -> None:
        """Answer a protocol error as the spec says, log it, close."""
        if self.state == _CLOSED:
            return
        self._stats.protocol_errors += 1
        log.warn("Closing connection of {client_id} from {peer}: {error} "
                 "(reason 0x{reason_code:02X})", client_id=self.client_id or "-",
                 peer=self.peer, error=str(error), reason_code=error.reason_code,
                 spec=error.spec)
        if self.state == _CONNECTING:
            if isinstance(error, UnsupportedProtocolVersion):
                if error.protocol_level == MQTT_5:
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
        self.state = _CLOSED
        self._online = False
        self._cancel_timers()
        self._pending.clear()
        session = self.session
        if session is not None:
            self.broker.connection_lost(session, self, publish_will=self._will_on_close,
                                        reason=self._close_reason)

    def _cancel_timers(self) -> None:
        for call in (self._connect_call, self._keepalive_call, self._hold_call):
            if call is not None and call.active():
                call.cancel()
        self._connect_call = self._keepalive_call = self._hold_call = None

    def _connect_timeout(self) -> None:
        self._connect_call = None
        log.warn("No CONNECT from {peer} within {timeout} s; closing",
                 peer=self.peer, timeout=self.broker.config.connect_timeout)
        self._close("connect timeout")

    def _check_keepalive(self) -> None:
        self._keepalive_call = None
        if self.state == _CLOSED:
            return
        idle = self.clock.seconds() - self._last_received
        if idle >= self._keepalive:
            # [MQTT-3.1.2-24]: close after 1.5 keepalive periods of silence
            log.warn("Keepalive of {client_id} expired after {idle:.1f} s; closing",
                     client_id=self.client_id, idle=idle)
            self.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, log_reason="keepalive timeout")
            return
        self._keepalive_call = self.clock.callLater(self._keepalive - idle,
                                                    self._check_keepalive)

    # --- CONNECT --------------------------------------------------------------------

    def _refuse(self, reason_code: int, why: str, spec: Optional[str] = None) -> None:
        log.warn("Refusing CONNECT of {client_id} from {peer}: {why} "
                 "(reason 0x{reason_code:02X})", client_id=self.client_id or "-",
                 peer=self.peer, why=why, reason_code=reason_code, spec=spec)
        if self.protocol_level == MQTT_5:
            code = reason_code
        else:
            code = V5_TO_V3_CONNACK.get(reason_code, 0x03)
        self.send(Connack(False, code))
        self._close(f"CONNECT refused: {why}")

    def _on_connect(self, packet: Connect) -> None:
        if self._connect_call is not None and self._connect_call.active():
            self._connect_call.cancel()
        self._connect_call = None
        broker = self.broker
        config = broker.config
        level = self.protocol_level = packet.protocol_level
        props = packet.properties
        client_id = packet.client_id
        self.client_id = client_id or None
        if level == MQTT_5:
            if props.authentication_method is not None:
                return self._refuse(ReasonCode.BAD_AUTHENTICATION_METHOD,
                                    "enhanced authentication is not supported")
            if props.receive_maximum:
                self.send_window = min(self.send_window, props.receive_maximum)
            if props.maximum_packet_size:
                self._client_max_packet = props.maximum_packet_size
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
        will = packet.will
        if will is not None:
            try:
                topics.validate_topic_name(will.topic)
            except MQTTError as error:
                return self._refuse(ReasonCode.TOPIC_NAME_INVALID,
                                    f"will topic: {error.message}", spec="MQTT-3.1.3-11")
        username = packet.username
        if self.transport_identity is not None:
            username = self.transport_identity()
            if username is None:
                return self._refuse(ReasonCode.NOT_AUTHORIZED,
                                    "no client certificate identity on a listener that "
                                    "uses it as the username")
        elif broker.authenticator is not None:
            code = broker.authenticator.authenticate(packet)
            if code:
                return self._refuse(code, "authentication failed")
        if level == MQTT_5:
            expiry = props.session_expiry_interval or 0
            if config.max_session_expiry is not None and expiry > config.max_session_expiry:
                expiry = config.max_session_expiry
        else:
            expiry = 0 if packet.clean_start else None
        keepalive = packet.keepalive
        server_keepalive = None
        if config.max_keepalive and (keepalive == 0 or keepalive > config.max_keepalive):
            keepalive = config.max_keepalive
            if level == MQTT_5:
                server_keepalive = keepalive
        session, present = broker.open_session(
            self, client_id, level, packet.clean_start, expiry, will)
        self.session = session
        self.state = _CONNECTED
        self._handlers = self._connected_handlers()
        if keepalive:
            self._keepalive = keepalive * 1.5
            self._keepalive_call = self.clock.callLater(self._keepalive,
                                                        self._check_keepalive)
        self.info = ClientInfo(client_id, level, username, self.peer,
                               packet.clean_start, packet.keepalive, present)
        if level == MQTT_5:
            ack_props = Properties(
                assigned_client_identifier=assigned,
                server_keep_alive=server_keepalive,
                maximum_packet_size=config.max_packet_size,
                topic_alias_maximum=None,            # 0: no topic aliases yet
                subscription_identifier_available=0,
                shared_subscription_available=0,
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

    def _connected_handlers(self) -> dict:
        return {
            Publish: self._on_publish,
            Puback: self._on_puback,
            Pubrec: self._on_pubrec,
            Pubrel: self._on_pubrel,
            Pubcomp: self._on_pubcomp,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
            Pingreq: self._on_pingreq,
            Disconnect: self._on_disconnect,
            Auth: self._on_auth,
        }

    # --- PUBLISH and its flows ---------------------------------------------------------

    def _on_publish(self, packet: Publish) -> None:
        qos = packet.qos
        props = packet.properties
        level = self.protocol_level
        if level == MQTT_5:
            if props.topic_alias is not None:
                # we announce Topic Alias Maximum 0 [MQTT-3.3.2-8]
                raise MQTTError("topic alias sent but none allowed",
                                ReasonCode.TOPIC_ALIAS_INVALID, spec="MQTT-3.3.2-8")
            if props.subscription_identifiers:
                raise ProtocolError("PUBLISH from a client carries a subscription "
                                    "identifier", spec="MQTT-3.3.4-6")
        topic = packet.topic
        if topic.startswith("$SYS"):
            log.warn("Refused PUBLISH of {client_id} to {topic}: clients cannot "
                     "publish into $SYS", client_id=self.client_id, topic=topic)
            return self._ack_refused(packet, ReasonCode.NOT_AUTHORIZED)
        authorizer = self.broker.authorizer
        if authorizer is not None and not authorizer.may_publish(
                self.client_id, self.info.username, topic):
            log.warn("Refused PUBLISH of {client_id} to {topic}: not authorized",
                     client_id=self.client_id, topic=topic)
            return self._ack_refused(packet, ReasonCode.NOT_AUTHORIZED)
        expiry = props.message_expiry_interval
        message = Message(topic, packet.payload, qos, packet.retain, props,
                          self.client_id,
                          None if expiry is None else self.clock.seconds() + expiry)
        # the bytes as received serve every subscriber of the same protocol
        # family at the same QoS: no re-encoding
        raw = packet.raw
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
            if receivers or level != MQTT_5:
                # PUBACK as bytes: the most frequent packet the broker sends
                self._output(bytes((0x40, 2, pid >> 8, pid & 0xFF)), durable=True)
            else:
                self._output(Puback(pid, ReasonCode.NO_MATCHING_SUBSCRIBERS), durable=True)
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
        self._last_received = self.clock.seconds()  # we were not reading
        stash, self._stash = self._stash, ()
        if stash:
            self._process(stash)
        if not self._held and self.state != _CLOSED:
            self.transport.resumeProducing()

    def _ack_refused(self, packet: Publish, code: int) -> None:
        if packet.qos == 1:
            self._output(Puback(packet.packet_id, code), durable=False)
        elif packet.qos == 2:
            self._output(Pubrec(packet.packet_id, code), durable=False)

    def _on_puback(self, packet: Puback) -> None:
        if not self.broker.puback(self.session, packet.packet_id):
            log.debug("PUBACK for unknown packet id {packet_id} from {client_id}",
                      packet_id=packet.packet_id, client_id=self.client_id)

    def _on_pubrec(self, packet: Pubrec) -> None:
        failed = self.protocol_level == MQTT_5 and packet.reason_code >= 0x80
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
            log.debug("PUBCOMP for unknown packet id {packet_id} from {client_id}",
                      packet_id=packet.packet_id, client_id=self.client_id)

    # --- SUBSCRIBE / UNSUBSCRIBE ----------------------------------------------------------

    def _on_subscribe(self, packet: Subscribe) -> None:
        v5 = self.protocol_level == MQTT_5
        if v5 and packet.properties.subscription_identifiers:
            # we announce Subscription Identifier Available = 0
            raise MQTTError("subscription identifiers are not supported",
                            ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                            spec="MQTT 5.0 §3.2.2.3.12")
        broker = self.broker
        session = self.session
        authorizer = broker.authorizer
        codes = []
        granted = []
        for request in packet.subscriptions:
            topic_filter = request.topic_filter
            try:
                topics.validate_topic_filter(topic_filter)
            except MQTTError as error:
                log.warn("Refused subscription of {client_id} to {filter!r}: {error}",
                         client_id=self.client_id, filter=topic_filter, error=str(error))
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80)
                continue
            if topics.parse_shared(topic_filter)[0] is not None:
                codes.append(ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED if v5 else 0x80)
                continue
            if authorizer is not None and not authorizer.may_subscribe(
                    self.client_id, self.info.username, topic_filter):
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)
                continue
            record = SubscriptionRecord(topic_filter, request.qos, request.no_local,
                                        request.retain_as_published,
                                        request.retain_handling)
            is_new = broker.subscribe(session, record)
            codes.append(request.qos)
            granted.append((record, is_new))
        self._output(Suback(packet.packet_id, tuple(codes)), durable=True)
        if granted:
            self._output(lambda: self._subscribed(granted), durable=False)

    def _subscribed(self, granted) -> None:
        broker = self.broker
        session = self.session
        for record, is_new in granted:
            broker.emit("subscribed", topic=record.topic_filter, client=self.info)
            handling = record.retain_handling
            if handling == 0 or (handling == 1 and is_new):  # [MQTT-3.3.1-9, 3.3.1-10]
                broker.send_retained(session, record)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        broker = self.broker
        codes = []
        for topic_filter in packet.topic_filters:
            removed = broker.unsubscribe(self.session, topic_filter)
            codes.append(0 if removed else ReasonCode.NO_SUBSCRIPTION_EXISTED)
            if removed:
                broker.emit("unsubscribed", topic=topic_filter, client=self.info)
        reason_codes = tuple(codes) if self.protocol_level == MQTT_5 else ()
        self._output(Unsuback(packet.packet_id, reason_codes), durable=True)

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

    def _on_auth(self, packet: Auth) -> None:
        raise ProtocolError("AUTH without enhanced authentication", spec="MQTT-4.12.0-1")


__all__ = ["ClientConnection"]
