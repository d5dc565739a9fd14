"""One running bridge: a persistent internal session here, an MQTT client there.

The local end is a session of the broker like any client's, registered under
``local_clientid`` but attached to a :class:`LocalEnd` instead of a TCP
connection.  It subscribes to the ``out``/``both`` topics with No Local and
Retain As Published, so:

- while the remote is unreachable the session is *offline*: QoS 1/2 messages
  for the remote queue in it, in the broker's store, within the broker's
  queue limits (``max_queued_messages`` / ``max_queued_bytes``, counted drops);
- once the remote accepts CONNECT the session goes online: in-flight messages
  are re-sent with DUP and the *same packet ids* (the session's ids are the
  ids on the remote link), then the queue drains within ``bridge_max_inflight``
  (and the remote's Receive Maximum).  A message leaves the store only when
  the remote acknowledged it (PUBACK / PUBCOMP), so QoS 1/2 survive a restart
  of either broker and a kill -9 of this one.

Messages from the remote (``in``/``both``) are published here with the
session's client id as origin (so its own ``out`` subscriptions skip them:
No Local) and acknowledged to the remote only once the store has them; QoS 2
packet ids are kept in the session (exactly once across reconnects).
"""
from __future__ import annotations

import collections
from typing import Optional

import attrs
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mqttd.broker import ClientInfo
from mqttd.client import ClientOptions, MQTTClientFactory
from mqttd.codec import encode
from mqttd.connection import BRIDGE_PROPERTY
from mqttd.codec.packets import (
    MQTT_5, NO_PROPERTIES, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
    Subscribe, Subscription, Unsubscribe, Will)
from mqttd.interfaces import IClientConnection
from mqttd.messages import Message, forwarded_properties, remaining_interval
from mqttd.persistence.records import SubscriptionRecord

log = Logger(namespace="mqttd.bridge")

#: CONNACK codes meaning "I do not speak that protocol level" (v3: 1, v5: 0x84)
_BAD_LEVEL = (0x01, 0x84)


@attrs.define
class BridgeStats:
    """Counters of one bridge (read by $SYS and the Prometheus collector).

    ``queued`` is live: messages waiting for the remote (queue + in flight).
    """

    name: str
    connected: bool = False
    #: messages received from the remote and published here
    messages_in: int = 0
    #: messages sent to the remote (re-sends with DUP not counted)
    messages_out: int = 0
    #: messages from the remote that matched no ``in`` topic line
    unmapped: int = 0
    #: messages the remote refused (MQTT 5 PUBACK/PUBREC reason >= 0x80): not retried
    refused: int = 0
    #: messages larger than the remote's Maximum Packet Size (MQTT 5): dropped
    too_large: int = 0
    #: connection attempts that ended (refused, lost, failed)
    reconnects: int = 0
    last_error: str = ""
    connected_since: Optional[float] = None
    _session_queued: object = attrs.field(default=None, repr=False)

    @property
    def queued(self) -> int:
        return self._session_queued() if self._session_queued is not None else 0


@implementer(IClientConnection)
class LocalEnd:
    """The bridge session's "connection": hands what the broker sends to the remote."""

    def __init__(self, bridge: "Bridge"):
        self.bridge = bridge
        self.client_id = bridge.config.local_clientid
        self.protocol_level = MQTT_5
        self.send_window = bridge.config.max_inflight
        self.info = ClientInfo(self.client_id, MQTT_5, None, "bridge:" + bridge.config.connection,
                               False, 0, True, bridge=True)

    def writable(self) -> bool:
        remote = self.bridge.remote
        return remote is not None and remote.writable()

    def cached_template(self, message, qos, cache):
        return None  # the remote topic differs: nothing to share with clients

    def send_publish(self, message: Message, qos: int, packet_id, dup: bool,
                     cache=None, template=None) -> None:
        self.bridge.send_to_remote(message, qos, packet_id, dup)

    def send(self, packet) -> None:
        remote = self.bridge.remote
        if remote is not None:
            remote.send(packet)   # PUBREL on a session resume

    def disconnect(self, reason_code: int = 0, reason_string=None) -> None:
        if reason_code == 0x8E:   # session taken over: someone used our client id
            log.error("Bridge {name}: a client connected with the bridge's local client "
                      "id {client_id} and took its session over",
                      name=self.bridge.config.connection, client_id=self.client_id)
        self.bridge.local_detached()

    def release_publisher(self) -> None:
        pass


