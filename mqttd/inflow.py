"""When a client connection reads (layer L3).

:class:`InputFlow` is one part of :class:`mqttd.connection.ClientConnection`
(a mixin with ``__slots__ = ()``): hooks whose Deferred answer is awaited with
input blocked (so acknowledgements keep their order [MQTT-4.6.0-2]), the input
held meanwhile, the inbound rate limit (``--max-inbound-rate``: the client is
slowed, never disconnected), and the CONNECT and keepalive timers
[MQTT-3.1.2-22, MQTT-3.1.2-24].

**Held input.**  Input is *blocked* while a hook's answer is awaited
(``_waiting``), while the publisher is held back for a congested subscriber
(``_held``) or while the inbound bucket refills (``_rate_call``).  Then:

- what was already decoded waits in ``_stash`` -- at most one slice of
  :data:`DECODE_SLICE` bytes, because a long read is decoded slice by slice
  and what follows the slice in which input blocked stays raw;
- later reads are kept raw, undecoded, and the transport goes on reading up to
  :data:`HOLD_BYTES`; beyond that it is paused (the rest stays in the socket)
  and the socket is probed every :data:`PROBE_INTERVAL` seconds for the
  client's close (:func:`mqttd.peerclosed.peer_closed`), which a paused
  transport would never read (REVIEW-SEC2 N1: "zombie" connections);
- the keepalive clock stops: time the broker spends not reading is not the
  client's silence [MQTT-3.1.2-24] (REVIEW-SEC2 N2).

A connection that ends while input is held drops it: the packets are counted
in ``BrokerStats.dropped["held-input"]`` and one rate-limited line says how
many.  A DISCONNECT among them still counts [MQTT-3.14.4-3]: the will is
discarded (v5: unless reason 0x04) and its Session Expiry Interval applies
(REVIEW-SEC2 N11).  Held PUBLISHes are not let through unlimited when a
DISCONNECT follows them: that would let any client pass the rate limit by
ending each burst with a DISCONNECT.  When the close was seen by the probe,
the bytes still in the socket are read (at most :data:`DRAIN_BYTES`, for at
most :data:`DRAIN_TIME` seconds) only to find that DISCONNECT; nothing of
them is handled.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd.codec.errors import MQTTError, ReasonCode
from mqttd.codec.packets import MQTT_5, Disconnect, Publish
from mqttd.connstate import _CLOSED
from mqttd.hooks import HOOK_FAILED, HOOK_TIMED_OUT
from mqttd.peerclosed import peer_closed
from mqttd.ratelimit import address_key

__all__ = ["DECODE_SLICE", "DRAIN_BYTES", "DRAIN_TIME", "HOLD_BYTES", "HeldInput", "InputFlow",
           "PROBE_INTERVAL", "TURN_BUDGET", "TURN_CHECK_MASK"]

#: the connection's log lines keep their namespace whichever module of
#: ClientConnection writes them (operators filter on it)
log = Logger(namespace="mqttd.connection")

#: a read longer than this is decoded in slices of it, so a connection whose
#: input blocks holds at most one slice's packets decoded (a 64 KiB read of
#: 5-byte PUBLISHes decodes into ~13,000 objects, ~0.6 MB)
DECODE_SLICE = 8192
#: raw bytes a blocked connection reads ahead (and so can notice the client's
#: close) before its transport is paused
HOLD_BYTES = 65536
#: seconds between two probes for the client's close while the transport is
#: paused at HOLD_BYTES
PROBE_INTERVAL = 1.0
#: after the probe saw the close: bytes still read from the socket, and
#: seconds, looking for a DISCONNECT; beyond either the connection is aborted
DRAIN_BYTES = 256 * 1024
DRAIN_TIME = 5.0
#: seconds of reactor time one connection's packets may take in one turn
#: before the rest waits for the next turn (``callLater(0)``), after the other
#: clients (REVIEW-S9 R8: with 10,000 matching subscriptions a PUBLISH cost
#: ~1 ms, and a 64 KB read of them held the reactor for ~2 s); checked every
#: 16 packets (TURN_CHECK_MASK + 1) and between decoded slices
TURN_BUDGET = 0.01
TURN_CHECK_MASK = 15


class _Queued:
    """``_rate_call`` of a connection waiting for its turn at its host's
    shared inbound bucket (no timer of its own: the turn before it wakes it)."""

    __slots__ = ()

    def active(self) -> bool:
        return False

    def cancel(self) -> None:
        pass


_QUEUED = _Queued()


class HeldInput:
    """What a connection holds while its input is blocked (made on the first
    block, dropped once everything held was handled): raw reads, whether
    the transport is paused, the probe, and the keepalive clock's stop."""

    __slots__ = ("raw", "raw_bytes", "blocked_at", "paused", "probe_call", "throttled",
                 "turn_taken", "dropped", "dropped_publishes", "draining", "drained",
                 "drain_call", "why")

    def __init__(self) -> None:
        #: reads kept undecoded, in order
        self.raw = []
        self.raw_bytes = 0
        #: when input blocked (the keepalive clock is stopped since), or None
        self.blocked_at = None
        #: the transport was paused by us (HOLD_BYTES reached)
        self.paused = False
        self.probe_call = None
        #: this throttled stretch was counted and logged (inbound rate limit)
        self.throttled = False
        #: it took tokens in its current turn at its host's shared bucket
        self.turn_taken = False
        #: packets dropped at the end, and how many were PUBLISHes (counted
        #: once, when the connection ends)
        self.dropped = 0
        self.dropped_publishes = 0
        #: the client closed while we did not read: what is left is only searched
        #: for a DISCONNECT
        self.draining = False
        self.drained = 0
        self.drain_call = None
        #: what blocked input last (for the log line)
        self.why = "read ahead"


