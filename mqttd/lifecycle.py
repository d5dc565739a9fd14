"""Session lifecycle of the broker core: a session from CONNECT to its end (layer L3).

:class:`SessionLifecycle` is one part of :class:`mqttd.broker.Broker` (a mixin
whose state lives in ``Broker.__init__``): restoring sessions from the store,
the session seam a cluster plugs into (:meth:`~SessionLifecycle.claim_session`,
:meth:`~SessionLifecycle.install_session`, :meth:`~SessionLifecycle.release_session`),
opening and taking over sessions [MQTT-3.1.4-2], the CONNECT refusals decided
before a session is touched, the teardown when a connection is lost (wills
[MQTT-3.1.2-8], Will Delay Interval, session expiry), and discarding a session.
"""
from __future__ import annotations

import collections
import errno
import uuid
from typing import Optional

import attrs
from twisted.logger import Logger

from mqttd import topics
from mqttd.codec.errors import ReasonCode
from mqttd.messages import Message, forwarded_properties, published_at, will_message
from mqttd.persistence import records as R
from mqttd.persistence.records import OutboundStage
from mqttd.clients import ClientInfo
from mqttd.ratelimit import memory_key
from mqttd.session import Session
from mqttd.sessionbudget import budget_owner, owner_name

#: client ids whose last owner is remembered after its session ended (about
#: 150 bytes each; see ``Broker.earlier_owners``)
MAX_EARLIER_OWNERS = 100_000

__all__ = ["SessionLifecycle", "NEVER_EXPIRES"]

#: the broker's log lines keep their namespace whichever module of the core
#: writes them (operators filter on it)
log = Logger(namespace="mqttd.broker")

#: session expiry value meaning "never" in MQTT 5 [MQTT-3.1.2-...] (0xFFFFFFFF)
NEVER_EXPIRES = 0xFFFFFFFF


