"""Rate limits for log lines that clients can trigger (layer L1).

A client that sends 140,000 malformed packets, refused publishes or wrong
passwords must not write 140,000 log lines.  :class:`LogRateLimiter` lets the
first ``burst`` lines per key (a client and a reason) through in every window
of ``interval`` seconds, counts the rest, and hands the count of suppressed
lines to the next line that passes, so nothing is silently lost::

    limiter = LogRateLimiter(clock)
    limiter.warn(log, ("c1", "malformed"), "Closing {client_id}: {error}",
                 client_id="c1", error="...")

logs ``Closing c1: ...`` and, after a suppressed stretch,
``Closing c1: ... (12 similar lines suppressed)`` with the named field
``suppressed=12``.  A second bound per reason (``reason_burst`` lines per
window over all keys) stops a flood spread over many client ids or peers.
Memory is bounded: at most ``max_keys`` keys are tracked (the oldest windows
are forgotten first).

The broker owns one instance (``Broker.log_limiter``); features (auth, ACL,
bridges) call it for their own client-triggered lines.
"""
from __future__ import annotations

import collections
import hashlib
import ipaddress
from typing import Callable, Dict, Hashable, Optional

#: seconds per window
DEFAULT_INTERVAL = 10.0
#: lines per key per window
DEFAULT_BURST = 3
#: lines per reason per window, over all keys
DEFAULT_REASON_BURST = 50
#: keys tracked at most
DEFAULT_MAX_KEYS = 10_000


class _Window:
    __slots__ = ("start", "passed", "suppressed")

    def __init__(self, start: float):
        self.start = start
        self.passed = 0
        self.suppressed = 0


def _reason_of(key: Hashable):
    """The reason part of a key: its last element if it is a tuple."""
    return key[-1] if isinstance(key, tuple) and key else key


