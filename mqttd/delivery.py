"""Delivery in the broker core: one session's outbound messages (layer L3).

:class:`Delivery` is one part of :class:`mqttd.broker.Broker` (a mixin whose
state lives in ``Broker.__init__``): a message routed to a session is written
at once when the client can take it, else kept in the session's bounded queue
(overflow policy, counted drops); :meth:`~Delivery.drain` sends what is owed
in order (in-flight resends with DUP [MQTT-4.4.0-1], the queue with Message
Expiry lowered [MQTT-3.3.2-6], then the retained replay) within the client's
Receive Maximum [MQTT-3.3.4-9]; the subscribers' acknowledgements
(PUBACK/PUBREC/PUBCOMP) and the inbound QoS 2 packet ids [MQTT-4.3.3]; and
the backpressure on publishers while an online subscriber is congested.
"""
from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

from mqttd import debuglog
from mqttd.codec.packets import Pubrel
from mqttd.flowcontrol import session_identities
from mqttd.messages import NO_PROPERTIES, Message, message_size, outbound_message
from mqttd.persistence import records as R
from mqttd.persistence.records import OutboundRecord, OutboundStage
from mqttd.ratelimit import memory_key
from mqttd.session import Session

__all__ = ["Delivery", "MAX_INFLIGHT_UNBOUNDED"]

#: the in-flight byte bound that ``--max-inflight-bytes 0`` means: never reached
MAX_INFLIGHT_UNBOUNDED = 1 << 62

#: the broker's log lines keep their namespace whichever module of the core
#: writes them (operators filter on it)
log = Logger(namespace="mqttd.broker")

#: seconds between two log lines about drops of one (client, reason)
_drop_log_interval = 10.0


