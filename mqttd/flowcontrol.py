"""Fair slow-consumer handling: which subscriber may hold publishers back, and for how long.

Layer L3 (no transport, no global reactor: the clock is injected).

An online subscriber whose queue passes the high-water mark is *congested*.
To lose nothing for a subscriber that is merely slow, the broker stops reading
from the publishers that feed it (their TCP windows fill, they slow down)
until its queue is back at the low-water mark.  That pause costs every other
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

from typing import Dict, List

from twisted.logger import Logger

log = Logger(namespace="mqttd.flowcontrol")


class SlowConsumerGuard:
    """The state machine above, for every session of one broker.

    :param clock: ``IReactorTime``.
    :param budget: seconds one congestion episode may hold publishers (0: never hold).
    :param recovery: seconds a demoted subscriber must stay healthy, after its
        queue was empty, before it may hold publishers again (>= 0).
    :param stats: a :class:`~mqttd.metrics.BrokerStats` (``publisher_holds``,
        ``slow_subscribers_demoted`` are counted).
    :param enabled: False: nobody is ever held (``--no-publisher-backpressure``).
    """

    def __init__(self, clock, budget: float, recovery: float, stats, enabled: bool = True):
        if budget < 0:
            raise ValueError(f"max_publisher_pause must be >= 0, not {budget!r}")
        if recovery < 0:
            raise ValueError(f"publisher_pause_recovery must be >= 0, not {recovery!r}")
        self.clock = clock
        self.budget = budget
        self.recovery = recovery
        self.stats = stats
        self.enabled = enabled and budget > 0
        #: sessions in a holding episode
        self.holding: set = set()
        self._held: List[object] = []
        self._timers: Dict[object, object] = {}
        self._release_call = None

    # --- transitions -------------------------------------------------------------

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

    def drained(self, session, queued: int, low_water: int) -> None:
        """Called after ``session``'s queue shrank to ``queued`` messages."""
        if session.congested_since is not None and queued <= low_water:
            self.decongested(session)
        if session.demoted_since is not None and queued == 0 and session.healthy_since is None:
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


__all__ = ["SlowConsumerGuard"]