class LogRateLimiter:
    """Fixed-window limiter of log lines per key and per reason.

    :param clock: ``IReactorTime`` (only ``seconds()`` is used).
    :param interval: window length in seconds (> 0).
    :param burst: lines let through per key per window (>= 1).
    :param reason_burst: lines let through per reason (the key's last element
        when the key is a tuple) per window, over all keys; ``None``: no bound.
    :param max_keys: windows kept at most; beyond it the oldest are dropped
        (their suppressed counts are then reported under the reason bound).
    """

    def __init__(self, clock, interval: float = DEFAULT_INTERVAL,
                 burst: int = DEFAULT_BURST,
                 reason_burst: Optional[int] = DEFAULT_REASON_BURST,
                 max_keys: int = DEFAULT_MAX_KEYS):
        if interval <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("interval > 0, burst >= 1 and max_keys >= 1 are required")
        self.clock = clock
        self.interval = float(interval)
        self.burst = burst
        self.reason_burst = reason_burst
        self.max_keys = max_keys
        self._windows: Dict[Hashable, _Window] = {}
        self._reasons: Dict[Hashable, _Window] = {}
        #: lines let through and lines suppressed since start (for metrics)
        self.passed = 0
        self.suppressed = 0

    def _window(self, table: dict, key: Hashable, now: float) -> _Window:
        window = table.get(key)
        if window is None or now - window.start >= self.interval:
            carried = window.suppressed if window is not None else 0
            if window is not None:
                del table[key]   # re-insert: insertion order is age order
            elif len(table) >= self.max_keys:
                self._evict(table, now)
            window = table[key] = _Window(now)
            window.suppressed = carried
        return window

    def _evict(self, table: dict, now: float) -> None:
        stale = [k for k, w in table.items() if now - w.start >= self.interval]
        for k in stale:
            del table[k]
        if len(table) >= self.max_keys:
            for k in list(table)[:max(1, len(table) // 2)]:
                del table[k]

    def check(self, key: Hashable) -> Optional[int]:
        """Count one line for ``key``.

        :returns: ``None`` if the line must be suppressed, else the number of
            lines suppressed since the last one that passed: those of this key
            (over its own burst) plus those of its reason (over the reason's
            burst, whatever their key); 0 usually.  Every suppressed line is
            reported exactly once, by a later line that passes.
        """
        now = self.clock.seconds()
        reason_window = None
        if self.reason_burst is not None:
            # the reason first: in a flood over many keys (a connection storm)
            # a line its reason suppresses costs no window of its own key
            reason_window = self._window(self._reasons, _reason_of(key), now)
            if reason_window.passed >= self.reason_burst:
                # counted for the reason: the next line of this reason, whichever
                # client it is about, reports it
                reason_window.suppressed += 1
                self.suppressed += 1
                return None
        window = self._window(self._windows, key, now)
        if window.passed >= self.burst:
            window.suppressed += 1
            self.suppressed += 1
            return None
        suppressed = 0
        if reason_window is not None:
            reason_window.passed += 1
            suppressed, reason_window.suppressed = reason_window.suppressed, 0
        window.passed += 1
        self.passed += 1
        suppressed += window.suppressed
        window.suppressed = 0
        return suppressed

    def emit(self, log_method: Callable, key: Hashable, format: str, **fields) -> bool:
        """Log ``format`` with ``log_method`` (e.g. ``log.warn``) unless suppressed.

        Adds the field ``suppressed`` (an int) and, when it is not 0, the text
        `` ({suppressed} similar lines suppressed)``.  Returns whether it logged.
        """
        suppressed = self.check(key)
        if suppressed is None:
            return False
        self.log(log_method, format, suppressed, **fields)
        return True

    @staticmethod
    def log(log_method: Callable, format: str, suppressed: int, **fields) -> None:
        """The second half of :meth:`emit`, for a caller that called :meth:`check`
        itself (and builds the line's fields only when it passed)."""
        if suppressed:
            format += " ({suppressed} similar lines suppressed)"
        log_method(format, suppressed=suppressed, **fields)

    def warn(self, logger, key: Hashable, format: str, **fields) -> bool:
        """:meth:`emit` at warn level on a ``twisted.logger.Logger``."""
        return self.emit(logger.warn, key, format, **fields)


def peer_host(peer) -> str:
    """The host part of a peer as the broker describes it (``"10.0.0.7:51234"``,
    ``"::1:51234"``; a UNIX socket's name is kept whole; ``None`` is ``"-"``)."""
    if not peer:
        return "-"
    text = str(peer)
    host, colon, port = text.rpartition(":")
    return host if colon and host and port.isdigit() else text


def network_key(host: str) -> str:
    """Who a client host is for per-address limits and failure budgets: the
    host itself, or for IPv6 its /64 network -- one site or one customer
    usually has a whole /64, so a new address from it is not a new client host
    (``"2001:db8:1:2::/64"``).  ``host`` has no port (see :func:`peer_host`)."""
    if ":" not in host:
        return host  # IPv4, a name, "-": no parsing on the common path
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


#: strings a client chose (client ids, user names) longer than this many
#: characters are kept under a digest by the broker's memories of clients
#: (see :func:`memory_key`)
KEY_LIMIT = 256


def memory_key(text: str) -> str:
    """The key under which a memory that outlives a connection (inbound
    buckets, the publisher-pause ledger, earlier owners of client ids, ACL
    views) keeps a client-chosen string: the string itself up to
    :data:`KEY_LIMIT` characters, else ``"sha256:"`` and its hex digest --
    so 10,000 remembered client ids of 60,000 characters cost 10,000 short
    keys, not 600 MB (REVIEW-S10 S16), and two long ids never share one."""
    if len(text) <= KEY_LIMIT:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def enclosing_network(host: str) -> Optional[str]:
    """The network around a client host, for budgets that new addresses must
    not renew: its /24 (IPv4, IPv4-mapped IPv6 included) or /48 (IPv6: what
    one customer site is usually given), as ``"203.0.113.0/24"``; None for
    what is no IP address (a UNIX socket's ``-``, a name).  ``host`` has no
    port (see :func:`peer_host`)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def address_key(peer) -> str:
    """Who a peer (``"host:port"``) is for per-address limits (half-open
    sockets, the inbound rate): :func:`network_key` of its :func:`peer_host`."""
    return network_key(peer_host(peer))


def refusal_key(what: str, client_id, peer) -> tuple:
    """The limiter key of a refusal or limit hit ``what``: ``(client_id, what)``;
    before a client id is known (a TLS handshake, a WebSocket opening
    handshake, an accept the process had no file descriptor for)
    ``(peer host, what)``, so one noisy host never silences the others' lines.
    Every refusal line uses it (``Broker.refused``), and so do the lines that
    belong to the same refusal (autobahn's about a refused handshake)."""
    return (client_id if client_id is not None else peer_host(peer), what)


class InboundBucket:
    """The inbound token buckets of one client (``--max-inbound-rate``,
    ``--max-inbound-bytes-rate``): PUBLISH packets and their bytes per second.

    Each bucket holds at most one second of its rate (a burst of ``rate``
    packets, ``bytes_rate`` bytes; at least one packet) and refills
    continuously.  :meth:`take` charges one PUBLISH of ``size`` bytes when
    both buckets afford it; a packet larger than the whole bytes bucket passes
    when the bucket is full and leaves it in debt (so it is not stuck forever).

    :param rate: packets per second, 0 = not limited.
    :param bytes_rate: bytes per second, 0 = not limited.
    :param now: the clock's ``seconds()``.
    :param state: ``(messages, bytes)`` tokens to start with (a remembered
        state, see :class:`BucketMemory`); default: full buckets.
    """

    __slots__ = ("rate", "bytes_rate", "messages", "bytes", "stamp", "host", "waiters")

    #: a paused connection is resumed once the bucket holds at least this
    #: share of its capacity (at most ~10 resumes per second per client)
    RESUME_SHARE = 0.1
    #: the shortest pause (seconds): a timer never fires in the same instant
    MIN_WAIT = 0.001

    def __init__(self, rate: float, bytes_rate: float, now: float, state=None):
        self.rate = float(rate)
        self.bytes_rate = float(bytes_rate)
        if state is None:
            self.messages, self.bytes = self.capacity
        else:
            self.messages, self.bytes = state
        self.stamp = now
        #: the client host whose live connections share it (see InboundBuckets)
        self.host = None
        #: the connections waiting for it, in turn (mqttd.inflow); the head's turn
        self.waiters = collections.deque()

    @property
    def capacity(self):
        """``(packets, bytes)`` a full bucket holds: one second of each rate."""
        return (max(self.rate, 1.0), self.bytes_rate)

    def refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.stamp = now
            cap_m, cap_b = self.capacity
            if self.rate:
                self.messages = min(cap_m, self.messages + elapsed * self.rate)
            if self.bytes_rate:
                self.bytes = min(cap_b, self.bytes + elapsed * self.bytes_rate)

    def take(self, size: int, now: float) -> float:
        """Charge one PUBLISH of ``size`` bytes: 0.0 when it was taken, else
        the seconds until it (and a useful share more) will be affordable;
        nothing is charged then."""
        self.refill(now)
        cap_m, cap_b = self.capacity
        wait = 0.0
        # (a small tolerance: refills are float sums, 0.1 s of 10/s may be 0.9999...)
        if self.rate and self.messages < 1.0 - 1e-9:
            need = max(1.0, cap_m * self.RESUME_SHARE)
            wait = (need - self.messages) / self.rate
        if self.bytes_rate:
            need = min(size, cap_b)
            if self.bytes < need - 1e-6:
                need = max(need, cap_b * self.RESUME_SHARE)
                wait = max(wait, (need - self.bytes) / self.bytes_rate)
        if wait > 0.0:
            return max(wait, self.MIN_WAIT)
        if self.rate:
            self.messages -= 1.0
        if self.bytes_rate:
            self.bytes -= size
        return 0.0

    def overdraw(self, size: int, now: float) -> bool:
        """Charge one PUBLISH of ``size`` bytes even beyond what the bucket
        holds, unless it is in debt already: False then (nothing charged).
        For what cannot wait (a will at close): one may overdraw, a second
        waits for the debt to be repaid."""
        self.refill(now)
        if (self.rate and self.messages < 0) or (self.bytes_rate and self.bytes < 0):
            return False
        if self.rate:
            self.messages -= 1.0
        if self.bytes_rate:
            self.bytes -= size
        return True

    def state(self, now: float):
        """``(messages, bytes, seconds until full)`` after refilling to ``now``."""
        self.refill(now)
        cap_m, cap_b = self.capacity
        full_in = 0.0
        if self.rate:
            full_in = (cap_m - self.messages) / self.rate
        if self.bytes_rate:
            full_in = max(full_in, (cap_b - self.bytes) / self.bytes_rate)
        return self.messages, self.bytes, full_in


class BucketMemory:
    """What clients left of their inbound buckets when they disconnected, so a
    reconnect does not get a fresh allowance.

    A bucket that is not full when its connection closes is remembered under
    each of its keys (the client id and the peer's host) until it would have
    refilled; a new connection starts with the emptiest state remembered under
    any of its keys (refilled for the time since).  So neither a new client id
    nor a new connection from the same host escapes the limit.  Bounded: at
    most ``max_entries`` keys (the oldest are forgotten first), each kept at
    most until its bucket would be full again (about a second with the default
    one-second buckets).

    :param max_entries: keys kept at most.
    """

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        #: key -> (messages, bytes, stamp, expires); insertion order is age order
        self._entries: Dict[Hashable, tuple] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, keys, bucket: InboundBucket, now: float) -> None:
        """Keep ``bucket``'s state under ``keys`` unless it is full."""
        messages, size, full_in = bucket.state(now)
        if full_in <= 0:
            return
        entries = self._entries
        for key in keys:
            old = entries.pop(key, None)
            if old is not None and old[3] > now + full_in:
                entries[key] = old  # an emptier state is already remembered
                continue
            if len(entries) >= self.max_entries:
                self._evict(now)
            entries[key] = (messages, size, now, now + full_in)

    def recall(self, keys, bucket: InboundBucket, now: float) -> None:
        """Start ``bucket`` from the emptiest state remembered under ``keys``."""
        entries = self._entries
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                continue
            messages, size, stamp, expires = entry
            if expires <= now:
                del entries[key]
                continue
            past = InboundBucket(bucket.rate, bucket.bytes_rate, stamp, (messages, size))
            past.refill(now)
            bucket.refill(now)
            bucket.messages = min(bucket.messages, past.messages)
            bucket.bytes = min(bucket.bytes, past.bytes)

    def _evict(self, now: float) -> None:
        entries = self._entries
        for key in [k for k, e in entries.items() if e[3] <= now]:
            del entries[key]
        while len(entries) >= self.max_entries:
            del entries[next(iter(entries))]


class InboundBuckets:
    """The inbound buckets of the live connections, one per client host and
    shared by all of that host's connections, so N concurrent connections from
    one address get one rate, not N (REVIEW-SEC2 N1); and the
    :class:`BucketMemory` of closed ones.

    :meth:`acquire` gives a new connection its host's live bucket (a first
    connection's bucket starts from what the host and the client id left,
    see :class:`BucketMemory`; a client id that left a lower state lowers the
    shared bucket too, so reconnecting from another host brings no fresh
    allowance).  :meth:`release` is called once per acquire when the
    connection closes: the state is remembered under the client id, and under
    the host when its last connection closed.  Bounded by the live
    connections (one entry per host with at least one).

    :param memory: where closed connections' states are kept.
    """

    def __init__(self, memory: BucketMemory):
        self.memory = memory
        #: host -> [bucket, live connections using it]
        self._live: Dict[Hashable, list] = {}

    def __len__(self) -> int:
        """Hosts with a live bucket."""
        return len(self._live)

    def acquire(self, host: str, client_id, rate: float, bytes_rate: float,
                now: float) -> InboundBucket:
        """The bucket a new connection of ``client_id`` from ``host`` draws from."""
        entry = self._live.get(host)
        if entry is None:
            bucket = InboundBucket(rate, bytes_rate, now)
            bucket.host = host
            self.memory.recall((("host", host),), bucket, now)
            entry = self._live[host] = [bucket, 0]
        bucket = entry[0]
        self.memory.recall((("client", memory_key(client_id)),), bucket, now)
        entry[1] += 1
        return bucket

    def release(self, client_id, bucket: InboundBucket, now: float) -> None:
        """A connection that acquired ``bucket`` closed."""
        self.memory.remember((("client", memory_key(client_id)),), bucket, now)
        host = bucket.host
        entry = self._live.get(host)
        if entry is None or entry[0] is not bucket:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._live[host]
            self.memory.remember((("host", host),), entry[0], now)


__all__ = ["BucketMemory", "InboundBucket", "InboundBuckets", "LogRateLimiter", "address_key",
           "peer_host", "refusal_key"]