class InputFlow:
    """Input blocked, held and resumed: awaited hooks, the inbound rate limit,
    the client's close while not reading, timers."""

    __slots__ = ()

    # --- hooks that may answer later -----------------------------------------------

    def _await(self, result, then, hook: str) -> None:
        """Call ``then(answer)`` with a hook's answer, now or when its Deferred fires.

        While a Deferred is pending, nothing more is read from this connection
        (later packets wait), so acknowledgements keep their order
        [MQTT-4.6.0-2].  A hook that raised, failed or did not answer within
        ``hook_timeout`` answers :data:`~mqttd.hooks.HOOK_FAILED` (a refusal;
        a timed-out ``authenticate``: :data:`~mqttd.hooks.HOOK_TIMED_OUT`),
        with a log line (see :meth:`_hook_failed`).
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
        self._block_input("waiting for a hook's answer")
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
        """The answer a hook that raised, failed or timed out stands for.

        A timeout is an overload, not a bug: no traceback; ``authenticate``
        answers :data:`~mqttd.hooks.HOOK_TIMED_OUT` (the CONNECT's refusal
        line says why), other hooks :data:`~mqttd.hooks.HOOK_FAILED` with one
        rate-limited WARN refusal line ``hook-timeout``.  Anything else is
        logged with its traceback (CRITICAL) and answers ``HOOK_FAILED``."""
        if failure.check(defer.CancelledError, defer.TimeoutError):
            if hook == "authenticate":
                return HOOK_TIMED_OUT
            self.broker.refused(
                "hook-timeout", self.client_id, self.peer,
                f"{hook} gave no answer within {self.broker.config.hook_timeout:g} s; "
                "refusing", hook=hook, why="no answer within the hook timeout")
            return HOOK_FAILED
        why = failure.getErrorMessage() or failure.type.__name__
        log.failure("Hook {hook} failed for {client_id} from {peer}: {why}; refusing",
                    failure, hook=hook, client_id=self.client_id or "-", peer=self.peer,
                    why=why)
        return HOOK_FAILED

    # --- blocked input ------------------------------------------------------------

    def _blocked(self) -> bool:
        return bool(self._held or self._waiting or self._rate_call is not None)

    def _block_input(self, why: str) -> None:
        """Input is blocked (the caller set ``_held``, ``_waiting`` or
        ``_rate_call``): later reads are held, the keepalive clock stops."""
        gate = self._gate
        if gate is None:
            gate = self._gate = HeldInput()
        if gate.blocked_at is None:
            gate.blocked_at = self.clock.seconds()
        gate.why = why

    def _resume_input(self) -> None:
        """A blocker is gone: unless another still blocks, handle what was held
        (decoded first, then the raw reads, slice by slice) until input blocks
        again or everything passed, and read again."""
        if self.state == _CLOSED or self._held or self._waiting or self._rate_call is not None:
            return
        gate = self._gate
        if gate is None:
            return
        if gate.draining:
            return
        if gate.blocked_at is not None:
            # the keepalive clock did not run while the broker was not reading
            now = self.clock.seconds()
            self._last_received = min(now, self._last_received + (now - gate.blocked_at))
            gate.blocked_at = None
        self._run_stash()
        raw = gate.raw
        while raw and self.state != _CLOSED and not self._blocked():
            data = raw.pop(0)
            gate.raw_bytes -= len(data)
            self._take_input(data)
        if self.state == _CLOSED or self._gate is not gate:
            return
        if gate.paused and gate.raw_bytes < HOLD_BYTES // 2:
            gate.paused = False
            if gate.probe_call is not None and gate.probe_call.active():
                gate.probe_call.cancel()
            gate.probe_call = None
            self.transport.resumeProducing()
        if not self._blocked() and not raw and not self._stash:
            if self._bucket is not None:
                self._leave_turns()
            self._gate = None  # everything held was handled

    def _run_stash(self) -> None:
        """Handle the packets decoded before input blocked (through the inbound
        rate limit when there is one)."""
        stash, self._stash = self._stash, ()
        if stash:
            if self._bucket is not None:
                self._admit(list(stash))
            else:
                self._process(stash)

    def _hold_input(self, data: bytes, first: bool = False) -> None:
        """Keep ``data`` undecoded while input is blocked (``first``: it came
        before what is held already); pause reading at :data:`HOLD_BYTES`."""
        gate = self._gate
        if gate is None:
            gate = self._gate = HeldInput()
        if gate.draining:
            self._drain(data)
            return
        if first:
            gate.raw.insert(0, data)
        else:
            gate.raw.append(data)
        gate.raw_bytes += len(data)
        if gate.raw_bytes >= HOLD_BYTES and not gate.paused:
            gate.paused = True
            self.transport.pauseProducing()
            gate.probe_call = self.clock.callLater(PROBE_INTERVAL, self._probe_peer)
        if not self._blocked():
            self._resume_input()  # (reads arriving while held ones are handled)

    def _yield_turn(self) -> None:
        """This connection had its share of the reactor turn: the rest of its
        input is held until the next turn (other clients are served first)."""
        self._waiting += 1
        self._block_input("its share of a reactor turn was used")
        self.clock.callLater(0, self._next_turn_again)

    def _next_turn_again(self) -> None:
        self._waiting -= 1
        self._resume_input()

    @property
    def input_blocked(self) -> bool:
        """True while this connection's input is blocked: packets it sends are
        held, not handled (a hook's answer, a congested subscriber, the inbound
        rate limit)."""
        return self._blocked()

    def held_input(self) -> tuple:
        """``(decoded packets, raw bytes)`` held now."""
        gate = self._gate
        return len(self._stash), gate.raw_bytes if gate is not None else 0

    # --- the client closed while we did not read ------------------------------------

    #: a callable ``() -> Optional[bool]`` answering whether the client closed its
    #: end (tests set one); None: :func:`mqttd.peerclosed.peer_closed` asks the socket
    peer_closed = None

    def _probe_peer(self) -> None:
        gate = self._gate
        if gate is None or self.state == _CLOSED:
            return
        gate.probe_call = None
        if not gate.paused:
            return
        check = self.peer_closed
        closed = check() if check is not None else peer_closed(self.transport)
        if closed is None:
            return  # cannot be told here: the close is read once reading resumes
        if closed:
            self._peer_gone()
            return
        gate.probe_call = self.clock.callLater(PROBE_INTERVAL, self._probe_peer)

    def _peer_gone(self) -> None:
        """The probe saw the client's close behind unread bytes: what is held is
        dropped (a DISCONNECT among it still counts), the socket is read on
        only to find a DISCONNECT, then the connection ends."""
        gate = self._gate
        if self._settle_held_input():
            self._drain_over()  # its DISCONNECT was among what it held
            return
        gate.draining = True
        gate.paused = False
        gate.drain_call = self.clock.callLater(DRAIN_TIME, self._drain_over)
        self.transport.resumeProducing()

    def _drain(self, data: bytes) -> None:
        gate = self._gate
        gate.drained += len(data)
        try:
            packets = self.reader.feed(data)
        except MQTTError as error:
            packets = error.decoded_before
            error.decoded_before = []
            self._held_packets(packets)
            self._drain_over()
            return
        if self._held_packets(packets) or gate.drained >= DRAIN_BYTES:
            self._drain_over()

    def _drain_over(self) -> None:
        gate = self._gate
        if gate is not None:
            call, gate.drain_call = gate.drain_call, None
            if call is not None and call.active():
                call.cancel()
        if self.state != _CLOSED:
            self.state = _CLOSED
            self._online = False
            self._cancel_timers()
            self._release()
            release, self.release_transport = self.release_transport, None
            if release is not None:
                release()
            self.transport.abortConnection()

    def _held_packets(self, packets) -> bool:
        """Count ``packets`` (held, never to be handled) as dropped up to the
        first DISCONNECT, which is honoured; True if there was one."""
        gate = self._gate
        for packet in packets:
            if packet.__class__ is Disconnect:
                self._held_disconnect(packet)
                return True
            gate.dropped += 1
            if packet.__class__ is Publish:
                gate.dropped_publishes += 1
        return False

    def _held_disconnect(self, packet: Disconnect) -> None:
        """A DISCONNECT the client sent but the broker had not handled when the
        connection ended: the will is discarded all the same (v5: unless
        reason 0x04) and its Session Expiry Interval applies [MQTT-3.14.4-3]."""
        if self._will_on_close is False or self.session is None:
            return
        if self.protocol_level == MQTT_5:
            interval = packet.properties.session_expiry_interval
            if interval is not None:
                if not self.session.persistent and interval > 0:
                    return  # [MQTT-3.14.2-2]: a protocol error, not a normal DISCONNECT
                self.broker.session_expiry_changed(self.session, interval)
            self._will_on_close = packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL
        else:
            self._will_on_close = False
        self._close_reason = "disconnect"

    def _settle_held_input(self) -> bool:
        """The connection ends: drop what it holds (decoding what is raw), up to
        a DISCONNECT, which is honoured; True if there was one.  The count is
        reported by :meth:`_report_dropped`."""
        gate = self._gate
        stash, self._stash = self._stash, ()
        if gate is None:
            if not stash:
                return False
            gate = self._gate = HeldInput()
        raw, gate.raw = gate.raw, []
        gate.raw_bytes = 0
        if self._held_packets(stash):
            return True
        reader = self.reader
        for data in raw:
            try:
                packets = reader.feed(data)
            except MQTTError as error:
                found = self._held_packets(error.decoded_before)
                error.decoded_before = []
                return found
            if self._held_packets(packets):
                return True
        return False

    def settle_input(self) -> bool:
        """The broker takes this connection's session over: settle what it holds
        (see :meth:`_settle_held_input`).  False if the client had sent a
        DISCONNECT that discards its will, or if its inbound bucket cannot pay
        for the will (:meth:`_will_affordable`), else True."""
        self._settle_held_input()
        if self._will_on_close is False and self._close_reason == "disconnect":
            return False
        return self._will_affordable()

    def _will_affordable(self) -> bool:
        """A will is a PUBLISH of its client: under ``--max-inbound-rate`` it is
        charged to the client's bucket when it is to be published -- it may
        overdraw the bucket, but not one in debt already: then it is dropped
        (counted ``dropped["inbound-rate-will"]``, one rate-limited line).
        Uncharged, connecting with a will and dropping the socket published
        170 wills/s at a limit of 5/s (REVIEW-S9 R14)."""
        bucket = self._bucket
        session = self.session
        will = session.will if session is not None else None
        if bucket is None or will is None:
            return True
        size = len(will.topic.encode("utf-8", "surrogatepass")) + len(will.payload) + 4
        now = self.clock.seconds()
        if not bucket.take(size, now) or bucket.overdraw(size, now):
            return True
        dropped = self._stats.dropped
        dropped["inbound-rate-will"] = dropped.get("inbound-rate-will", 0) + 1
        self.broker.refused("inbound-rate", self.client_id, self.peer,
                            f"will to {will.topic[:100]!r} over the inbound rate limit "
                            f"({bucket.rate:g} PUBLISH/s, {bucket.bytes_rate:g} bytes/s); "
                            "not published")
        return False

    def _report_dropped(self) -> None:
        """One count and one line (rate-limited) for what the closed connection
        held; the held state is gone afterwards."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        for call in (gate.probe_call, gate.drain_call):
            if call is not None and call.active():
                call.cancel()
        gate.raw = []
        if gate.dropped:
            if gate.dropped_publishes:  # messages that never reached a session
                dropped = self._stats.dropped
                dropped["held-input"] = dropped.get("held-input", 0) + gate.dropped_publishes
            self._warn("held-input",
                       "Closed {client_id} from {peer} with {count} packets it had sent not "
                       "handled yet ({publishes} PUBLISH; {why}); dropped",
                       client_id=self.client_id or "-", peer=self.peer, count=gate.dropped,
                       publishes=gate.dropped_publishes, why=gate.why)

    # --- inbound rate limit (token bucket; backpressure, not disconnect) -------------

    def _admit(self, packets: list) -> None:
        """Handle ``packets`` one by one while the inbound bucket affords each
        PUBLISH; at the first it does not, keep it and the rest (decoded, in
        order), block input and come back when the bucket has refilled.

        So the limit bounds what reaches subscribers even inside one read of
        many packets: at most one second's worth passes at once (the bucket's
        depth), then the configured rate.  Other packets (acknowledgements,
        PINGREQ, ...) are not charged but keep their place in the order.
        """
        bucket = self._bucket
        clock = self.clock
        queue = bucket.waiters
        for index, packet in enumerate(packets):
            if self.state == _CLOSED:
                return
            if self._held or self._waiting:
                self._stash = packets[index:] + list(self._stash)
                if len(queue) > 1 and queue[0] is self:
                    self._pass_turn()  # blocked otherwise: not a turn to keep
                return
            if packet.__class__ is Publish:
                if queue and queue[0] is not self:
                    # other connections of this host wait for the shared bucket
                    # first: this one takes its turn after them
                    self._stash = packets[index:] + list(self._stash)
                    if self not in queue:
                        queue.append(self)
                    self._rate_pause(None)
                    return
                raw = packet.raw
                wait = bucket.take(len(raw) if raw is not None else len(packet.payload),
                                   clock.seconds())
                if wait:
                    self._stash = packets[index:] + list(self._stash)
                    if not queue:
                        queue.append(self)
                    elif self._gate is not None and self._gate.turn_taken and len(queue) > 1:
                        self._pass_turn()
                        return
                    self._rate_pause(wait)
                    return
                if queue and self._gate is not None:  # the head: others may wait behind it
                    self._gate.turn_taken = True
            self._process((packet,))

    def _rate_pause(self, wait) -> None:
        """Block input for ``wait`` seconds (the bucket refills), or with
        ``wait`` None until this connection's turn at its host's bucket."""
        bucket = self._bucket
        self._rate_call = (_QUEUED if wait is None else
                           self.clock.callLater(wait, self._rate_resume))
        self._block_input("held by the inbound rate limit")
        gate = self._gate
        gate.turn_taken = False
        if not gate.throttled:
            gate.throttled = True  # one count and line per throttled stretch
            self.broker.refused("inbound-rate", self.client_id, self.peer,
                                f"over the inbound rate limit ({bucket.rate:g} PUBLISH/s, "
                                f"{bucket.bytes_rate:g} bytes/s); input held")

    def _rate_resume(self) -> None:
        self._rate_call = None
        self._resume_input()

    # Connections of one host share its bucket and take turns (FIFO): only the
    # head of ``bucket.waiters`` takes tokens and has a timer; once it took some
    # and the bucket is empty again, or it blocks for another reason, it goes
    # to the back and the next one's turn starts.  Without turns the first
    # timer to fire would take every refill (one connection got 110 of 110
    # messages, the two others none).

    def _pass_turn(self) -> None:
        """The head's turn at the shared bucket is over: to the back of the queue."""
        queue = self._bucket.waiters
        queue.popleft()
        queue.append(self)
        if self._rate_call is None or self._rate_call is _QUEUED:
            self._rate_pause(None)
        queue[0]._take_turn()

    def _take_turn(self) -> None:
        """It is this connection's turn at its host's bucket (it is the head)."""
        if self._rate_call is _QUEUED and self.state != _CLOSED:
            self._rate_call = self.clock.callLater(0, self._rate_resume)
            if self._gate is not None:
                self._gate.turn_taken = False

    def _leave_turns(self) -> None:
        """Nothing waits for the bucket any more (everything held was handled,
        or the connection ends): out of the queue; the next one's turn."""
        bucket = self._bucket
        if bucket is None or not bucket.waiters:
            return
        queue = bucket.waiters
        if queue[0] is self:
            queue.popleft()
            if queue:
                queue[0]._take_turn()
        elif self in queue:
            queue.remove(self)

    def _host_key(self) -> str:
        """The inbound bucket is shared by the live connections of this host
        (for IPv6: of its /64, see :func:`mqttd.ratelimit.address_key`)."""
        return address_key(self.peer)

    def _connect_timeout(self) -> None:
        self._connect_call = None
        self._warn("connect-timeout", "No CONNECT from {peer} within {timeout} s; closing",
                   peer=self.peer, timeout=self.broker.config.connect_timeout)
        self._close("connect timeout")

    def _check_keepalive(self) -> None:
        self._keepalive_call = None
        if self.state == _CLOSED:
            return
        gate = self._gate
        if gate is not None and gate.blocked_at is not None:
            # the broker is not reading or not handling this client's input (a
            # hook's answer, a congested subscriber, the inbound rate limit):
            # that is not the client's silence [MQTT-3.1.2-24]; the clock
            # goes on, shifted by the time blocked, once input resumes
            self._keepalive_call = self.clock.callLater(self._keepalive,
                                                        self._check_keepalive)
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
