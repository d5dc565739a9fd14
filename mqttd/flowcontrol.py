"""Fair slow-consumer handling: which subscriber may hold publishers back, and for how long.

Layer L3 (no transport, no global reactor: the clock is injected).

An online subscriber whose queue passes the high-water mark is *congested*.
To lose nothing for a subscriber that is merely slow, the broker holds the
input of the publishers that feed it (read ahead up to a bound, then not read:
their TCP windows fill, they slow down; see mqttd.inflow)
until its queue is back at the low-water mark.  Both marks are pairs
(messages, bytes) held by one :class:`Watermarks`: the queue is over the
high-water mark when *either* count reaches its mark, and back at the
low-water mark only when *both* are at or below theirs -- so whatever started
an episode (many small messages or a few large ones) is also what must drain
to end it, and an episode can never end while its own start condition still
holds.  That pause costs every other
subscriber of those publishers a gap, so it is bounded:

``holding``
    the congestion episode started at ``session.congested_since``; publishers
    that feed the session are held.  The episode ends when the queue drains
    to the low-water mark (the subscriber was merely slow: back to
    ``healthy``), or after ``budget`` seconds (``--max-publisher-pause``).
``demoted``
    the budget ran out without draining (the subscriber is frozen or far
    too slow).  It holds no one; its queue overflows by the overflow policy
    (drops counted by reason ``queue-full`` and logged).  Catching up a little
    does *not* re-arm the hold: it stays demoted until its queue has been
    **empty** and then stayed below the high-water mark for ``recovery``
    seconds (``--publisher-pause-recovery``).  Passing the high-water mark
    again before that restarts the healthy period.
``healthy``
    none of the above.

So a subscriber that freezes, drains, freezes again costs the others one gap
of at most ``budget`` seconds per ``recovery`` period, not one per freeze.
The state lives on the :class:`~mqttd.session.Session` (``congested_since``,
``demoted_since``, ``healthy_since``), so a demoted client that reconnects is
still demoted until it has drained.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import attrs
from twisted.logger import Logger

log = Logger(namespace="mqttd.flowcontrol")


def _positive(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, not {value!r}")


@attrs.frozen
class Watermarks:
    """High- and low-water marks of a subscriber's queue, in messages and bytes.

    :param high: messages at which a queue is congested (>= 1).
    :param low: messages at or below which a congested queue has drained (>= 0, < ``high``).
    :param high_bytes: queued payload bytes at which a queue is congested (>= 1).
    :param low_bytes: bytes at or below which it has drained (>= 0, < ``high_bytes``).
    :raises ValueError: for marks out of these ranges.
    """

    high: int = attrs.field(validator=_positive)
    low: int = attrs.field()
    high_bytes: int = attrs.field(validator=_positive)
    low_bytes: int = attrs.field()

    @low.validator
    def _check_low(self, attribute, value) -> None:
        if not 0 <= value < self.high:
            raise ValueError(f"low must be in [0, high={self.high}), not {value!r}")

    @low_bytes.validator
    def _check_low_bytes(self, attribute, value) -> None:
        if not 0 <= value < self.high_bytes:
            raise ValueError(f"low_bytes must be in [0, high_bytes={self.high_bytes}), "
                             f"not {value!r}")

    @classmethod
    def for_limits(cls, max_queued_messages: int, max_queued_bytes: int) -> "Watermarks":
        """The broker's marks: high at half the queue limits (at most 1000 messages,
        1 MiB), low at half the high marks."""
        high = max(1, min(max_queued_messages // 2, 1000))
        high_bytes = max(1, min(max_queued_bytes // 2, 1024 * 1024))
        return cls(high, high // 2, high_bytes, high_bytes // 2)

    def over_high(self, session) -> bool:
        """``session``'s queue has reached the high-water mark in messages or in bytes."""
        return len(session.queue) >= self.high or session.queued_bytes >= self.high_bytes

    def at_low(self, session) -> bool:
        """``session``'s queue is at or below the low-water mark in messages *and* bytes."""
        return len(session.queue) <= self.low and session.queued_bytes <= self.low_bytes


