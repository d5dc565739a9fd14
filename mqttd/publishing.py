"""PUBLISH from a client and the acknowledgements of both directions (layer L3).

:class:`Publishing` is one part of :class:`mqttd.connection.ClientConnection`
(a mixin with ``__slots__ = ()``): an inbound PUBLISH's checks (Maximum QoS,
Retain Available, topic aliases, $SYS, ``authorize_publish``), its QoS 1/2
acknowledgements, the Receive Maximum we announced [MQTT-3.3.4-7, 3.3.4-8],
holding a publisher back while its subscribers catch up, and the client's
PUBACK/PUBREC/PUBREL/PUBCOMP [MQTT-4.3, MQTT-4.8.0-1].
"""
from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd import topics
from mqttd.codec.encoder import PublishTemplate
from mqttd.codec.errors import MQTTError, ProtocolError, ReasonCode
from mqttd.codec.packets import MQTT_5, Puback, Pubcomp, Publish, Pubrec, Pubrel
from mqttd.connstate import _CLOSED, _CONNECTED
from mqttd.messages import Message, forwarded_properties
from mqttd.outbound import _InboundAck, template_key
from mqttd.persistence.records import OutboundStage
from mqttd.routing import INBOUND_PACKET_ID

__all__ = ["Publishing"]

#: the connection's log lines keep their namespace whichever module of
#: ClientConnection writes them (operators filter on it)
log = Logger(namespace="mqttd.connection")


class Publishing:
    """Inbound PUBLISH, its flows, and the client's acknowledgements."""

    __slots__ = ()

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
                # [MQTT-4.3.3-10] (a cluster may complete its hand-off, idempotently)
                self._output(Pubrec(pid), durable=broker.inbound_qos2_resent(
                    session, pid, message))
                return
            broker.inbound_qos2_add(session, pid)
            if broker.router is not None:
                if cache is None:
                    cache = {}
                cache[INBOUND_PACKET_ID] = pid
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
        self._block_input("held back for a congested subscriber")
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
        self._resume_input()  # unless a hook's answer or the rate limit still blocks

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