class Bridge(Service):
    """One ``[[bridge]]``: a ClientService to the remote and the local session.

    :param broker: the local :class:`~mqttd.broker.Broker`.
    :param reactor: ``IReactorTime`` + the endpoint's reactor.
    :param endpoint: the ``IStreamClientEndpoint`` to the remote (failover
        included, see :class:`mqttd.bridge.service.FailoverEndpoint`).
    """

    #: seconds between probes of the primary address while connected to a
    #: secondary (``round_robin false``; mosquitto probes every 5 s); doubled
    #: after each move back that did not hold, up to :attr:`primary_retry_max`
    primary_retry = 5.0
    primary_retry_max = 300.0

    def __init__(self, config, broker, reactor, endpoint):
        self.config = config
        self.name = config.connection
        self.broker = broker
        self.reactor = reactor
        self.remote = None               # the MQTTClientProtocol while connected
        self.session = None
        self.stats = BridgeStats(config.connection)
        self.stats._session_queued = self._queued
        self.policy = config.restart_policy()
        self._private = config.try_private and config.protocol_level != MQTT_5
        self._local = LocalEnd(self)
        self._out = [t for t in config.topics if t.outgoing]
        self._in = [t for t in config.topics if t.incoming]
        self._acks = collections.deque()
        #: the remote is an mqttd that takes the broker's private user properties
        self._mesh_peer = False
        #: local topic -> remote topic (bounded cache of the topic-line mapping)
        self._remote_names = {}
        self._warned = {}
        self._endpoint = endpoint
        self._probe_call = None
        self._probe_interval = self.primary_retry
        #: a move back to the primary is under way (reconnect at once)
        self._moving_back = False
        #: the last move back ended on a secondary again (probe less often)
        self._moved_back = False
        self._service = ClientService(endpoint, MQTTClientFactory(self._options, self, reactor),
                                      retryPolicy=self._retry_delay, clock=reactor)
        # the local session is internal: no network client may claim it, take
        # it over (knocking the bridge off) or read what waits for the remote
        self._release_client_id = broker.reserve_client_id(
            config.local_clientid, f"bridge {config.connection}")

    # --- lifecycle ---------------------------------------------------------------

    def startService(self):
        super().startService()
        self._open_local_session()
        self._notify_local(False)
        log.info("Bridge {name}: connecting to {addresses} as {client_id}",
                 name=self.name, client_id=self.config.remote_clientid,
                 addresses=" ".join(f"{h}:{p}" for h, p in self.config.addresses))
        self._service.startService()

    def stopService(self):
        super().stopService()
        self._cancel_probe()
        remote = self.remote
        if remote is not None:
            if self.config.notifications and not self.config.notifications_local_only:
                self._publish_remote_state(remote, b"0")
            remote.disconnect()
        d = self._service.stopService()
        self._detach()
        return d

    def disownServiceParent(self):
        """Removed (SIGHUP reload): stop, and give the local client id back."""
        d = super().disownServiceParent()
        self._release_client_id()
        return d

    def _queued(self) -> int:
        session = self.broker.sessions.get(self.config.local_clientid)
        if session is None:
            return 0
        return len(session.queue) + len(session.inflight)

    def _retry_delay(self, attempt: int) -> float:
        if self._moving_back:
            return 0.0     # left a secondary on purpose: the primary answers now
        return self.policy(attempt)

    # --- back to the primary address (round_robin false) ----------------------------

    def _schedule_probe(self) -> None:
        endpoint = self._endpoint
        if (self.config.round_robin or not getattr(endpoint, "on_secondary", False)
                or self._probe_call is not None):
            return
        self._probe_call = self.reactor.callLater(self._probe_interval, self._probe)

    def _cancel_probe(self) -> None:
        call, self._probe_call = self._probe_call, None
        if call is not None and call.active():
            call.cancel()

    def _probe(self) -> None:
        self._probe_call = None
        if self.remote is None or not self.running:
            return
        self._endpoint.probe_primary(self.reactor).addCallback(self._probed)

    def _probed(self, answered: bool) -> None:
        remote = self.remote
        if remote is None or not self.running:
            return
        if not answered:
            self._schedule_probe()
            return
        host, port = self.config.addresses[0]
        log.info("Bridge {name}: the primary address {address} answers again; leaving "
                 "{peer} for it", name=self.name, address=f"{host}:{port}",
                 peer=_peer(remote))
        self._endpoint.index = 0
        self._moving_back = True
        if self.config.notifications and not self.config.notifications_local_only:
            self._publish_remote_state(remote, b"0")
        remote.disconnect()

    def _options(self) -> ClientOptions:
        config = self.config
        level = config.protocol_level
        will = None
        if config.notifications and not config.notifications_local_only:
            will = Will(config.notification_topic, b"0", 1, True)
        props = NO_PROPERTIES
        if level == MQTT_5:
            props = Properties(
                session_expiry_interval=0 if config.cleansession else 0xFFFFFFFF,
                receive_maximum=min(65535, max(config.max_inflight, 1)),
                # the remote must not send more [MQTT-3.1.2-25]
                maximum_packet_size=self.broker.config.max_packet_size,
                # the MQTT 5 stand-in for the bridge bit (see mqttd.connection)
                user_properties=((BRIDGE_PROPERTY, self.broker.config.broker_id),))
        password = config.remote_password
        return ClientOptions(
            client_id=config.remote_clientid, protocol_level=level,
            clean_start=config.cleansession, keepalive=config.keepalive_interval,
            username=config.remote_username,
            password=password.encode("utf-8") if password is not None else None,
            will=will, properties=props, bridge=self._private,
            # v3 remotes cannot be told a limit: take what they send (256 MiB cap)
            **({"max_packet_size": self.broker.config.max_packet_size}
               if level == MQTT_5 else {}),
            connect_timeout=max(10.0, float(config.keepalive_interval)))

    # --- the local session ---------------------------------------------------------

    def _open_local_session(self) -> None:
        """Create (or find the restored) session and its ``out`` subscriptions,
        offline until the remote accepts us (a clean one ends at once: with
        ``local_cleansession true`` nothing waits for the remote)."""
        self._attach_local()
        self.broker.connection_lost(self.session, self._local, publish_will=False,
                                    reason="bridge offline")

    def _attach_local(self):
        """Attach the local end to the bridge session; make its subscriptions match."""
        broker = self.broker
        config = self.config
        expiry = 0 if config.local_cleansession else None
        session, _present = broker.open_session(
            self._local, config.local_clientid, MQTT_5, config.local_cleansession, expiry, None)
        self.session = session
        wanted = {}
        for topic in self._out:
            prev = wanted.get(topic.local_filter)
            if prev is None or topic.qos > prev:
                wanted[topic.local_filter] = topic.qos
        for topic_filter in list(session.subscriptions):
            if topic_filter not in wanted:
                broker.unsubscribe(session, topic_filter)   # removed from the config
        for topic_filter, qos in wanted.items():
            old = session.subscriptions.get(topic_filter)
            record = SubscriptionRecord(topic_filter, qos, True, True, 1)
            if old != record:
                is_new = broker.subscribe(session, record)
                if is_new:
                    # local retained messages go to the remote once, like a new
                    # subscriber's (Retain Handling 1)
                    broker.send_retained(session, record)
        return session

    def local_detached(self) -> None:
        """The broker dropped the local end (shutdown or takeover): close the remote."""
        remote = self.remote
        if remote is not None:
            remote.disconnect()

    def _detach(self) -> None:
        session = self.session
        if session is not None and session.connection is self._local:
            self.broker.connection_lost(session, self._local, publish_will=False,
                                        reason="bridge offline")

    # --- handler calls from MQTTClientProtocol ---------------------------------------

    def mqtt_connected(self, protocol, connack) -> None:
        config = self.config
        self.remote = protocol
        # an mqttd remote answers the CONNECT's mqttd-bridge with its own: only
        # then do the mesh guard's stamps travel (anyone else would hand them
        # to its subscribers)
        self._mesh_peer = protocol.level == MQTT_5 and any(
            name == BRIDGE_PROPERTY for name, _value in connack.properties.user_properties)
        moved_back, self._moving_back = self._moving_back, False
        if getattr(self._endpoint, "on_secondary", False):
            if moved_back:   # the primary answered the probe but not as a broker
                self._probe_interval = min(self._probe_interval * 2, self.primary_retry_max)
            self._schedule_probe()
        else:
            self._probe_interval = self.primary_retry
        self.policy.reset()
        stats = self.stats
        stats.connected = True
        stats.connected_since = self.reactor.seconds()
        stats.last_error = ""
        self._local.send_window = min(config.max_inflight, protocol.send_window)
        log.info("Bridge {name}: connected to {peer} (MQTT level {protocol_level}{private}, "
                 "remote session present: {present})", name=self.name,
                 peer=_peer(protocol), protocol_level=protocol.level,
                 private=", bridge bit" if protocol.options.bridge else "",
                 present=bool(connack.session_present))
        self._subscribe_remote(protocol)
        if config.notifications:
            if not config.notifications_local_only:
                self._publish_remote_state(protocol, b"1")
            self._notify_local(True)
        # attach the session: re-send in flight (DUP, same ids), then drain
        session = self._attach_local()
        self.broker.session_online(session)

    def mqtt_refused(self, protocol, connack) -> None:
        code = connack.reason_code
        failed = getattr(self._endpoint, "attempt_failed", None)
        if failed is not None:
            failed()      # a refusing address is a failed attempt: try the next one
        if protocol.options.bridge and code in _BAD_LEVEL:
            # the remote does not accept the bridge bit: fall back to a plain
            # client connection, as mosquitto does (no echo protection there
            # beyond our own No Local, and retain flags are not kept)
            self._private = False
            log.warn("Bridge {name}: the remote refused the bridge bit (try_private); "
                     "connecting as a plain MQTT client", name=self.name)
        self.stats.last_error = f"CONNACK code 0x{code:02X}"
        log.warn("Bridge {name}: remote refused CONNECT with code 0x{code:02X}",
                 name=self.name, code=code)

    def mqtt_disconnected(self, protocol, reason: str) -> None:
        was_connected = self.remote is protocol
        self.stats.reconnects += 1
        if not was_connected:
            failed = getattr(self._endpoint, "attempt_failed", None)
            if failed is not None:
                failed()  # refused, or lost before the CONNACK: try the next address
            self.stats.last_error = reason
            log.info("Bridge {name}: connection attempt failed: {reason}",
                     name=self.name, reason=reason)
            return
        self.remote = None
        self._cancel_probe()
        self._acks.clear()
        stats = self.stats
        stats.connected = False
        stats.connected_since = None
        stats.last_error = reason
        log.warn("Bridge {name}: disconnected from remote: {reason}; {queued} messages "
                 "waiting", name=self.name, reason=reason, queued=self._queued())
        self._detach()
        if self.config.notifications and self.running:
            self._notify_local(False)

    def mqtt_writable(self, protocol) -> None:
        session = self.session
        if session is not None and session.connection is self._local:
            self.broker.drain(session)

    def mqtt_packet(self, protocol, packet) -> None:
        kind = packet.__class__
        broker = self.broker
        session = self.session
        if kind is Publish:
            self._from_remote(protocol, packet)
        elif kind is Puback:
            if protocol.level == MQTT_5 and packet.reason_code >= 0x80:
                self._refused(packet)
            broker.puback(session, packet.packet_id)
        elif kind is Pubrec:
            failed = protocol.level == MQTT_5 and packet.reason_code >= 0x80
            if failed:
                self._refused(packet)
            if broker.pubrec(session, packet.packet_id, failed):
                self._ack(protocol, Pubrel(packet.packet_id), durable=True)
            elif not failed:
                protocol.send(Pubrel(packet.packet_id, 0x92 if protocol.level == MQTT_5 else 0))
        elif kind is Pubcomp:
            broker.pubcomp(session, packet.packet_id)
        elif kind is Pubrel:
            found = broker.inbound_qos2_release(session, packet.packet_id)
            code = 0 if found or protocol.level != MQTT_5 else 0x92
            self._ack(protocol, Pubcomp(packet.packet_id, code), durable=True)
        # SUBACK / UNSUBACK: refused filters are logged in _check_suback
        elif kind is Suback:
            self._check_suback(packet)

    def _refused(self, packet) -> None:
        self.stats.refused += 1
        self._warn("refused", "Bridge {name}: the remote refused a message "
                   "(reason 0x{code:02X}); it is not retried", name=self.name,
                   code=packet.reason_code)

    # --- remote -> local ------------------------------------------------------------

    def _from_remote(self, protocol, packet: Publish) -> None:
        broker = self.broker
        session = self.session
        qos = packet.qos
        pid = packet.packet_id
        local_topic = None
        for topic in self._in:
            local_topic = topic.to_local(packet.topic)
            if local_topic is not None:
                break
        mark = broker.write_count
        if qos == 2 and broker.inbound_qos2_seen(session, pid):
            self._ack(protocol, Pubrec(pid), durable=False)   # [MQTT-4.3.3-10]
            return
        if local_topic is None:
            self.stats.unmapped += 1
            log.debug("Bridge {name}: no 'in' topic maps {topic}; dropped",
                      name=self.name, topic=packet.topic)
        else:
            props = packet.properties
            expires = None
            if props is not NO_PROPERTIES:
                if props.message_expiry_interval is not None:
                    expires = self.reactor.seconds() + props.message_expiry_interval
                # inbound -> outbound: the one mapping every path uses (§3.3.2.3)
                props = forwarded_properties(props)
            if qos == 2:
                broker.inbound_qos2_add(session, pid)
            broker.publish(Message(local_topic, packet.payload, qos, packet.retain, props,
                                   self.config.local_clientid, expires), self._local.info)
            self.stats.messages_in += 1
        if qos == 1:
            self._ack(protocol, Puback(pid), durable=True, since=mark)
        elif qos == 2:
            if local_topic is None:
                broker.inbound_qos2_add(session, pid)
            self._ack(protocol, Pubrec(pid), durable=True, since=mark)

    def _ack(self, protocol, packet, durable: bool, since: Optional[int] = None) -> None:
        """Acknowledge in order, each after the store has what it promises."""
        barrier = self.broker.barrier(since) if durable and since is not None else None
        if barrier is None and not self._acks:
            protocol.send(packet)
            return
        self._acks.append((barrier, protocol, packet))
        if barrier is not None:
            barrier.addBoth(self._flush_acks)

    def _flush_acks(self, result=None):
        acks = self._acks
        while acks:
            barrier, protocol, packet = acks[0]
            if barrier is not None and not barrier.called:
                break
            acks.popleft()
            if protocol is self.remote:
                protocol.send(packet)
        return None

    # --- local -> remote ------------------------------------------------------------

    def send_to_remote(self, message: Message, qos: int, packet_id, dup: bool) -> None:
        remote = self.remote
        if remote is None:
            return   # the session is re-sent on the next connection
        remote_topic = self._remote_names.get(message.topic)
        if remote_topic is None:
            for topic in self._out:
                remote_topic = topic.to_remote(message.topic)
                if remote_topic is not None:
                    break
            if remote_topic is None:  # a subscription left over from an older config
                remote_topic = message.topic
            if len(self._remote_names) >= 10_000:
                self._remote_names.clear()
            self._remote_names[message.topic] = remote_topic
        retain = message.retain and self.config.outgoing_retain
        props = NO_PROPERTIES
        if remote.level == MQTT_5:
            if not self._mesh_peer and self.broker.private_user_properties:
                message = self.broker.public_form(message)   # [MQTT-3.3.2-17]
            # local -> remote PUBLISH: what a PUBLISH forwards (never this broker's
            # Subscription Identifiers [MQTT-3.3.4-6]), expiry lowered by the wait
            props = forwarded_properties(message.properties)
            if props is not NO_PROPERTIES and message.expires_at is not None:
                props = attrs.evolve(props, message_expiry_interval=remaining_interval(
                    message.expires_at, self.reactor.seconds()))
        data = encode(Publish(remote_topic, message.payload, qos, retain, dup, packet_id, props),
                      remote.level)
        limit = remote.server_max_packet
        if limit is not None and len(data) > limit:
            # the remote would close the link on it, and the re-send after the
            # reconnect would do the same forever [MQTT-3.1.2-24]: give it up
            self.stats.too_large += 1
            self._warn("too-large", "Bridge {name}: dropped a {size} byte message to {topic}: "
                       "the remote's Maximum Packet Size is {limit}", name=self.name,
                       size=len(data), topic=remote_topic, limit=limit)
            if packet_id is not None:
                self.reactor.callLater(0, self._give_up, packet_id)
            return
        remote.write(data)
        if not dup:
            self.stats.messages_out += 1

    def _give_up(self, packet_id: int) -> None:
        """End the flow of an in-flight message that can never be delivered."""
        session = self.session
        record = session.inflight.get(packet_id) if session is not None else None
        if record is None:
            return
        if record.qos == 1:
            self.broker.puback(session, packet_id)
        else:
            self.broker.pubrec(session, packet_id, failed=True)

    def _warn(self, key: str, fmt: str, **fields) -> None:
        """A warning at most once per 10 s per kind (counted in stats meanwhile)."""
        now = self.reactor.seconds()
        if now - self._warned.get(key, -1e9) >= 10.0:
            self._warned[key] = now
            log.warn(fmt, **fields)

    def _subscribe_remote(self, protocol) -> None:
        config = self.config
        v5 = protocol.level == MQTT_5
        subs = []
        seen = set()
        for topic in self._in:
            if topic.remote_filter in seen:
                continue
            seen.add(topic.remote_filter)
            # v5: No Local + Retain As Published (the bridge's echo guard) [MQTT-3.8.3-3]
            subs.append(Subscription(topic.remote_filter, topic.qos, v5, v5, 0))
        # packet ids share one space with the session's in-flight PUBLISHes
        busy = self.session.inflight if self.session is not None else {}
        free = (pid for pid in range(65535, 0, -1) if pid not in busy)
        if subs:
            protocol.send(Subscribe(next(free), tuple(subs)))
        if config.attempt_unsubscribe:
            stale = [t.remote_filter for t in self._out
                     if not t.incoming and t.remote_filter not in seen]
            if stale:
                protocol.send(Unsubscribe(next(free), tuple(dict.fromkeys(stale))))

    def _check_suback(self, packet) -> None:
        for code in packet.reason_codes:
            if code >= 0x80:
                log.warn("Bridge {name}: the remote refused a subscription "
                         "(code 0x{code:02X})", name=self.name, code=code)

    # --- notifications -----------------------------------------------------------------

    def _notify_local(self, up: bool) -> None:
        if not self.config.notifications:
            return
        self.broker.publish_message(self.config.notification_topic, b"1" if up else b"0",
                                    qos=1, retain=True)
        log.info("Bridge {name}: state {state}", name=self.name, state=1 if up else 0)

    def _publish_remote_state(self, protocol, payload: bytes) -> None:
        # QoS 0 so that it needs no packet id outside the session's id space;
        # the remote's will ("0", QoS 1, retained) covers an unclean end
        protocol.send(Publish(self.config.notification_topic, payload, 0, True))


def _peer(protocol) -> str:
    transport = getattr(protocol, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)
