"""The output path of a client connection (layer L3).

:class:`Outbound` is one part of :class:`mqttd.connection.ClientConnection`
(a mixin with ``__slots__ = ()``; its state is set up in
``ClientConnection.__init__``): encoding a packet within the client's Maximum
Packet Size [MQTT-3.1.2-24, 3.1.2-25], the PUBLISH bytes (shared fan-out
templates, topic aliases [MQTT-3.3.2-11]), output that waits behind a store
barrier so acknowledgements keep their order [MQTT-4.6.0-2], what happens when
the store cannot write, and the transport's push-producer pause/resume.
"""
from __future__ import annotations

import collections
import errno
from typing import Optional

import attrs
from twisted.logger import Logger

from mqttd.codec import encode, publish_template
from mqttd.codec.errors import ReasonCode
from mqttd.codec.packets import (
    MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Connack, Disconnect, Puback, Pubcomp, Pubrec, Pubrel)
from mqttd.connstate import _CLOSED, _CONNECTED
from mqttd.messages import SYS_ORIGIN, Message
from mqttd.topics import CACHED_NAME_LIMIT

__all__ = ["Outbound", "template_key"]

#: the connection's log lines keep their namespace whichever module of
#: ClientConnection writes them (operators filter on it)
log = Logger(namespace="mqttd.connection")

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


class _InboundAck:
    """A PUBACK (as bytes) that ends one inbound QoS 1 flow of a v5 client: its
    emission frees a place of the server's Receive Maximum [MQTT-3.3.4-8]."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def template_key(message: Message, level: int, qos: int) -> tuple:
    """Key of a message's PUBLISH bytes in a fan-out cache (levels 3 and 4 share a form)."""
    return (id(message), 5 if level == MQTT_5 else 4, qos)


class Outbound:
    """Packets and bytes to the client: encode, fit, order behind the store."""

    __slots__ = ()

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

    def send_publish_stored(self, message: Message, qos: int, packet_id: int,
                            cache: Optional[dict] = None, template=None) -> None:
        """:meth:`send_publish` once the broker's store made what was written
        for it durable (the message's record with ``packet_id``), in order
        with this connection's acknowledgements waiting for the store (see
        ``Delivery.qos2_sent_after_store``); never if the connection closes
        first (the record is resent with DUP on resume [MQTT-4.4.0-1])."""
        self._output(lambda: self.send_publish(message, qos, packet_id, False, cache,
                                               template), durable=True)

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
        if len(topic) > CACHED_NAME_LIMIT:
            # a long name is sent whole: an alias saves little on it, and the
            # table would keep up to 65,535 names of 64 KiB (REVIEW-S10 S14)
            alias, known, props = None, False, message.properties
        else:
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
        if alias is not None:
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
