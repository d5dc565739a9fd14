"""CONNECT of a client connection, up to the CONNACK (layer L3).

:class:`Connecting` is one part of :class:`mqttd.connection.ClientConnection`
(a mixin with ``__slots__ = ()``): the checks of a CONNECT and its refusals
(one CONNACK, one rate-limited line), authentication (the ``authenticate``
hook, a listener's transport identity, MQTT 5 enhanced authentication and
re-authentication [MQTT-4.12]), session ownership and the will's permission,
the session seam (``claim_session``) and the CONNACK that opens the session.
"""
from __future__ import annotations

from typing import Optional

import attrs
from twisted.logger import Logger

from mqttd import topics, trace
from mqttd.aliases import InboundAliases, OutboundAliases
from mqttd.broker import ClientInfo
from mqttd.codec.errors import MQTTError, ProtocolError, ReasonCode, V5_TO_V3_CONNACK
from mqttd.codec.packets import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Auth, Connack, Connect, Disconnect, Properties)
from mqttd.connstate import _CLOSED, _CONNECTED
from mqttd.hooks import HOOK_FAILED, HOOK_TIMED_OUT, AuthOutcome, AuthRequest, AuthStep, auth_outcome, call_hook
from mqttd.messages import will_message

__all__ = ["Connecting", "BRIDGE_PROPERTY"]

#: the connection's log lines keep their namespace whichever module of
#: ClientConnection writes them (operators filter on it)
log = Logger(namespace="mqttd.connection")

#: MQTT 5 has no bridge bit: a CONNECT user property with this name marks a
#: bridging broker instead (mqttd's bridges send it; the value is its broker id)
BRIDGE_PROPERTY = "mqttd-bridge"


class Connecting:
    """CONNECT, authentication and the CONNACK."""

    __slots__ = ()

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
        if self.connect_received is not None:
            received, self.connect_received = self.connect_received, None
            received()
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
        if answer is HOOK_TIMED_OUT:
            # nothing was decided: the authenticator is overloaded, "try later"
            return self._refuse(ReasonCode.SERVER_BUSY, "authentication timed out",
                                what="hook-timeout",
                                detail=f"authenticate gave no answer within "
                                       f"{self.broker.config.hook_timeout:g} s "
                                       f"(username {packet.username!r})",
                                username=packet.username)
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
        if username is None and packet.username is not None:
            # let in as anonymous (no authentication configured): say once
            # (rate-limited) that the name was not checked and is not used
            self.broker.log_limiter.emit(
                log.info, ("unchecked-username", self.client_id),
                "User name {username!r} of {client_id} from {peer} not checked (no "
                "authentication is configured): connected as an anonymous client",
                username=packet.username, client_id=self.client_id, peer=self.peer)
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
        method = self._auth_method
        if step is HOOK_TIMED_OUT:
            return self._auth_failed(ReasonCode.SERVER_BUSY, reauth, "authentication timed out",
                                     detail=f"{method} step gave no answer within "
                                            f"{self.broker.config.hook_timeout:g} s",
                                     what="hook-timeout")
        if not isinstance(step, AuthStep):
            step = AuthStep(AuthOutcome.FAILURE)
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
            self.broker.log_limiter.emit(log.info, (self.client_id, "re-authenticated"),
                                         "Re-authenticated {client_id} ({method})",
                                         client_id=self.client_id, method=method)
            self._output(Auth(ReasonCode.SUCCESS, Properties(
                authentication_method=method, authentication_data=step.data)), durable=False)
            return
        detail = getattr(step, "detail", None)
        self._auth_failed(step.reason_code, reauth, "authentication failed",
                          detail=f"{method} authentication failed"
                                 + (f": {detail}" if detail else ""))

    def _auth_failed(self, code: int, reauth: bool, why: str = "authentication failed",
                     detail: Optional[str] = None, what: str = "authentication"):
        """Refuse the CONNECT (or end the connection on re-authentication) with
        ``code``; one rate-limited refusal line ``what`` with ``detail``."""
        self._auth_exchange = None
        if reauth:
            if code == ReasonCode.BAD_USER_NAME_OR_PASSWORD:
                code = ReasonCode.NOT_AUTHORIZED  # 0x86 is no DISCONNECT reason code
            self.broker.refused(what, self.client_id, self.peer,
                                f"{detail or why} (DISCONNECT 0x{code:02X})",
                                reason_code=code)
            self.disconnect(code, why)  # [MQTT-4.12.1-2]
        else:
            self._refuse(code, why, what=what, detail=detail)

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
        refusal = broker.session_refusal(client_id, expiry is None or expiry > 0,
                                         self.info.username, self.peer)
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
            # one bucket per client host, shared by its live connections; a
            # reconnect (same client id or same host) continues where the last
            # connection left its bucket, not from a full one
            self._bucket = broker.inbound_buckets.acquire(
                self._host_key(), client_id, config.max_inbound_rate,
                config.max_inbound_bytes_rate, self.clock.seconds())
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
            ack_props = NO_PROPERTIES   # v3 CONNACK: no properties (one shared instance)
        self._output(Connack(present, 0, ack_props), durable=True)
        self._output(self._went_online, durable=False)

    def _went_online(self) -> None:
        if self.state != _CONNECTED:
            return
        self._online = True
        self.broker.emit("clientConnected", client=self.info)
        self.broker.session_online(self.session)