class Delivery:
    """Deliver, queue, drain, resend; acknowledgements; drops; backpressure."""

    #: a QoS 2 PUBLISH to a persistent session leaves only once the store made
    #: its record -- its packet id -- durable (``Connection.send_publish_stored``):
    #: a store shared by nodes that may die (a cluster) sets it.  Else a node
    #: killed between the send and the write left a session whose client holds
    #: a packet id its new owner does not know: the message came again under a
    #: new id (twice) and a later message under the held id was taken for a
    #: re-send and dropped by the client [MQTT-4.3.3-3, 4.3.3-9]
    qos2_sent_after_store = False

    def _deliver(self, session: Session, message: Message, qos: int,
                 cache: Optional[dict] = None, force: bool = False,
                 share: Optional[str] = None) -> None:
        conn = session.connection
        if conn is not None:
            if not session.queue and conn.writable():
                if qos == 0:
                    conn.send_publish(message, 0, None, False, cache)
                    return
                used = session.inflight_bytes
                # message_size(), inlined: the QoS 1/2 hot path
                size = (len(message.topic) + len(message.payload)
                        if message.properties is NO_PROPERTIES else message_size(message))
                if (len(session.inflight) < conn.send_window
                        and (not used or used + size <= self._max_inflight_bytes)):
                    pid = session.allocate_packet_id()
                    record = OutboundRecord(session.next_seq(), message, qos, pid,
                                            OutboundStage.PUBLISH_SENT, share)
                    session.inflight[pid] = record
                    session.inflight_bytes = used + size
                    if session.persistent:
                        self._write(R.PutOutbound(session.client_id, record))
                        if qos == 2 and self.qos2_sent_after_store:
                            conn.send_publish_stored(message, qos, pid, cache)
                            return
                    conn.send_publish(message, qos, pid, False, cache)
                    return
        elif qos == 0 and not (force or (session.persistent and self.config.queue_qos0)):
            return  # QoS 0 is not kept for offline clients unless configured
        record = OutboundRecord(session.next_seq(), message, qos, share=share)
        victim = session.enqueue(record, self._limits, force)
        persistent = session.persistent
        if victim is not record:
            if qos and persistent:
                self._write(R.PutOutbound(session.client_id, record))
            if conn is not None and cache:
                template = conn.cached_template(message, qos, cache)
                if template is not None:
                    session.wire[record.seq] = template
        if victim is not None:
            reason = session.overflow
            if reason == "queued-bytes-total":
                self._total_cap_hit()
            self.count_dropped(session, reason, victim.message)
            if victim is not record:
                session.wire.pop(victim.seq, None)
                if victim.qos and persistent:
                    self._write(R.DeleteOutbound(session.client_id, victim.seq))
        if conn is not None:
            if self.flow.routed(session):
                self.backpressure = True
            self.drain(session)

    # --- backpressure on publishers ---------------------------------------------------
    #
    # A subscriber that is online but cannot keep up fills its queue.  Rather
    # than dropping, the broker stops reading from the publishers whose
    # messages go to it until the queue is below the low-water mark again --
    # for at most max_publisher_pause per episode; a subscriber that used up
    # its budget holds no one until it has drained and stayed healthy, and its
    # client id, checked user and address hold no one for the recovery period
    # (mqttd.flowcontrol.SlowConsumerGuard, PauseLedger).  Its queue then
    # overflows by its policy, and the drops are counted.

    def _decongested(self, session: Session) -> None:
        """``session``'s connection went away while it held publishers: the
        hold ends and spends the pause budget of its client id, user and
        address (a reconnect does not renew it; mqttd.flowcontrol)."""
        self.flow.abandoned(session)

    def _pause_identities(self, session: Session) -> tuple:
        """Whose publisher-pause budget ``session`` spends: its client id, its
        user name if the broker checked it (else the one anonymous identity),
        its address and network (mqttd.flowcontrol.session_identities)."""
        return session_identities(session,
                                  authenticated=getattr(self, "authenticator", None) is not None)

    def hold_publisher(self, connection) -> None:
        """Remember a publisher that paused reading because of congestion."""
        self.flow.hold(connection)

    def drain(self, session: Session) -> None:
        """Send what the client is owed while it can take it: in-flight resends
        first, then the queue, then the retained replay.

        Queued messages that expired are dropped, the others go out with their
        Message Expiry Interval lowered by the time they waited
        [MQTT-3.3.2-5], [MQTT-3.3.2-6].  A QoS 1/2 message goes in flight
        while both windows allow it: fewer than ``send_window`` messages
        (``--max-inflight``, the client's Receive Maximum [MQTT-3.3.4-9]) and
        its bytes within ``--max-inflight-bytes`` -- or nothing in flight, so
        a message larger than the byte bound goes alone.  Otherwise it waits
        in the queue, in order (:meth:`_inflight_bytes_reached`).
        """
        conn = session.connection
        if conn is None:
            return
        if session.resend:
            self._resend(session, conn)
        queue = session.queue
        inflight = session.inflight
        window = conn.send_window
        persistent = session.persistent
        wire = session.wire
        max_bytes = self._max_inflight_bytes
        while queue and conn.writable():
            head = queue[0]
            message = head.message
            template = None
            if message.expires_at is not None:
                message = outbound_message(message, self.clock.seconds())
                if message is None:
                    session.dequeue()
                    wire.pop(head.seq, None)
                    if head.qos and persistent:
                        self._write(R.DeleteOutbound(session.client_id, head.seq))
                    self.count_dropped(session, "expired", head.message)
                    continue
                if message is not head.message:
                    wire.pop(head.seq, None)  # the bytes carry the old interval
            if head.qos == 0:
                session.dequeue()
                if wire:
                    template = wire.pop(head.seq, None)
                conn.send_publish(message, 0, None, False, template=template)
                continue
            if len(inflight) >= window:
                break
            used = session.inflight_bytes
            size = message_size(head.message)
            if used and used + size > max_bytes:
                if not session.inflight_held:
                    self._inflight_bytes_reached(session, size)
                break
            session.dequeue()
            pid = session.allocate_packet_id()
            record = OutboundRecord(head.seq, head.message, head.qos, pid,
                                    OutboundStage.PUBLISH_SENT, head.share)
            inflight[pid] = record
            session.inflight_bytes = used + size
            if wire:
                template = wire.pop(head.seq, None)
            if persistent:
                self._write(R.UpdateOutbound(session.client_id, head.seq, pid,
                                             OutboundStage.PUBLISH_SENT))
                if head.qos == 2 and self.qos2_sent_after_store:
                    conn.send_publish_stored(message, 2, pid, template=template)
                    continue
            conn.send_publish(message, head.qos, pid, False, template=template)
        if not queue and session.inflight_held:
            session.inflight_held = False
        if session.congested_since is not None or session.demoted_since is not None:
            self.flow.drained(session)
        if session.replays and not queue:
            self._replay(session, conn)

    def _resend(self, session: Session, conn) -> None:
        """Resend in-flight messages of a resumed session with DUP [MQTT-4.4.0-1],
        their original packet ids, and no more than the client's Receive
        Maximum unacknowledged at once [MQTT-3.3.4-9].

        An expired PUBLISH is dropped rather than resent (as mosquitto does);
        a PUBREL is always resent (the message was delivered).

        Resends are not held back by ``--max-inflight-bytes``: their bytes
        count in flight already (the bound admitted them, or a lower bound
        came with a restart), every one is owed again [MQTT-4.4.0-1], and
        nothing new goes in flight while the bytes are over the bound.
        """
        resend = session.resend
        inflight = session.inflight
        window = conn.send_window
        now = self.clock.seconds()
        while resend and conn.writable() and len(inflight) - len(resend) < window:
            pid = resend.popleft()
            out = inflight.get(pid)
            if out is None:
                continue
            if out.stage == OutboundStage.PUBREL_SENT:
                conn.send(Pubrel(pid))
                continue
            message = outbound_message(out.message, now)
            if message is None:
                session.pop_inflight(pid)
                if session.persistent:
                    self._write(R.DeleteOutbound(session.client_id, out.seq))
                self.count_dropped(session, "expired", out.message)
                continue
            conn.send_publish(message, out.qos, pid, True)

    def _inflight_bytes_reached(self, session: Session, size: int) -> None:
        """The head of ``session``'s queue (``size`` bytes) waits because the
        in-flight bytes reached ``--max-inflight-bytes``: one counted limit
        hit (``max-inflight-bytes``) and one rate-limited line per episode,
        which lasts until the queue is empty again."""
        session.inflight_held = True
        self.refused("max-inflight-bytes", session.client_id, self.session_peer(session),
                     f"{session.inflight_bytes} bytes in {len(session.inflight)} QoS 1/2 "
                     f"messages in flight, the maximum (--max-inflight-bytes "
                     f"{self.config.max_inflight_bytes}); the next ({size} bytes) and "
                     f"{len(session.queue) - 1} more wait in its queue until "
                     "acknowledgements free the window")

    def _total_cap_hit(self) -> None:
        now = self.clock.seconds()
        if self._total_logged is None or now - self._total_logged >= 60.0:
            self._total_logged = now
            log.warn("All sessions' queues together hold {queued} bytes, the maximum "
                     "(--max-queued-bytes-total {limit}); messages beyond it are dropped "
                     "by the overflow policy ({policy}) and counted as queued-bytes-total",
                     queued=self.stats.queued_bytes, policy=self.config.overflow_policy,
                     limit=self.config.max_queued_bytes_total)

    def count_dropped(self, session: Session, reason: str, message: Message) -> None:
        """Count, and log (rate-limited), one message not delivered to ``session``:
        at most one line per client and reason per 10 s, and those lines
        through :attr:`log_limiter` (at most its per-reason burst, 50 per 10 s,
        over all clients; the rest reported as suppressed by a later line)."""
        count = session.count_drop(reason)
        self.stats.count_drop(reason)
        if self.incident_listeners:
            self.incident(session.client_id, reason,
                          f"dropped a QoS {message.qos} message to {message.topic!r}: {reason}")
        if debuglog.enabled:
            log.debug("Dropped a message to {topic} for {client_id}: {reason}",
                      client_id=session.client_id, reason=reason, topic=message.topic)
        # one line per client and reason per interval, and through the broker's
        # log limiter, whose cap per reason over all clients bounds a flood of
        # clients (REVIEW-S10 S13); a long client id is kept as its digest
        key = (memory_key(session.client_id), reason)
        now = self.clock.seconds()
        last = self._drop_logged.get(key)
        if last is None or now - last >= _drop_log_interval:
            if len(self._drop_logged) > 10000:
                self._drop_logged.clear()
            self._drop_logged[key] = now
            self.log_limiter.emit(
                log.warn, (key[0], "dropped-" + reason),
                "Dropping messages for {client_id} from {peer}: {reason} "
                "({count} dropped for this reason so far)",
                client_id=session.client_id, peer=self.session_peer(session),
                reason=reason, count=count)

    def puback(self, session: Session, packet_id: int) -> bool:
        record = session.inflight.get(packet_id)
        if record is None or record.qos != 1:
            return False
        del session.inflight[packet_id]       # session.pop_inflight(), inlined: hot path
        message = record.message
        session.inflight_bytes -= (len(message.topic) + len(message.payload)
                                   if message.properties is NO_PROPERTIES
                                   else message_size(message))
        self.stats.messages_acked += 1
        if session.persistent:
            self._write(R.DeleteOutbound(session.client_id, record.seq))
        if session.queue or session.resend or session.replays:
            self.drain(session)
        return True

    def pubrec(self, session: Session, packet_id: int, failed: bool = False) -> bool:
        """PUBREC for an outbound QoS 2 message; the caller sends PUBREL if True."""
        record = session.inflight.get(packet_id)
        if record is None or record.qos != 2:
            return False
        if failed:  # v5 PUBREC with a reason code >= 0x80 ends the flow [MQTT-4.3.3-...]
            session.pop_inflight(packet_id)
            if session.persistent:
                self._write(R.DeleteOutbound(session.client_id, record.seq))
            self.drain(session)
            return False
        if record.stage != OutboundStage.PUBREL_SENT:
            session.inflight[packet_id] = OutboundRecord(
                record.seq, record.message, 2, packet_id, OutboundStage.PUBREL_SENT,
                record.share)
            if session.persistent:
                self._write(R.UpdateOutbound(session.client_id, record.seq, packet_id,
                                             OutboundStage.PUBREL_SENT))
        return True

    def pubcomp(self, session: Session, packet_id: int) -> bool:
        record = session.inflight.get(packet_id)
        if record is None or record.stage != OutboundStage.PUBREL_SENT:
            return False
        session.pop_inflight(packet_id)
        self.stats.messages_acked += 1
        if session.persistent:
            self._write(R.DeleteOutbound(session.client_id, record.seq))
        self.drain(session)
        return True

    def inbound_qos2_seen(self, session: Session, packet_id: int) -> bool:
        return packet_id in session.inbound_qos2

    def inbound_qos2_add(self, session: Session, packet_id: int) -> None:
        if session.inbound_qos2.__class__ is frozenset:
            session.inbound_qos2 = set()
        session.inbound_qos2.add(packet_id)
        if session.persistent:
            self._write(R.AddInboundQos2(session.client_id, packet_id))

    def inbound_qos2_resent(self, session: Session, packet_id: int, message) -> bool:
        """A QoS 2 PUBLISH re-sent under a packet id ``session`` already received:
        never delivered here twice [MQTT-4.3.3-10].  A remote router may hand
        it to other nodes again, idempotently, when its first hand-off may not
        have completed (a node cut off from Redis before PUBREC: see
        ``router.resend_qos2``); True if the PUBREC must then wait for the
        store barrier."""
        router = self.router
        resend = None if router is None else getattr(router, "resend_qos2", None)
        if resend is None or not session.persistent:
            return False
        return resend(message, packet_id) > 0

    def inbound_qos2_release(self, session: Session, packet_id: int) -> bool:
        if packet_id not in session.inbound_qos2:
            return False
        session.inbound_qos2.discard(packet_id)
        if session.persistent:
            self._write(R.DeleteInboundQos2(session.client_id, packet_id))
        return True