class SessionLifecycle:
    """Sessions: restore, claim/install/release, open, lose, expire, discard."""

    #: True once the store's state was restored (see :meth:`start`)
    started = False

    def restore(self, state: R.StoredState) -> None:
        """Rebuild sessions, subscriptions, retained messages and pending wills
        from the store.  Messages that expired while the broker was down are
        dropped (and deleted from the store) [MQTT-3.3.2-5].  Stored messages
        written by older versions go through the same property mapping as
        live ones (a retained will could carry its Will Delay Interval)."""
        self.started = True
        self._check_session_budget()
        now = self.clock.seconds()
        expired = 0
        for topic, message in list(state.retained.items()):
            if message.expires_at is not None and message.expires_at <= now:
                self._write(R.DeleteRetained(topic))
                expired += 1
                continue
            self.retained.set(_forwardable(message))
        self._schedule_retained_expiry()
        # one mapped copy per stored message: sessions that shared a message in
        # the store share it in memory too (REVIEW-S9 R11)
        mapped: dict = {}
        for client_id, stored in state.sessions.items():
            expired += self._restore_session(stored, now, mapped)
        # the owners' offline sessions, longest offline first (--max-sessions)
        for session in sorted(self.sessions.values(),
                              key=lambda s: (s.disconnected_at or 0.0, s.client_id)):
            self._persistent.went_offline(session.client_id,
                                          bool(session.queue or session.inflight))
        # wills first: a session that expired while we were down publishes its will
        self.wills.restore(state.wills.values(), self.sessions)
        for session in list(self.sessions.values()):
            self._schedule_expiry(session, now)
        log.info("Restored {sessions} sessions ({messages} stored messages), "
                 "{retained} retained messages and {wills} delayed wills; "
                 "{expired} expired messages dropped",
                 sessions=len(state.sessions), retained=len(self.retained),
                 messages=sum(len(s.outbound) for s in state.sessions.values()),
                 wills=len(state.wills), expired=expired)

    def _check_session_budget(self) -> None:
        """One WARN line at start-up when ``--max-sessions-per-user`` is not
        below ``--max-sessions`` (0 or at least the cap): one user name -- or
        the anonymous clients of one address -- can then hold every persistent
        session.  The fair share at the cap still lets the other users' new
        sessions in while that user has one offline, but not while all of
        them are connected."""
        limit = self.config.max_sessions
        share = self.config.max_sessions_per_user
        if limit and (not share or share >= limit):
            log.warn("--max-sessions-per-user {share} is not below --max-sessions {limit}: "
                     "one user name (or the anonymous clients of one address) can hold every "
                     "persistent session; at the cap another user's new session then evicts "
                     "that user's longest-offline session, and is refused while all of its "
                     "sessions are connected. Set --max-sessions-per-user below "
                     "--max-sessions (docs/security.rst, Session budget)",
                     share=share or "0 (no share)", limit=limit)

    def _restore_session(self, stored: R.StoredSession, now: float,
                         mapped: Optional[dict] = None) -> int:
        """Rebuild one stored persistent session, offline; returns how many of
        its messages had expired (dropped and deleted from the store).

        ``mapped`` (``id(stored message) -> (stored, message as restored)``),
        shared by the sessions restored together, keeps a message that several
        sessions share one object when its properties have to be mapped."""
        record = stored.record
        client_id = record.client_id
        expired = 0
        session = Session(client_id=client_id, protocol_level=record.protocol_level,
                          persistent=True, expiry_interval=record.expiry_interval,
                          owner=getattr(record, "owner", None),  # older records: none
                          ledger=self.stats)
        # an anonymous session's address is not stored: "-" until it reconnects
        self._persistent.add(client_id, budget_owner(session.owner))
        session.disconnected_at = (record.disconnected_at
                                   if record.disconnected_at is not None else now)
        for sub in record.subscriptions:
            session.subscriptions[sub.topic_filter] = sub
            self._index(client_id, sub)
        for seq in sorted(stored.outbound):
            out = stored.outbound[seq]
            session.restore_seq(seq)
            expires_at = out.message.expires_at
            if (expires_at is not None and expires_at <= now
                    and out.stage != OutboundStage.PUBREL_SENT):
                self._write(R.DeleteOutbound(client_id, seq))
                expired += 1
                continue
            if mapped is None:
                forwardable = _forwardable(out.message, keep_subscription_ids=True)
            else:
                known = mapped.get(id(out.message))
                if known is None:
                    forwardable = _forwardable(out.message, keep_subscription_ids=True)
                    # the stored message is kept in the entry: its id stays valid
                    mapped[id(out.message)] = (out.message, forwardable)
                else:
                    forwardable = known[1]
            if forwardable is not out.message:
                out = attrs.evolve(out, message=forwardable)
            if out.stage == OutboundStage.QUEUED or out.packet_id is None:
                session.restore_queued(out)
            else:
                session.restore_inflight(out)
        if stored.inbound_qos2:
            session.inbound_qos2 = set(stored.inbound_qos2)
        self._persistent.went_offline(client_id, bool(session.queue or session.inflight))
        self.sessions[client_id] = session
        self.stats.persistent_sessions = len(self._persistent)
        return expired

    #: an object with ``claim(connection, client_id, clean_start, persistent,
    #: will, username)`` and ``abandoned(client_id, connection)``, or None (a
    #: single node: nothing to claim).  See :meth:`claim_session`.
    session_registry = None

    def claim_session(self, connection, client_id: str, clean_start: bool,
                      persistent: bool, will, username: Optional[str]):
        """The step before :meth:`open_session`: make ``client_id`` ours.

        A single node has nothing to claim and answers ``None`` at once (no
        Deferred on the fast path).  With a :attr:`session_registry` (the
        cluster) it returns its answer: ``None`` or a Deferred firing with
        ``None`` once the client id is owned here (the session, if resumed,
        installed with :meth:`install_session`), or with a refusal
        ``(reason_code, why, stats_reason)`` for the CONNACK.  The connection
        waits meanwhile; its later packets queue [MQTT-4.6.0-2].
        """
        registry = self.session_registry
        if registry is None:
            return None
        return registry.claim(connection, client_id, clean_start, persistent, will, username)

    def claim_abandoned(self, client_id: Optional[str], connection) -> None:
        """The connection that claimed ``client_id`` went (or was refused)
        before its session was opened."""
        registry = self.session_registry
        if registry is not None and client_id is not None:
            registry.abandoned(client_id, connection)

    def install_session(self, stored: R.StoredSession, will: Optional[R.WillRecord] = None,
                        ) -> Session:
        """Take over ``stored`` (a persistent session another node owned) as an
        offline session of this broker, replacing any copy held here, with its
        pending delayed will; its expiry timer starts (from its
        ``disconnected_at``).  Writes nothing except dropping expired messages
        [MQTT-3.3.2-5].  Returns the session."""
        client_id = stored.record.client_id
        existing = self.sessions.get(client_id)
        if existing is not None:
            self.release_session(client_id)
        now = self.clock.seconds()
        self._restore_session(stored, now)
        if will is not None:
            self.wills.restore([will], self.sessions)
        session = self.sessions[client_id]
        self._schedule_expiry(session, now)
        return session

    def release_session(self, client_id: str, clean_start: bool = False) -> Optional[Session]:
        """Forget the session of ``client_id`` without touching the store:
        another node owns it now (session takeover across nodes).

        An online client is disconnected with 0x8E Session taken over
        [MQTT-3.1.4-3]; its will is published when the new owner starts a
        clean session or the will has no delay (a resumed session cancels a
        delayed will [MQTT-3.1.3-9]); a pending delayed will likewise.  Nothing
        is written: the new owner's store state wins.  Returns the session
        forgotten, or None.
        """
        session = self.sessions.get(client_id)
        if session is None:
            self.wills.session_resumed_elsewhere(client_id, publish=clean_start)
            return None
        conn = session.connection
        if conn is not None:
            will, session.will = session.will, None
            self.online -= 1
            info = getattr(conn, "info", None)
            self.emit("clientDisconnecting", client=info, reason="takeover")
            session.connection = None
            session.wire.clear()
            session.resend = ()
            if session.congested_since is not None:
                self._teardown_step(client_id, "release of held publishers",
                                    self._decongested, session)
            if will is not None and (clean_start or not session.persistent
                                     or not will.properties.will_delay_interval):
                self._teardown_step(client_id, "will", self.wills.schedule, client_id,
                                    will_message(will, client_id), 0, False)
            conn.disconnect(ReasonCode.SESSION_TAKEN_OVER)
            self.emit("clientDisconnected", client=info, reason="takeover")
        self.wills.session_resumed_elsewhere(client_id, publish=clean_start)
        for topic_filter in list(session.subscriptions):
            self._unindex(client_id, topic_filter)
        session.clear_queue()
        session.clear_inflight()
        session.replays = ()
        if session.expiry_call is not None and session.expiry_call.active():
            session.expiry_call.cancel()
        session.expiry_call = None
        del self.sessions[client_id]
        self._persistent.discard(client_id)
        self.stats.persistent_sessions = len(self._persistent)
        return session

    def assign_client_id(self) -> str:
        return self.config.assigned_id_prefix + uuid.uuid4().hex[:16]

    def session_owner_conflict(self, client_id: str, username: Optional[str]) -> Optional[str]:
        """The username owning ``client_id``'s *live* session if it is not ``username``.

        A session remembers the username that created it.  While its owner is
        connected, another username (or an anonymous client) may not take it
        over: the CONNECT is refused (0x87 / v3 0x05), also with Clean Start,
        unless ``allow_session_takeover_by_other_user``.  An *offline* session
        of another user is no reason to refuse: :meth:`open_session` discards
        it (never resumes it), so nobody can lock a device out of its client
        id by storing a session under it (REVIEW-S9 R17), and nobody reads
        another user's queued messages.  A session created anonymously (or
        stored before owners were recorded) has no owner to protect.  Nor
        does one that took the client id from ``username``'s offline session
        (``Session.claimed_from``): the user who had the client id first
        takes it back, the other user's connection is closed as a takeover
        (0x8E), so staying connected under a device's client id does not lock
        the device out either (REVIEW-S10 S5).  Returns None when allowed.
        """
        existing = self.sessions.get(client_id)
        if existing is None or existing.connection is None or self.may_resume(existing, username):
            return None
        if username is not None and existing.claimed_from == memory_key(username):
            return None
        return existing.owner

    def may_resume(self, session: Session, username: Optional[str]) -> bool:
        """Whether a client authenticated as ``username`` may resume ``session``
        (take its subscriptions, queued and in-flight messages): it has no
        owner, ``username`` is its owner, or
        ``allow_session_takeover_by_other_user``."""
        return (session.owner is None or session.owner == username
                or self.config.allow_session_takeover_by_other_user)

    def _replace_foreign(self, session: Session, username: Optional[str]) -> None:
        """Discard the offline ``session`` of another user for a CONNECT of
        ``username`` with the same client id: counted as ``sessions_replaced``,
        one rate-limited line; nothing of it is handed to the new client."""
        self.stats.sessions_replaced += 1
        self.log_limiter.warn(
            log, (session.client_id, "session-replaced"),
            "Discarding offline session of {client_id} owned by {owner!r}: client id "
            "now used by {username!r} (session ownership)",
            client_id=session.client_id, owner=session.owner, username=username,
            queued=len(session.queue), subscriptions=len(session.subscriptions))

    def open_session(self, connection, client_id: str, protocol_level: int,
                     clean_start: bool, expiry_interval: Optional[int], will,
                     owner: Optional[str] = None, info: Optional[ClientInfo] = None) -> tuple:
        """Attach ``connection`` to a new or existing session.

        Returns ``(session, session_present)``.  An existing connection with the
        same client id is taken over [MQTT-3.1.4-2]; the session is discarded
        first if ``clean_start`` [MQTT-3.1.2-4].  The session is not yet
        online: call :meth:`session_online` once CONNACK is on the wire.
        ``owner`` is the authenticated username, stored with the session
        (see :meth:`session_owner_conflict`).
        """
        persistent = expiry_interval is None or expiry_interval > 0
        if expiry_interval == NEVER_EXPIRES:
            expiry_interval = None
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            old = existing.connection
            # client-triggered (a client can flap its id): rate-limited per
            # client id and per reason, as the event lines
            self.log_limiter.emit(log.info, (client_id, "takeover"),
                                  "Session takeover for {client_id}", client_id=client_id)
            # a DISCONNECT the old connection had read but not handled yet (its
            # input held, see mqttd.inflow) still discards the will [MQTT-3.14.4-3]
            settle = getattr(old, "settle_input", None)
            publish_will = settle() if settle is not None else True
            self.connection_lost(existing, old, publish_will=publish_will, reason="takeover")
            old.disconnect(ReasonCode.SESSION_TAKEN_OVER)
            existing = self.sessions.get(client_id)  # a clean one is gone now
        if existing is not None and existing.expiry_call is not None:
            if existing.expiry_call.active():
                existing.expiry_call.cancel()
            existing.expiry_call = None
        session_present = False
        # who had the client id first keeps the right to take it back from
        # another user (session_owner_conflict, REVIEW-S10 S5)
        owner_key = memory_key(owner) if owner is not None else None
        if existing is None:
            first = (self.earlier_owners.get(memory_key(client_id))
                     if owner is not None else None)
        elif self.may_resume(existing, owner):
            first = existing.claimed_from
        else:
            # another user's offline session (a live one was refused by
            # session_owner_conflict): discarded whatever Clean Start says
            self._replace_foreign(existing, owner)
            clean_start = True
            first = existing.claimed_from or (
                memory_key(existing.owner) if existing.owner is not None else None)
        claimed_from = first if first != owner_key else None
        if existing is not None and not clean_start:
            session = existing
            session_present = True
            # resumed in time: its delayed will is not sent [MQTT-3.1.3-9]
            self.wills.session_resumed(client_id)
        else:
            if existing is not None:
                self._discard_session(existing)
            # the old session ended: a will still waiting goes out now [MQTT-3.1.2-8]
            self.wills.session_ended(client_id)
            session = Session(client_id=client_id, ledger=self.stats)
            self.sessions[client_id] = session
        if owner is not None:
            self.earlier_owners.pop(memory_key(client_id), None)  # kept by the session now
        was_persistent = session.persistent
        session.owner = owner
        session.claimed_from = claimed_from
        session.info = info
        session.protocol_level = protocol_level
        session.persistent = persistent
        self._track_persistent(session)
        session.expiry_interval = expiry_interval
        session.will = will
        session.connection = connection
        session.disconnected_at = None
        self._persistent.went_online(client_id)
        self.online += 1
        if self.online > self.stats.clients_maximum:
            self.stats.clients_maximum = self.online
        if persistent:
            if was_persistent:
                # resumed (or taken over): its subscriptions are in the store
                # already; the new connection's state only, O(1) (REVIEW-S9 R15)
                self.save_session_state(session)
            else:
                # new, or a clean session became persistent: store it whole
                # with what it owes
                self._write(R.PutSession(session.to_record()))
                for out in session.outbound_records():
                    self._write(R.PutOutbound(client_id, out))
        elif was_persistent:
            self._write(R.DeleteSession(client_id))
        self.stats.connections_total += 1
        return session, session_present

    def _track_persistent(self, session: Session) -> None:
        if session.persistent:
            self._persistent.add(session.client_id, budget_owner(
                session.owner, getattr(session.info, "peer", None)))
        else:
            self._persistent.discard(session.client_id)
        self.stats.persistent_sessions = len(self._persistent)

    def session_refusal(self, client_id: str, persistent: bool,
                        owner: Optional[str] = None, peer: Optional[str] = None,
                        ) -> Optional[tuple]:
        """Why a CONNECT for ``client_id`` by the user ``owner`` (None:
        anonymous) from ``peer`` (``"host:port"``) must be refused before its
        session is touched: ``(reason_code, why, stats_reason)``, or None to
        go on.  Below, ``owner`` is the budget owner
        (:func:`~mqttd.sessionbudget.budget_owner`): the user name, or for an
        anonymous client its address (IPv6: /64) -- the anonymous clients of
        one address share a budget, not all of them one (REVIEW-S10 S6).

        * the store cannot write (disk full, I/O error) and the session would be
          persistent: v5 0x97 Quota exceeded for a full disk, else 0x88 Server
          unavailable (v3: 0x03) -- a CONNACK refusal, never a DISCONNECT before
          CONNACK [MQTT-3.14.0-1];
        * it would create one persistent session more than ``owner`` may hold
          (``max_sessions_per_user``): one of ``owner``'s own offline sessions
          is discarded to make room -- the longest-offline one that owes no
          message, else the longest-offline one
          (:meth:`PersistentSessions.longest_offline
          <mqttd.sessionbudget.PersistentSessions.longest_offline>`; counted as
          ``sessions_evicted``, one rate-limited line); if ``owner`` has none
          offline, 0x97 Quota exceeded (v3: 0x03), counted as
          ``max-sessions-per-user``;
        * it would create one more than the broker holds (``max_sessions``):
          the fair share decides (:meth:`PersistentSessions.fair_victim
          <mqttd.sessionbudget.PersistentSessions.fair_victim>`): an offline
          session of the owner holding the most goes (chosen as above), if
          that owner holds at least two more than ``owner``; else one of
          ``owner``'s own; with neither, 0x97 / 0x03, counted as
          ``max-sessions``.  So one user filling the budget with throwaway
          sessions (REVIEW-S9 R10), even with a share at or above the cap,
          locks no other user out.

        Resuming or replacing an existing persistent session is always
        allowed.  O(log owners): no scan of the sessions.
        """
        if not persistent:
            return None
        failure = getattr(self.store, "failure", None)
        if failure is not None:
            full = getattr(failure, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            return ((ReasonCode.QUOTA_EXCEEDED if full else ReasonCode.SERVER_UNAVAILABLE),
                    f"the store cannot write ({failure})", "store-unavailable")
        if client_id in self._persistent:
            return None
        index = self._persistent
        owner = budget_owner(owner, peer)
        share = self.config.max_sessions_per_user
        if share and index.count(owner) >= share:
            refusal = self._make_room(
                client_id, peer, owner, "max-sessions-per-user",
                f"{index.count(owner)} persistent sessions of {owner_name(owner)!r}, "
                f"the maximum (--max-sessions-per-user)",
                index.longest_offline(owner, self.sessions))
            if refusal is not None:
                return refusal
        limit = self.config.max_sessions
        if limit and len(index) >= limit:
            return self._make_room(client_id, peer, owner, "max-sessions",
                                   f"{len(index)} persistent sessions, the maximum "
                                   f"(--max-sessions)",
                                   index.fair_victim(owner, self.sessions))
        return None

    def _make_room(self, client_id: str, peer: Optional[str], owner, what: str,
                   why: str, victim: Optional[Session]) -> Optional[tuple]:
        """Discard ``victim`` (an offline persistent session: budget owner
        ``owner``'s own, or at ``--max-sessions`` the biggest owner's) for the
        new session of ``client_id`` from ``peer``, or without one the refusal."""
        if victim is None:
            return (ReasonCode.QUOTA_EXCEEDED, why, what)
        self.stats.sessions_evicted += 1
        offline = self.clock.seconds() - (victim.disconnected_at or self.clock.seconds())
        victim_owner = self._persistent.owner_of(victim.client_id)
        if victim_owner == owner:
            self.log_limiter.warn(
                log, (owner, "session-evicted"),
                "Evicting session {evicted} of {owner!r} (offline {offline:.0f} s, "
                "{queued} queued) for the new session {client_id} from {peer}: {why}",
                evicted=victim.client_id, owner=owner_name(owner), offline=offline,
                queued=len(victim.queue) + len(victim.inflight), client_id=client_id,
                peer=peer or "-", why=why, what=what)
        else:
            self.log_limiter.warn(
                log, (victim_owner, "session-evicted"),
                "Evicting session {evicted} of {victim_owner!r} (offline {offline:.0f} s, "
                "{queued} queued; {victim_owner!r} holds {held} persistent sessions, the "
                "most) for the new session {client_id} of {owner!r} ({mine}) from {peer}: "
                "{why}; fair share",
                evicted=victim.client_id, victim_owner=owner_name(victim_owner),
                owner=owner_name(owner), offline=offline,
                queued=len(victim.queue) + len(victim.inflight),
                held=self._persistent.count(victim_owner),
                mine=self._persistent.count(owner), client_id=client_id,
                peer=peer or "-", why=why, what=what)
        if self.incident_listeners:
            self.incident(victim.client_id, "session-evicted",
                          f"session evicted for {client_id}: {why}")
        self._discard_session(victim)
        return None

    def session_online(self, session: Session) -> None:
        """Resend in-flight messages with DUP [MQTT-4.4.0-1], then drain the queue.

        The resends count against the client's Receive Maximum like any
        PUBLISH [MQTT-3.3.4-9]: at most ``send_window`` go out now, the others
        as acknowledgements come back (:meth:`drain`).
        """
        conn = session.connection
        if conn is None:
            return
        session.resend = collections.deque(session.inflight) if session.inflight else ()
        session.inflight_held = False   # a new connection: its own --max-inflight-bytes episodes
        self.drain(session)

    def connection_lost(self, session: Session, connection, publish_will: bool,
                        reason: str) -> None:
        """The network connection of ``session`` is gone (for whatever reason)."""
        if session.connection is not connection:
            return  # already taken over
        self.online -= 1
        info = getattr(connection, "info", None)
        client_id = session.client_id
        # every step runs even if an earlier one fails: never half torn down
        self._teardown_step(client_id, "clientDisconnecting event", self.emit,
                            "clientDisconnecting", client=info, reason=reason)
        will = session.will
        session.will = None
        session.connection = None
        session.wire.clear()
        session.resend = ()
        now = self.clock.seconds()
        session.disconnected_at = now
        if session.congested_since is not None:
            self._teardown_step(client_id, "release of held publishers",
                                self._decongested, session)
        if publish_will and will is not None:
            self._teardown_step(client_id, "will", self._schedule_will, session, will)
        if not session.persistent:
            self._teardown_step(client_id, "session discard", self._discard_session, session)
        else:
            self._persistent.went_offline(client_id, bool(session.queue or session.inflight))
            self._teardown_step(client_id, "session store", self.save_session_state,
                                session)
            self._teardown_step(client_id, "session expiry", self._schedule_expiry,
                                session, now)
        self._teardown_step(client_id, "clientDisconnected event", self.emit,
                            "clientDisconnected", client=info, reason=reason)

    def _teardown_step(self, client_id: str, step: str, f, *args, **kwargs) -> None:
        try:
            f(*args, **kwargs)
        except Exception:
            log.failure("Teardown of {client_id}: {step} failed; continuing",
                        client_id=client_id, step=step)

    def _schedule_will(self, session: Session, will) -> None:
        """The connection ended without DISCONNECT 0x00: publish its will now or
        after its Will Delay Interval, whichever comes before the session ends
        [MQTT-3.1.2-8] (MQTT 5.0 §3.1.3.2.2)."""
        delay = will.properties.will_delay_interval or 0
        if not session.persistent:
            delay = 0  # the session ends with this connection
        elif session.expiry_interval is not None:
            delay = min(delay, session.expiry_interval)
        durable = session.persistent and delay > 0
        self.wills.schedule(session.client_id, will_message(will, session.client_id),
                            delay, durable=durable)
        if durable:
            # nothing else may sync the store soon: a pending will must
            # survive a crash right after the connection went
            synced = self.barrier(self.write_count - 1)
            if synced is not None:
                synced.addErrback(lambda failure: log.failure(
                    "Storing the delayed will of {client_id} failed", failure,
                    client_id=session.client_id))

    def _publish_will_now(self, client_id: str, message: Message) -> None:
        # one $SYS will is published: a bridging broker's state notification
        if topics_is_sys(message.topic) and not topics.is_bridge_state_topic(message.topic):
            return
        self.log_limiter.emit(log.info, (client_id, "will"),
                              "Publishing will of {client_id} to {topic}",
                              client_id=client_id, topic=message.topic)
        self.publish(published_at(message, self.clock.seconds()), client=None)

    def _schedule_expiry(self, session: Session, now: float) -> None:
        interval = session.expiry_interval
        if interval is None and session.protocol_level < 5:
            # MQTT 3.x persistent sessions: --persistent-client-expiration
            interval = self.config.persistent_client_expiration
        if interval is None:
            return  # never expires
        started = session.disconnected_at if session.disconnected_at is not None else now
        delay = max(0.0, started + interval - now)
        session.expiry_call = self.clock.callLater(delay, self._expire, session)

    def _expire(self, session: Session) -> None:
        session.expiry_call = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            self.log_limiter.emit(log.info, (session.client_id, "session-expired"),
                                  "Session {client_id} expired", client_id=session.client_id)
            queued = len(session.queue) + len(session.inflight)
            self.stats.sessions_expired += 1
            self._discard_session(session)
            if self.incident_listeners:
                self.incident(session.client_id, "session-expired",
                              f"session expired after {session.expiry_interval} s offline; "
                              f"{queued} queued or in-flight messages discarded")

    def _discard_session(self, session: Session) -> None:
        first = session.claimed_from or (
            memory_key(session.owner) if session.owner is not None else None)
        if first is not None:
            self._remember_owner(memory_key(session.client_id), first)
        for topic_filter in list(session.subscriptions):
            self._unindex(session.client_id, topic_filter)
        session.subscriptions.clear()
        session.clear_queue()
        if session.persistent:
            self._write(R.DeleteSession(session.client_id))
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self._persistent.discard(session.client_id)
            self.stats.persistent_sessions = len(self._persistent)
        if session.expiry_call is not None and session.expiry_call.active():
            session.expiry_call.cancel()
        session.expiry_call = None
        session.replays = ()
        # the session ended: a will still waiting for its delay goes out now
        self.wills.session_ended(session.client_id)
        if session.inflight or session.queue:
            self._redispatch(session)

    def _remember_owner(self, client_id: str, owner: str) -> None:
        """Remember that ``owner`` had ``client_id`` (its session just ended),
        for :meth:`session_owner_conflict`; at most
        :data:`MAX_EARLIER_OWNERS` client ids, the oldest forgotten first.
        Both are :func:`mqttd.ratelimit.memory_key` forms (a long one: its
        digest), so the table's size does not grow with what clients chose."""
        owners = self.earlier_owners
        owners.pop(client_id, None)
        owners[client_id] = owner
        while len(owners) > MAX_EARLIER_OWNERS:
            owners.popitem(last=False)

    def session_expiry_changed(self, session: Session, interval: int) -> None:
        """A v5 DISCONNECT carried a new Session Expiry Interval [MQTT-3.14.2-2].

        ``--max-session-expiry`` caps it as it caps the CONNECT's: the client may
        change the interval on DISCONNECT (MQTT 5.0 §3.14.2.2.2), not past the
        server's limit (0xFFFFFFFF, "never", is over any limit).
        """
        limit = self.config.max_session_expiry
        if limit is not None and interval > limit:
            interval = limit
        was_persistent = session.persistent
        session.persistent = interval > 0
        self._track_persistent(session)
        session.expiry_interval = None if interval == NEVER_EXPIRES else interval
        if was_persistent and not session.persistent:
            self._write(R.DeleteSession(session.client_id))  # ends with this connection
        elif was_persistent:
            self.save_session_state(session)
        elif session.persistent:
            self._write(R.PutSession(session.to_record()))


def _forwardable(message: Message, keep_subscription_ids: bool = False) -> Message:
    """``message`` with only the properties a PUBLISH forwards (see mqttd.messages).

    ``keep_subscription_ids``: a message owed to one session carries that
    subscriber's Subscription Identifiers, which the broker itself set.
    """
    props = forwarded_properties(message.properties)
    if props is message.properties:
        return message
    ids = message.properties.subscription_identifiers
    if keep_subscription_ids and ids:
        props = attrs.evolve(props, subscription_identifiers=ids)
    return attrs.evolve(message, properties=props)


def topics_is_sys(topic: str) -> bool:
    return topic.startswith("$SYS")