class SlowConsumerGuard:
    """The state machine above, for every session of one broker.

    :param clock: ``IReactorTime``.
    :param budget: seconds one congestion episode may hold publishers (0: never hold).
    :param recovery: seconds a demoted subscriber must stay healthy, after its
        queue was empty, before it may hold publishers again (>= 0).
    :param stats: a :class:`~mqttd.metrics.BrokerStats` (``publisher_holds``,
        ``slow_subscribers_demoted`` are counted).
    :param enabled: False: nobody is ever held (``--no-publisher-backpressure``).
    :param watermarks: when a queue is congested and when it has drained
        (default: :meth:`Watermarks.for_limits` of the broker's default limits).
    """

    def __init__(self, clock, budget: float, recovery: float, stats, enabled: bool = True,
                 watermarks: Optional[Watermarks] = None):
        if budget < 0:
            raise ValueError(f"max_publisher_pause must be >= 0, not {budget!r}")
        if recovery < 0:
            raise ValueError(f"publisher_pause_recovery must be >= 0, not {recovery!r}")
        self.clock = clock
        self.budget = budget
        self.recovery = recovery
        self.stats = stats
        self.enabled = enabled and budget > 0
        self.watermarks = (watermarks if watermarks is not None
                           else Watermarks.for_limits(100_000, 64 * 1024 * 1024))
        #: sessions in a holding episode
        self.holding: set = set()
        self._held: List[object] = []
        self._timers: Dict[object, object] = {}
        self._release_call = None

    # --- transitions -------------------------------------------------------------

    def routed(self, session) -> bool:
        """A message was queued for the online ``session``.

        Returns True if its publisher must be held back: the queue is over the
        high-water mark (messages or bytes) and a holding episode is running
        or starts now (see :meth:`congested`).
        """
        if not self.watermarks.over_high(session):
            return False
        return self.congested(session)

    def congested(self, session) -> bool:
        """``session``'s queue is at or over the high-water mark.

        Returns True if the publisher of the message just routed to it must
        be held back (a holding episode is running or starts now).
        """
        if not self.enabled:
            return False
        if session.congested_since is not None:
            return True
        now = self.clock.seconds()
        if session.demoted_since is not None:
            healthy = session.healthy_since
            if healthy is None or now - healthy < self.recovery:
                session.healthy_since = None   # not healthy: the period starts over
                return False
            log.info("Subscriber {client_id} drained and stayed healthy for {seconds:.1f} s; "
                     "it may hold publishers back again", client_id=session.client_id,
                     seconds=now - healthy)
            session.demoted_since = session.healthy_since = None
        session.congested_since = now
        self.holding.add(session)
        self._timers[session] = self.clock.callLater(self.budget, self._budget_spent, session)
        self.stats.publisher_holds += 1
        return True

    def drained(self, session) -> None:
        """Called after ``session``'s queue may have shrunk.

        Ends a holding episode only when the queue is at the low-water mark in
        messages *and* bytes (:meth:`Watermarks.at_low`); starts a demoted
        subscriber's healthy period when its queue is empty.
        """
        if session.congested_since is not None and self.watermarks.at_low(session):
            self.decongested(session)
        if (session.demoted_since is not None and not session.queue
                and session.healthy_since is None):
            session.healthy_since = self.clock.seconds()

    def decongested(self, session) -> None:
        """End ``session``'s holding episode (drained, or its connection went away)."""
        timer = self._timers.pop(session, None)
        if timer is not None and timer.active():
            timer.cancel()
        session.congested_since = None
        self.holding.discard(session)
        self._maybe_release()

    def _budget_spent(self, session) -> None:
        self._timers.pop(session, None)
        if session.congested_since is None:
            return
        now = self.clock.seconds()
        session.congested_since = None
        session.demoted_since = now
        session.healthy_since = None
        self.holding.discard(session)
        self.stats.slow_subscribers_demoted += 1
        # once per demotion, and a demotion happens at most once per
        # recovery period per session: rate-limited by construction
        log.warn("Subscriber {client_id} held publishers back for {budget} s without "
                 "draining ({queued} queued); it holds no one until its queue has drained "
                 "and stayed healthy for {recovery} s, and overflows by policy meanwhile",
                 client_id=session.client_id, budget=self.budget,
                 queued=len(session.queue), recovery=self.recovery)
        self._maybe_release()

    # --- held publishers -------------------------------------------------------------

    def hold(self, connection) -> None:
        """Remember a publisher connection that paused reading; it gets
        ``release_publisher()`` once no session is holding any more."""
        self._held.append(connection)

    @property
    def held(self) -> int:
        return len(self._held)

    def _maybe_release(self) -> None:
        if not self.holding and self._held and self._release_call is None:
            # next turn: never run a publisher's stashed packets inside the
            # handler of the subscriber packet that freed the queue
            self._release_call = self.clock.callLater(0, self._release)

    def _release(self) -> None:
        self._release_call = None
        if self.holding:
            return  # a new episode started meanwhile
        held, self._held = self._held, []
        for conn in held:
            conn.release_publisher()

    def release_all(self) -> None:
        """Release every held publisher and end every episode (shutdown)."""
        for session in list(self.holding):
            self.decongested(session)
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._release_call = None
        held, self._held = self._held, []
        for conn in held:
            conn.release_publisher()


__all__ = ["SlowConsumerGuard", "Watermarks"]
