"""An in-memory stand-in for :class:`mqttd.cluster.backend.Backend`, only for
the pure-logic unit tests of the retained index (the walk, the counts, the
expiry rules); everything is also tested against a real ``redis-server``.

It implements the handful of commands and the three retained scripts the
index uses, answering synchronously with fired Deferreds, and counts the
round trips (``execute``/``run`` calls and ``pipeline`` calls).
"""
from __future__ import annotations

from twisted.internet import defer


class FakeBackend:
    is_cluster = False

    def __init__(self):
        self.strings = {}
        self.hashes = {}
        self.zsets = {}
        self.scripts = {}
        self.round_trips = 0
        self.fail = None   # an exception every call raises, when set

    def register(self, name, source):
        self.scripts[name] = source

    def _call(self, command):
        name = command[0].upper()
        args = [a if not isinstance(a, bytes) or name in ("SET",) else a for a in command[1:]]
        if name == "GET":
            return self.strings.get(args[0])
        if name == "HGETALL":
            return {k.encode(): str(v).encode() for k, v in self.hashes.get(args[0], {}).items()}
        if name == "ZADD":
            self.zsets.setdefault(args[0], {})[args[2]] = float(args[1])
            return 1
        if name == "ZRANGEBYSCORE":
            key, _low, high = args[0], args[1], float(args[2])
            limit = int(args[5]) if len(args) > 5 else None
            items = sorted((s, m) for m, s in self.zsets.get(key, {}).items() if s <= high)
            return [m.encode() for _s, m in items[:limit]]
        if name == "ZREM":
            z = self.zsets.get(args[0], {})
            return sum(z.pop(m, None) is not None for m in args[1:])
        if name == "DEL":
            return int(self.hashes.pop(args[0], None) is not None
                       or self.strings.pop(args[0], None) is not None)
        if name == "HSET":
            self.hashes.setdefault(args[0], {})[args[1]] = int(args[2])
            return 1
        raise NotImplementedError(name)

    def _answer(self, fn):
        self.round_trips += 1
        if self.fail is not None:
            return defer.fail(self.fail)
        try:
            return defer.succeed(fn())
        except Exception as error:  # pragma: no cover - a test bug
            return defer.fail(error)

    def execute(self, *command):
        return self._answer(lambda: self._call(command))

    def pipeline(self, commands, wait_replicas=0, wait_timeout=1000):
        return self._answer(lambda: [self._call(c) for c in commands])

    def follow_primary(self):
        return None   # not Sentinel

    def run(self, name, keys, args):
        def script():
            key = keys[0]
            if name == "ret_set":
                old = self.strings.get(key)
                self.strings[key] = args[0]
                return 0 if old is not None else 1
            if name == "ret_del":
                expected = args[0]
                if expected and self.strings.get(key) != expected:
                    return 0
                return int(self.strings.pop(key, None) is not None)
            if name in ("ret_put_all", "ret_del_all"):
                if name == "ret_put_all":
                    if self.strings.get(key) is not None:
                        self.strings[key] = args[0]
                        return 0
                    self.strings[key] = args[0]
                    sign = 1
                else:
                    if args[0] and self.strings.get(key) != args[0]:
                        return 0
                    if self.strings.pop(key, None) is None:
                        return 0
                    sign = -1
                for i, level in enumerate(keys[1:]):
                    field, weight = args[1 + 2 * i], int(args[2 + 2 * i])
                    h = self.hashes.setdefault(level, {})
                    n = h[field] = h.get(field, 0) + sign * weight
                    if n == 0:
                        del h[field]
                    if not h:
                        del self.hashes[level]
                return 1
            if name == "ret_idx":
                field, delta = args[0], int(args[1])
                h = self.hashes.setdefault(key, {})
                n = h[field] = h.get(field, 0) + delta
                if n == 0:
                    del h[field]
                if not h:
                    del self.hashes[key]
                return n
            raise NotImplementedError(name)
        return self._answer(script)
