"""An in-memory stand-in for :class:`mqttd.cluster.backend.Backend` for unit
tests of pure logic on ``task.Clock`` (node membership): only the commands and
scripts those modules use, with key expiry on the test clock.  The Redis
integration tests use a real redis-server instead."""
from __future__ import annotations

from twisted.internet import defer

from mqttd.cluster.backend import RedisUnavailable, parse_url


class FakeBackend:
    def __init__(self, clock):
        self.clock = clock
        self.url = parse_url("redis://127.0.0.1:1")
        self.data = {}
        self.expiry = {}
        self.down = False
        #: a hanging link: calls get no answer until :meth:`resume` (Redis runs
        #: them then, as it would the bytes that waited in the network)
        self.hang = False
        self.hung = []
        #: keys on a hung Redis Cluster master: calls touching one get no
        #: answer until :meth:`resume` (a pipeline waits for its slowest key)
        self.hung_keys = set()
        #: seconds after which a call on a hung key fails
        self.timeout = 5.0
        self.scripts = {}
        self.calls = []

    def register(self, name, source):
        self.scripts[name] = source

    def _get(self, key):
        exp = self.expiry.get(key)
        if exp is not None and self.clock.seconds() >= exp:
            self.data.pop(key, None)
            self.expiry.pop(key, None)
        return self.data.get(key)

    def _reply(self, fn, keys=()):
        if self.hung_keys.intersection(keys):
            # bounded, as every call of the real backend (socket_timeout)
            d = defer.Deferred()
            self.hung.append((d, fn))
            self.clock.callLater(self.timeout, lambda: d.called or d.errback(
                RedisUnavailable(f"no answer from Redis within {self.timeout:g} s")))
            return d
        if self.down:
            return defer.fail(RedisUnavailable("ConnectionError: connection refused"))
        if self.hang == "replies":    # Redis ran it; the answer hangs on the way back
            value = fn()
            d = defer.Deferred()
            self.hung.append((d, lambda: value))
            return d
        if self.hang:
            d = defer.Deferred()
            self.hung.append((d, fn))
            return d
        return defer.succeed(fn())

    def resume(self, hang_again=False):
        """The link answers again: every hung call runs now, in order (``hang_again``:
        the calls their answers trigger hang in turn)."""
        self.hang = hang_again
        self.hung_keys = set()
        hung, self.hung = self.hung, []
        for d, fn in hung:
            value = fn()           # Redis runs it, whether or not anyone still waits
            if not d.called:
                d.callback(value)

    def run(self, name, keys=(), args=()):
        self.calls.append((name, list(keys), list(args)))
        return self._reply(lambda: getattr(self, "_" + name.replace("-", "_"))(keys, args),
                           keys)

    def _node_join(self, keys, args):
        cur = self._get(keys[0])
        boot = str(args[0]).encode()
        if cur is not None and cur != boot:
            left = self.expiry.get(keys[0], self.clock.seconds()) - self.clock.seconds()
            return [0, cur, int(left * 1000)]
        if cur is None and self._get(keys[2]) is not None:
            left = self.expiry.get(keys[2], self.clock.seconds()) - self.clock.seconds()
            return [2, self._get(keys[2]), int(left * 1000)]
        self.data[keys[0]] = boot
        self.expiry[keys[0]] = self.clock.seconds() + int(args[1]) / 1000
        info = self.data.setdefault(keys[1], {})
        prev = info.get(b"boot")
        info[b"boot"] = boot
        return [1, prev]

    def _node_beat(self, keys, args):
        cur = self._get(keys[0])
        if cur == str(args[0]).encode():
            self.expiry[keys[0]] = self.clock.seconds() + int(args[1]) / 1000
            return 1
        return 0 if cur is None else -1

    def _node_leave(self, keys, args):
        if self._get(keys[0]) == str(args[0]).encode():
            self.data.pop(keys[0], None)
            return 1
        return 0

    def _command(self, *args):
        name = args[0].upper()
        if name == "SADD":
            self.data.setdefault(args[1], set()).update(
                a.encode() if isinstance(a, str) else a for a in args[2:])
            return 1
        if name == "SREM":
            self.data.setdefault(args[1], set()).difference_update(
                a.encode() if isinstance(a, str) else a for a in args[2:])
            return 1
        if name == "SMEMBERS":
            return set(self.data.get(args[1], set()))
        if name == "SET":
            self.data[args[1]] = args[2].encode() if isinstance(args[2], str) else args[2]
            if "PX" in args:
                self.expiry[args[1]] = self.clock.seconds() + int(args[args.index("PX") + 1]) / 1000
            return True
        if name == "DEL":
            found = sum(self.data.pop(k, None) is not None for k in args[1:])
            return found
        if name == "GET":
            return self._get(args[1])
        if name == "EXISTS":
            return int(self._get(args[1]) is not None)
        raise NotImplementedError(name)

    def execute(self, *args):
        return self._reply(lambda: self._command(*args), args[1:2])

    def pipeline(self, commands, wait_replicas=0, wait_timeout=1000):
        return self._reply(lambda: [self._command(*c) for c in commands],
                           [c[1] for c in commands])

    def pipeline_each(self, commands):
        """As the real one: each command on its own (a hung key holds back only itself)."""
        calls = [self._reply(lambda c=c: self._command(*c), c[1:2]) for c in commands]
        d = defer.gatherResults([c.addErrback(lambda f: f.value) for c in calls])
        return d

    def follow_primary(self):
        return None   # not Sentinel

    def expire_now(self, key):
        """The key's TTL ran out (Redis forgot it)."""
        self.data.pop(key, None)
        self.expiry.pop(key, None)
