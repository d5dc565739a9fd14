"""SUBSCRIBE and UNSUBSCRIBE of a client connection (layer L3).

:class:`Subscribing` is one part of :class:`mqttd.connection.ClientConnection`
(a mixin with ``__slots__ = ()``): each filter's checks (syntax, No Local on a
shared subscription [MQTT-3.8.3-4], ``--max-topic-levels``, the
``authorize_subscribe`` hook), the SUBACK/UNSUBACK, retained replays
[MQTT-3.3.1-9, 3.3.1-10], and a packet of more than :data:`FILTERS_PER_TURN`
filters handled in slices, one per reactor turn.
"""
from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd import topics
from mqttd.codec.errors import MQTTError, ProtocolError, ReasonCode
from mqttd.codec.packets import MQTT_5, Suback, Subscribe, Unsuback, Unsubscribe
from mqttd.connstate import _CLOSED
from mqttd.hooks import HOOK_FAILED, call_hook
from mqttd.persistence.records import SubscriptionRecord

__all__ = ["Subscribing", "FILTERS_PER_TURN"]

#: the connection's log lines keep their namespace whichever module of
#: ClientConnection writes them (operators filter on it)
log = Logger(namespace="mqttd.connection")

#: topic filters of one SUBSCRIBE or UNSUBSCRIBE handled per reactor turn; a
#: longer one (only with --max-topic-filters-per-packet above it or 0) is
#: handled in slices
FILTERS_PER_TURN = 1000


@attrs.frozen
class _Refused:
    """A SUBACK code decided before any hook was asked."""

    code: int


class Subscribing:
    """SUBSCRIBE / UNSUBSCRIBE: checks, acknowledgements, retained replays."""

    __slots__ = ()

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
            # one store operation per filter subscribed (a whole record per
            # packet for a store without subscription deltas)
            self.broker.save_subscriptions(
                self.session, [record.topic_filter for record, _ in granted])
        self._output(Suback(packet.packet_id, tuple(codes)), durable=True)

    # a SUBSCRIBE of more filters than FILTERS_PER_TURN: a slice per reactor turn

    def _subscribe_in_slices(self, packet: Subscribe) -> None:
        """Handle ``packet`` :data:`FILTERS_PER_TURN` filters per reactor turn:
        checks and subscriptions, then (after its one SUBACK) the retained
        replays.  Nothing more is read from this connection meanwhile, so its
        later packets and their acknowledgements come after [MQTT-4.6.0-2];
        the other clients are served between the slices."""
        self._waiting += 1
        self._block_input("a long SUBSCRIBE is handled")
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
        self._mark = self.broker.write_count  # the packet's store writes are next
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
            self._block_input("a long UNSUBSCRIBE is handled")
            done = defer.ensureDeferred(self._unsubscribe_slices(packet))
            done.addErrback(self._slice_failed, packet)
            return
        codes, changed = self._unsubscribe_filters(packet.topic_filters)
        self._acknowledge_unsubscribe(packet, codes, changed)

    def _unsubscribe_filters(self, topic_filters) -> tuple:
        """Remove these subscriptions: ``(codes, changed)``, an UNSUBACK code per
        filter and the filters removed."""
        broker = self.broker
        codes = []
        changed = []
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
                changed.append(topic_filter)
                broker.emit("unsubscribed", topic=topic_filter, client=self.info)
        return codes, changed

    def _acknowledge_unsubscribe(self, packet: Unsubscribe, codes, changed: list) -> None:
        if changed:
            # one store operation per filter removed (see _acknowledge_subscribe)
            self.broker.save_subscriptions(self.session, changed)
        reason_codes = tuple(codes) if self.protocol_level == MQTT_5 else ()
        self._output(Unsuback(packet.packet_id, reason_codes), durable=True)

    async def _unsubscribe_slices(self, packet: Unsubscribe) -> None:
        """An UNSUBSCRIBE of more than :data:`FILTERS_PER_TURN` filters, a slice
        per reactor turn (input held, see :meth:`_subscribe_in_slices`)."""
        filters = packet.topic_filters
        codes, changed = [], []
        for start in range(0, len(filters), FILTERS_PER_TURN):
            if start:
                await self._next_turn()
            if self.state == _CLOSED:
                return
            part_codes, part_changed = self._unsubscribe_filters(
                filters[start:start + FILTERS_PER_TURN])
            codes += part_codes
            changed += part_changed
        self._mark = self.broker.write_count  # the packet's store writes are next
        self._acknowledge_unsubscribe(packet, codes, changed)
        self._waiting -= 1
        self._resume_input()
