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
    again before that restarts the healthy period.  A subscriber whose
    connection goes away while holding is demoted too (and its identities
    spent, see below), and so is one that becomes congested while one of its
    identities is spent.
``healthy``
    none of the above.

So a subscriber that freezes, drains, freezes again costs the others one gap
of at most ``budget`` seconds per ``recovery`` period, not one per freeze.
The state lives on the :class:`~mqttd.session.Session` (``congested_since``,
``demoted_since``, ``healthy_since``), so a demoted client that reconnects is
still demoted until it has drained.

The budget belongs to the subscriber's *identities*, not to one connection
or session (REVIEW-S9 R6: a subscriber that never read and reconnected every
6 s, under a new client id or the same clean one, got a fresh pause each
time and stopped its publishers 75-80 % of the time).  Its identities are
its client id, its user name when the broker authenticated it (every
subscriber without one shares the single identity :data:`ANONYMOUS`: the
broker cannot tell such subscribers apart, REVIEW-S10 S2), its address (the
host; an IPv6 address's /64) and that address's network (/24; IPv6 /48):
a :class:`PauseLedger` remembers
each identity that used up a budget -- by running out (demotion) or by going
away while holding publishers (a disconnect, a takeover) -- for ``recovery``
seconds.  A congested subscriber with any identity in the ledger holds no
one: it is demoted at once.  When an identity enters the ledger, every other
subscriber holding publishers under it is demoted too.  So one address (or
user, or client id) stops the publishers at most once per ``recovery``
period, whatever client ids it connects with and however often it
reconnects.  An episode that ends because the queue drained charges nothing
(a merely slow subscriber keeps the protection).
"""
from __future__ import annotations

import collections
import ipaddress
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import attrs
from twisted.logger import Logger

from mqttd.ratelimit import enclosing_network, memory_key, network_key, peer_host

log = Logger(namespace="mqttd.flowcontrol")


def _positive(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, not {value!r}")


@attrs.frozen
class Watermarks:
    """High- and low-water marks of a subscriber's queue, in messages and bytes.

    :param high: messages at which a queue is congested (>= 1).
    :param low: messages at or below which a congested queue has drained (>= 0, < ``high``).
    :param high_bytes: queued bytes (topic + payload + properties, see
        :func:`~mqttd.messages.message_size`) at which a queue is congested (>= 1).
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


def address_identity(peer) -> Optional[Tuple[str, str]]:
    """The ledger key of a connection's address: ``("host", host)``, for IPv6
    its /64 network (one site usually has a whole /64, so a new address from
    it is not a new subscriber; :func:`mqttd.ratelimit.network_key`), a mapped
    IPv4 as the IPv4; None when the peer is unknown."""
    if not peer:
        return None
    host = peer_host(peer)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return ("host", host)       # a UNIX socket, a name: kept whole
    if address.version == 6 and address.ipv4_mapped is not None:
        return ("host", str(address.ipv4_mapped))
    return ("host", network_key(host))


def network_identity(peer) -> Optional[Tuple[str, str]]:
    """The ledger key of the network around a connection's address:
    ``("network", "a.b.c.0/24")``, for IPv6 its /48
    (:func:`mqttd.ratelimit.enclosing_network`); None for a UNIX socket, a
    name or an unknown peer.  New addresses from one network are cheap to get
    (REVIEW-S10 S2: a subscriber reconnecting from 127.0.50.N, a new N each
    time, got a fresh budget each time)."""
    if not peer:
        return None
    network = enclosing_network(peer_host(peer))
    return None if network is None else ("network", network)


#: the one identity every subscriber without a checked user name shares: an
#: address can be changed at will (many /24s, a /32 of IPv6), so subscribers
#: the broker cannot tell apart spend one budget together (REVIEW-S10 S2)
ANONYMOUS = ("anonymous", "*")


def session_identities(session, authenticated: bool = True) -> Tuple[Tuple[str, str], ...]:
    """The identities whose pause budget ``session``'s holds spend, most
    specific first (the order a spent one is looked for and named in the log):
    ``("client", client id)``; ``("user", user name)`` if ``authenticated``
    (a name no one checked could be anybody's, so claiming it must not spend
    the budget of its owner); :func:`address_identity` and
    :func:`network_identity` of its connection's peer; and for a subscriber
    without a checked user name :data:`ANONYMOUS`, which all of them share."""
    keys = [("client", memory_key(session.client_id))]   # a long id: its digest
    owner = getattr(session, "owner", None)
    checked = authenticated and owner is not None
    if checked:
        keys.append(("user", memory_key(owner)))
    peer = getattr(getattr(session, "info", None), "peer", None)
    address = address_identity(peer)
    if address is not None:
        keys.append(address)
    network = network_identity(peer)
    if network is not None:
        keys.append(network)
    if not checked:
        keys.append(ANONYMOUS)
    return tuple(keys)


class PauseLedger:
    """Identities that used up a publisher-pause budget, each for ``recovery`` s.

    Bounded: entries are forgotten ``recovery`` seconds after they were
    (last) spent, and at most ``max_entries`` are kept -- beyond that the
    oldest go first (``evicted`` counts them: filling the table needs that
    many identities each holding publishers for a whole budget).

    :param recovery: seconds an identity stays spent (>= 0; 0 keeps nothing).
    :param max_entries: entries kept at most (>= 1).
    """

    def __init__(self, recovery: float, max_entries: int = 20_000):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries!r}")
        self.recovery = recovery
        self.max_entries = max_entries
        #: key -> [time spent, logged]; in time order (a key spent again moves last)
        self._spent: "collections.OrderedDict[Hashable, list]" = collections.OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._spent)

    def _forget_expired(self, now: float) -> None:
        spent = self._spent
        horizon = now - self.recovery
        while spent:
            first = next(iter(spent.values()))
            if first[0] > horizon:
                break
            spent.popitem(last=False)

    def spent(self, keys, now: float):
        """The first of ``keys`` spent less than ``recovery`` s ago, or None."""
        self._forget_expired(now)
        spent = self._spent
        for key in keys:
            if key in spent:
                return key
        return None

    def first_notice(self, key) -> bool:
        """True once per time ``key`` was spent (for one log line each)."""
        entry = self._spent.get(key)
        if entry is None or entry[1]:
            return False
        entry[1] = True
        return True

    def record(self, keys, now: float) -> None:
        """``keys`` used up a budget at ``now``."""
        if self.recovery <= 0:
            return
        spent = self._spent
        for key in keys:
            spent.pop(key, None)
            spent[key] = [now, False]
        self._forget_expired(now)
        while len(spent) > self.max_entries:
            spent.popitem(last=False)
            self.evicted += 1


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
    :param identities: ``identities(session) -> tuple`` of the keys whose
        budget the session's holds spend, most specific first (default
        :func:`session_identities`).
    :param max_identities: entries of the :class:`PauseLedger` at most.
    """

    def __init__(self, clock, budget: float, recovery: float, stats, enabled: bool = True,
                 watermarks: Optional[Watermarks] = None,
                 identities: Optional[Callable[[object], tuple]] = None,
                 max_identities: int = 20_000):
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
        self._identities = identities if identities is not None else session_identities
        #: identities that used up a budget within the last ``recovery`` seconds
        self.ledger = PauseLedger(recovery, max_identities)
        #: holding session -> its identities; identity -> the sessions holding under it
        self._keys: Dict[object, tuple] = {}
        self._by_key: Dict[Hashable, set] = {}

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
        keys = self._identities(session)
        spent = self.ledger.spent(keys, now)
        if spent is not None:
            # this client id, user or address held publishers for a whole
            # budget (or went away holding them) less than recovery s ago:
            # a new connection or client id does not renew it
            self._demote(session, now)
            self.stats.slow_subscribers_demoted += 1
            if self.ledger.first_notice(spent):
                log.warn("Subscriber {client_id} is congested but holds no publishers: "
                         "its {kind} {identity} used up its pause less than {recovery} s "
                         "ago; its queue fills to its limits, then overflows by policy",
                         client_id=session.client_id, kind=spent[0], identity=spent[1],
                         recovery=self.recovery)
            return False
        session.congested_since = now
        self.holding.add(session)
        self._keys[session] = keys
        by_key = self._by_key
        for key in keys:
            holders = by_key.get(key)
            if holders is None:
                by_key[key] = {session}
            else:
                holders.add(session)
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
        """End ``session``'s holding episode: its queue drained (nothing is
        charged), or the broker shuts down."""
        self._end_episode(session)
        self._maybe_release()

    def abandoned(self, session) -> None:
        """``session``'s connection went away (disconnect, takeover) while it
        held publishers: the episode ends and spends its identities' budget,
        as running out would (else reconnecting would renew it)."""
        if session.congested_since is None:
            return
        now = self.clock.seconds()
        held = now - session.congested_since
        keys = self._keys.get(session, ())
        self._end_episode(session)
        self._demote(session, now)
        self.stats.slow_subscribers_demoted += 1
        # at most once per identity and recovery period: an identity in the
        # ledger never starts another episode
        log.warn("Subscriber {client_id} went away after holding publishers back for "
                 "{held:.1f} s without draining; its client id, user and address hold no "
                 "one for {recovery} s", client_id=session.client_id, held=held,
                 recovery=self.recovery)
        self._spend(session, keys, now)
        self._maybe_release()

    def _end_episode(self, session) -> None:
        timer = self._timers.pop(session, None)
        if timer is not None and timer.active():
            timer.cancel()
        session.congested_since = None
        self.holding.discard(session)
        by_key = self._by_key
        for key in self._keys.pop(session, ()):
            holders = by_key.get(key)
            if holders is not None:
                holders.discard(session)
                if not holders:
                    del by_key[key]

    @staticmethod
    def _demote(session, now: float) -> None:
        session.demoted_since = now
        session.healthy_since = None

    def _spend(self, session, keys, now: float) -> None:
        """Put ``keys`` in the ledger and demote every other subscriber
        holding publishers under one of them (same address, user...), and
        under theirs in turn: a worklist, not recursion, as one address may
        have thousands of subscribers holding at once.  One log line for all
        of those (each demotion is counted)."""
        ledger = self.ledger
        ledger.record(keys, now)
        work = list(keys)
        first = None
        count = 0
        while work:
            key = work.pop()
            holders = self._by_key.get(key)
            if not holders:
                continue
            for other in list(holders):
                if other.congested_since is None:
                    continue
                other_keys = self._keys.get(other, ())
                self._end_episode(other)
                self._demote(other, now)
                self.stats.slow_subscribers_demoted += 1
                ledger.record(other_keys, now)
                work.extend(other_keys)
                if first is None:
                    first = (other, key)
                count += 1
        if count:
            other, key = first
            log.warn("{count} more subscribers ({client_id}...) stop holding publishers back: "
                     "the {kind} {identity} they share with {spender} used up its pause; they "
                     "queue to their limits, then overflow by policy", count=count,
                     client_id=other.client_id, kind=key[0], identity=key[1],
                     spender=session.client_id)

    def _budget_spent(self, session) -> None:
        self._timers.pop(session, None)
        if session.congested_since is None:
            return
        now = self.clock.seconds()
        keys = self._keys.get(session, ())
        self._end_episode(session)
        self._demote(session, now)
        self.stats.slow_subscribers_demoted += 1
        # once per demotion, and a demotion happens at most once per
        # recovery period per identity: rate-limited by construction
        log.warn("Subscriber {client_id} held publishers back for {budget} s without "
                 "draining ({queued} queued); it holds no one until its queue has "
                 "drained and stayed healthy for {recovery} s (nor does its client id, "
                 "user or address for {recovery} s), and overflows by policy meanwhile",
                 client_id=session.client_id, budget=self.budget,
                 queued=len(session.queue), recovery=self.recovery)
        self._spend(session, keys, now)
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


__all__ = ["ANONYMOUS", "PauseLedger", "SlowConsumerGuard", "Watermarks",
           "address_identity", "network_identity", "session_identities"]
