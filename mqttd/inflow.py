"""When a client connection reads (layer L3).

:class:`InputFlow` is one part of :class:`mqttd.connection.ClientConnection`
(a mixin with ``__slots__ = ()``): hooks whose Deferred answer is awaited with
input paused (so acknowledgements keep their order [MQTT-4.6.0-2]), the stash of
packets read meanwhile, the inbound rate limit (``--max-inbound-rate``: reads
paused, never a disconnect), and the CONNECT and keepalive timers
[MQTT-3.1.2-22, MQTT-3.1.2-24].
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd.codec.errors import MQTTError, ReasonCode
from mqttd.codec.packets import Publish
from mqttd.connstate import _CLOSED, _peer_host
from mqttd.hooks import HOOK_FAILED, HOOK_TIMED_OUT

__all__ = ["InputFlow"]

#: the connection's log lines keep their namespace whichever module of
#: ClientConnection writes them (operators filter on it)
log = Logger(namespace="mqttd.connection")


class InputFlow:
    """Input paused and resumed: awaited hooks, the inbound rate limit, timers."""

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
        self.transport.pauseProducing()
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

    def _resume_input(self) -> None:
        """Process what waited for a hook, then read again (unless still blocked)."""
        if self._waiting or self._held or self.state == _CLOSED:
            return
        self._last_received = self.clock.seconds()  # we were not reading
        self._run_stash()
        if not (self._waiting or self._held or self._rate_call) and self.state != _CLOSED:
            self.transport.resumeProducing()

    def _run_stash(self) -> None:
        """Handle the packets read while input was blocked (through the inbound
        rate limit when there is one)."""
        stash, self._stash = self._stash, ()
        if stash:
            if self._bucket is not None:
                self._admit(list(stash))
            else:
                self._process(stash)

    # --- inbound rate limit (token bucket; backpressure, not disconnect) -------------

    def _admit(self, packets: list) -> None:
        """Handle ``packets`` one by one while the inbound bucket affords each
        PUBLISH; at the first it does not, keep it and the rest (decoded, in
        order), pause reading and come back when the bucket has refilled.

        So the limit bounds what reaches subscribers even inside one read of
        many packets: at most one second's worth passes at once (the bucket's
        depth), then the configured rate.  Other packets (acknowledgements,
        PINGREQ, ...) are not charged but keep their place in the order.
        """
        bucket = self._bucket
        clock = self.clock
        for index, packet in enumerate(packets):
            if self.state == _CLOSED:
                return
            if self._held or self._waiting:
                self._stash = packets[index:] + list(self._stash)
                return
            if packet.__class__ is Publish:
                raw = packet.raw
                wait = bucket.take(len(raw) if raw is not None else len(packet.payload),
                                   clock.seconds())
                if wait:
                    self._stash = packets[index:] + list(self._stash)
                    self._rate_pause(wait)
                    return
            self._process((packet,))

    def _rate_pause(self, wait: float) -> None:
        bucket = self._bucket
        if not bucket.throttled:
            bucket.throttled = True  # one count and line per throttled stretch
            self.broker.refused("inbound-rate", self.client_id, self.peer,
                                f"over the inbound rate limit ({bucket.rate:g} PUBLISH/s, "
                                f"{bucket.bytes_rate:g} bytes/s); reads paused")
        self.transport.pauseProducing()
        self._rate_call = self.clock.callLater(wait, self._rate_resume)

    def _rate_resume(self) -> None:
        self._rate_call = None
        if self.state == _CLOSED or self._held or self._waiting:
            return
        self._run_stash()
        if self.state != _CLOSED and not (self._held or self._waiting or self._rate_call):
            self._bucket.throttled = False
            self.transport.resumeProducing()

    def _bucket_keys(self) -> tuple:
        """Where the inbound bucket is remembered: client id and peer host."""
        return (("client", self.client_id), ("host", _peer_host(self.peer)))

    def _connect_timeout(self) -> None:
        self._connect_call = None
        self._warn("connect-timeout", "No CONNECT from {peer} within {timeout} s; closing",
                   peer=self.peer, timeout=self.broker.config.connect_timeout)
        self._close("connect timeout")

    def _check_keepalive(self) -> None:
        self._keepalive_call = None
        if self.state == _CLOSED:
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
