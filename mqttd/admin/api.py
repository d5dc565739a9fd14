"""The admin HTTP API (JSON) and the live dashboard, on ``twisted.web``.

Routes (all JSON unless noted; see ``docs/admin.rst`` for curl examples):

- ``GET /api/info``: version, broker id, uptime, listeners, counts;
- ``GET /api/clients[?state=online|offline&sort=queued|inflight|dropped|client_id&limit=N]``;
- ``GET /api/clients/ID``: one client with its recent drops and refusals;
- ``POST /api/clients/ID/disconnect``: close its connection (v5: DISCONNECT 0x98);
- ``DELETE /api/sessions/ID``: discard its session (disconnecting it first);
- ``GET /api/retained[?prefix=P&after=TOPIC&limit=N]``: retained topics, sorted, paged
  (``next`` is the ``after`` of the next page, null on the last);
- ``DELETE /api/retained?topic=T``: clear one retained topic;
- ``GET /api/why?client=ID&topic=T[&qos=Q&publisher=ID]``: see :mod:`mqttd.admin.why`;
- ``GET /api/stats``: counters now and their history (for rates);
- ``GET /api/topics``: the busiest topics of the last minutes;
- ``GET /`` and ``/static/...``: the dashboard (HTML/JS shipped in this package).

Access (:class:`AccessPolicy`): with a token, every request needs
``Authorization: Bearer TOKEN``; with admin users, HTTP Basic with a broker
user's name and password (checked by the broker's authenticator) is accepted
too.  Without either (loopback only, enforced at start), no credentials are
needed, but the ``Host`` header must name a loopback host (DNS rebinding) and a
browser request from another origin is refused (CSRF).
"""
from __future__ import annotations

import base64
import collections
import hmac
import json
import os
from typing import Optional, Sequence
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mqttd.admin import why as why_module
from mqttd.messages import message_size
from mqttd.retained import client_retained_count

log = Logger(namespace="mqttd.admin")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_PAGE = 1000


class HTTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _json(request, data, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(data, indent=None, sort_keys=True, default=str).encode("utf-8") + b"\n"


def _arg(request, name: str, default=None) -> Optional[str]:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return default
    return values[0].decode("utf-8", "replace")


def _int_arg(request, name: str, default: int, minimum: int = 0,
             maximum: Optional[int] = None) -> int:
    raw = _arg(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, f"{name} must be an integer, not {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise HTTPError(400, f"{name} must be between {minimum} and {maximum}")
    return value


class AccessPolicy:
    """Who may use the admin API (see the module docstring).

    :param token: the ``--admin-token``; None: no token.
    :param users: broker user names accepted with HTTP Basic (their password is
        checked by ``authenticator``, the broker's
        :class:`~mqttd.interfaces.IAuthenticator`, asked with an
        :class:`~mqttd.hooks.AuthRequest` carrying the HTTP peer, so the
        password checks' priorities and failure budgets apply to admin logins
        as to MQTT ones).
    :param authenticator: that IAuthenticator, or a callable returning the one
        in force (the broker's, looked up per request).
    :param refused: ``refused(what, client_id, peer, detail)`` -- the broker's
        counted, rate-limited refusal log (:meth:`mqttd.broker.Broker.refused`);
        None: a plain rate-unlimited WARN line.
    """

    def __init__(self, token: Optional[str] = None, users: Sequence[str] = (),
                 authenticator=None, refused=None):
        self.token = token
        self.users = frozenset(users)
        self._authenticator = authenticator
        self._refused = refused

    @property
    def authenticator(self):
        found = self._authenticator
        if callable(found) and not hasattr(found, "authenticate"):
            found = found()
        return found

    @property
    def open(self) -> bool:
        return self.token is None and not self.users

    @defer.inlineCallbacks
    def check(self, request):
        """Fires with None if allowed, else raises HTTPError(401/403)."""
        origin = request.getHeader(b"origin")
        # host names are case-insensitive (RFC 9110 4.2.3)
        host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
        if origin is not None and request.method not in (b"GET", b"HEAD"):
            origin_host = urlsplit(origin.decode("latin-1")).netloc.lower()
            if origin_host != host:
                raise HTTPError(403, "cross-origin request refused")
        if self.open:
            hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else \
                host.split("]")[0] + "]"
            if hostname not in LOOPBACK_HOSTS:
                raise HTTPError(403, "without --admin-token only loopback Host names "
                                     "are served")
            return None
        auth = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and self.token is not None:
            if hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
                return None
            self._refuse(request, "wrong bearer token")
        if scheme.lower() == "basic" and self.users:
            try:
                user, _, password = base64.b64decode(credentials, validate=True) \
                    .decode("utf-8").partition(":")
            except Exception:
                user, password = None, None
            if user is None:
                self._refuse(request, "malformed Basic credentials")
            elif user not in self.users:
                self._refuse(request, f"user name {user!r} is not an --admin-user")
            else:
                ok = yield self._check_user(user, password, _peer(request))
                if ok is True:
                    return None
                self._refuse(request, f"user name {user!r}: {ok}")
        raise HTTPError(401, "credentials required: Authorization: Bearer TOKEN" +
                        (" or Basic with an admin user" if self.users else ""))

    def _refuse(self, request, detail: str) -> None:
        peer = _peer(request)
        if self._refused is not None:
            self._refused("admin-login", None, peer, detail)
        else:
            log.warn("Refused admin-login from {peer}: {detail}", peer=peer, detail=detail)

    @defer.inlineCallbacks
    def _check_user(self, user: str, password: str, peer: Optional[str]):
        """True if the broker's authenticator accepts ``user``/``password``
        (and authenticates exactly that admin user), else why not (a str)."""
        from mqttd.hooks import AuthRequest, auth_outcome
        authenticate = getattr(self.authenticator, "authenticate", None)
        if authenticate is None:
            return "no authenticator configured"
        request = AuthRequest("mqttd-admin-http", user, password.encode("utf-8"), peer, 5)
        try:
            answer = yield defer.maybeDeferred(authenticate, request)
        except Exception:
            log.failure("The authenticator failed on the admin login of {user} from {peer}",
                        user=user, peer=peer)
            return "the authenticator failed"
        code, identity = auth_outcome(answer, user)
        if code:
            return f"authentication refused (reason code 0x{code:02X})"
        if identity != user:
            return f"authenticated as {identity!r}"
        return True


def _peer(request) -> Optional[str]:
    """``"host:port"`` of an HTTP request's client, or None."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    if host is None:
        return None
    port = getattr(address, "port", None)
    return f"{host}:{port}" if port is not None else host


class TopTopics:
    """Message counts per topic while someone looks (Space-Saving, ``capacity`` topics).

    The ``published`` observer is registered only while the dashboard polls
    ``/api/topics`` (and ``idle`` seconds after), so an unwatched broker's
    hot path pays nothing for it.
    """

    def __init__(self, broker, clock, capacity: int = 200, idle: float = 120.0):
        self.broker = broker
        self.clock = clock
        self.capacity = capacity
        self.idle = idle
        self.counts: dict = {}
        self._unregister = None
        self._idle_call = None
        self.since: Optional[float] = None

    def _published(self, message, client=None, **_):
        topic = message.topic
        counts = self.counts
        if topic in counts:
            counts[topic] += 1
        elif len(counts) < self.capacity:
            counts[topic] = 1
        else:  # Space-Saving: replace the smallest, inheriting its count
            victim = min(counts, key=counts.get)
            counts[topic] = counts.pop(victim) + 1

    def watch(self) -> None:
        if self._unregister is None:
            self._unregister = self.broker.on("published", self._published)
            self.since = self.clock.seconds()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle)
        else:
            self._idle_call = self.clock.callLater(self.idle, self.stop)

    def stop(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self.counts = {}
        self.since = None

    def top(self, n: int = 10) -> list:
        items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [{"topic": t, "messages": c} for t, c in items if not t.startswith("$SYS")]


class StatsHistory:
    """Counters sampled every ``interval`` seconds, the last ``size`` samples."""

    def __init__(self, broker, clock, interval: float = 2.0, size: int = 300):
        self.broker = broker
        self.clock = clock
        self.interval = interval
        self.samples = collections.deque(maxlen=size)
        self._loop = None

    def sample(self) -> dict:
        broker = self.broker
        stats = broker.stats
        online = getattr(broker, "online", None)
        if online is None:
            online = sum(1 for s in broker.sessions.values() if s.connection is not None)
        return {"t": self.clock.seconds(), "messages_in": stats.messages_received,
                "messages_out": stats.messages_sent, "bytes_in": stats.bytes_received,
                "bytes_out": stats.bytes_sent, "dropped": stats.dropped_total,
                "online": online, "sessions": len(broker.sessions)}

    def _tick(self) -> None:
        self.samples.append(self.sample())

    def start(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


class AdminAPI(Resource):
    """The ``/api`` tree; ``service`` is the BrokerService (listeners), may be None."""

    isLeaf = True

    def __init__(self, broker, ring, policy: AccessPolicy, service=None,
                 history: Optional[StatsHistory] = None, top: Optional[TopTopics] = None):
        super().__init__()
        self.broker = broker
        self.ring = ring
        self.policy = policy
        self.service = service
        self.history = history
        self.top_topics = top

    # --- dispatch ---------------------------------------------------------------------

    def render(self, request):
        d = self.policy.check(request)
        d.addCallback(lambda _: self._route(request))
        d.addCallbacks(lambda body: self._finish(request, body),
                       lambda failure: self._error(request, failure))
        return NOT_DONE_YET

    def _finish(self, request, body) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(body)
        request.finish()

    def _error(self, request, failure) -> None:
        error = failure.value
        if isinstance(error, HTTPError):
            body = _json(request, {"error": error.message}, error.code)
            if error.code == 401:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="mqttd"')
        elif isinstance(error, ValueError):
            body = _json(request, {"error": str(error)}, 400)
        else:
            log.failure("Admin API request {method} {path} failed", failure,
                        method=request.method, path=request.path)
            body = _json(request, {"error": "internal error"}, 500)
        self._finish(request, body)

    def _not_internal(self, client_id: str) -> None:
        """409 for an internal session (a bridge's local end): it belongs to its
        feature -- change or remove the bridge in the config instead."""
        owner = getattr(self.broker, "internal_owner", lambda _id: None)(client_id)
        if owner is not None:
            raise HTTPError(409, f"{client_id!r} is the internal session of {owner}; "
                                 f"change {owner} in the configuration instead")

    def _route(self, request):
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        while parts and parts[-1] == "":
            parts.pop()
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        route = (method, parts[0] if parts else "")
        if route == ("GET", "info"):
            return _json(request, self.info())
        if parts and parts[0] == "clients":
            if method == "GET" and len(parts) == 1:
                return _json(request, self.clients(request))
            if method == "GET" and len(parts) == 2:
                return _json(request, self.client(parts[1]))
            if method == "POST" and len(parts) == 3 and parts[2] == "disconnect":
                self._not_internal(parts[1])
                if not self.broker.disconnect_client(parts[1]):
                    raise HTTPError(404, f"{parts[1]!r} is not connected")
                return _json(request, {"disconnected": parts[1]})
        if parts and parts[0] == "sessions" and method == "DELETE" and len(parts) == 2:
            self._not_internal(parts[1])
            if not self.broker.delete_session(parts[1]):
                raise HTTPError(404, f"no session {parts[1]!r}")
            return _json(request, {"deleted": parts[1]})
        if route == ("GET", "retained"):
            page = self.retained(request)
            if isinstance(page, defer.Deferred):
                return page.addCallback(lambda answer: _json(request, answer))
            return _json(request, page)
        if route == ("DELETE", "retained"):
            topic = _arg(request, "topic")
            if not topic:
                raise HTTPError(400, "topic= is required")
            if not self.broker.clear_retained(topic):
                raise HTTPError(404, f"no retained message on {topic!r}")
            return _json(request, {"cleared": topic})
        if route == ("GET", "why"):
            return self.why(request)
        if route == ("GET", "stats"):
            return _json(request, self.stats())
        if route == ("GET", "topics"):
            return _json(request, self.topics())
        known = {"info", "clients", "sessions", "retained", "why", "stats", "topics"}
        if parts and parts[0] in known:
            raise HTTPError(405, f"{method} is not allowed on /api/{'/'.join(parts)}")
        raise HTTPError(404, f"no such API: /api/{'/'.join(parts)}")

    # --- views ----------------------------------------------------------------------------

    def info(self) -> dict:
        from mqttd import __version__
        broker = self.broker
        stats = broker.stats
        online = sum(1 for s in broker.sessions.values() if s.connection is not None)
        listeners = []
        if self.service is not None:
            for port, endpoint in zip(getattr(self.service, "ports", []),
                                      getattr(self.service, "endpoints", [])):
                host = port.getHost()
                listeners.append({"endpoint": endpoint,
                                  "host": getattr(host, "host", None),
                                  "port": getattr(host, "port", None)})
        return {
            "version": __version__, "broker_id": broker.config.broker_id,
            "uptime": broker.clock.seconds() - broker.started_at,
            "listeners": listeners,
            "clients": {"online": online, "offline": len(broker.sessions) - online,
                        "maximum": getattr(stats, "clients_maximum", None)},
            "subscriptions": sum(len(s.subscriptions) for s in broker.sessions.values()),
            "retained": client_retained_count(broker.retained),
            "messages": {"received": stats.messages_received, "sent": stats.messages_sent,
                         "dropped": stats.dropped_total},
            "bytes": {"received": stats.bytes_received, "sent": stats.bytes_sent},
            "dropped": dict(stats.dropped),
            "config": {"max_queued_messages": broker.config.max_queued_messages,
                       "max_queued_bytes": broker.config.max_queued_bytes,
                       "overflow_policy": broker.config.overflow_policy,
                       "max_inflight": broker.config.max_inflight},
        }

    def clients(self, request) -> dict:
        state = _arg(request, "state")
        if state not in (None, "online", "offline"):
            raise HTTPError(400, "state must be online or offline")
        sort = _arg(request, "sort", "client_id")
        if sort not in ("client_id", "queued", "inflight", "dropped"):
            raise HTTPError(400, "sort must be client_id, queued, inflight or dropped")
        limit = _int_arg(request, "limit", 1000, 1, 100_000)
        summaries = self.broker.clients(None if state is None else state == "online")
        if sort == "queued":
            summaries.sort(key=lambda c: (-c.queued, c.client_id))
        elif sort == "inflight":
            summaries.sort(key=lambda c: (-c.inflight, c.client_id))
        elif sort == "dropped":
            summaries.sort(key=lambda c: (-sum(c.dropped.values()), c.client_id))
        return {"total": len(summaries), "clients": [c.to_json() for c in summaries[:limit]]}

    def client(self, client_id: str) -> dict:
        session = self.broker.sessions.get(client_id)
        recent = [i.to_json() for i in self.ring.recent(client_id)] if self.ring else []
        if session is None:
            if not recent:
                raise HTTPError(404, f"no session {client_id!r}")
            return {"client_id": client_id, "state": "gone", "recent": recent}
        from mqttd.clients import summarize
        data = summarize(session).to_json()
        data["state"] = "online" if session.connection is not None else "offline"
        data["recent"] = recent
        return data

    def retained(self, request):
        prefix = _arg(request, "prefix", "")
        after = _arg(request, "after")
        limit = _int_arg(request, "limit", 100, 1, MAX_PAGE)
        store = self.broker.retained
        listing = getattr(store, "listing", None)
        if listing is not None:
            # a store that holds them elsewhere (the cluster's): all nodes' messages
            d = listing(prefix)
            d.addCallback(lambda messages: self._retained_page(
                {m.topic: m for m in messages}, prefix, after, limit))
            return d
        return self._retained_page(store, prefix, after, limit)

    @staticmethod
    def _retained_page(store, prefix, after, limit) -> dict:
        topics = sorted(t for t in store if t.startswith(prefix)
                        and (after is None or t > after))
        page = topics[:limit]
        items = []
        for topic in page:
            message = store.get(topic)
            if message is None:
                continue
            items.append({"topic": topic, "qos": message.qos, "bytes": message_size(message),
                          "expires_at": getattr(message, "expires_at", None)})
        return {"topics": items, "next": page[-1] if len(topics) > limit else None,
                "total": len(topics) + (0 if after is None else 0)}

    def why(self, request):
        client = _arg(request, "client")
        topic = _arg(request, "topic")
        if not client or topic is None:
            raise HTTPError(400, "client= and topic= are required")
        qos_arg = _arg(request, "qos")
        qos = None
        if qos_arg is not None:
            qos = _int_arg(request, "qos", 1, 0, 2)
        publisher = _arg(request, "publisher")
        d = why_module.explain(self.broker, self.ring, client, topic, qos, publisher)
        d.addCallback(lambda answer: _json(request, answer))
        return d

    def stats(self) -> dict:
        history = list(self.history.samples) if self.history is not None else []
        now = self.history.sample() if self.history is not None else None
        return {"now": now, "history": history,
                "interval": self.history.interval if self.history is not None else None}

    def topics(self) -> dict:
        if self.top_topics is None:
            return {"topics": [], "since": None}
        self.top_topics.watch()
        return {"topics": self.top_topics.top(10), "since": self.top_topics.since}


_CONTENT_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
                  ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml"}


class StaticFiles(Resource):
    """The dashboard's files, read from this package (no directory listing, no
    path outside it: only the file names present at start are served)."""

    isLeaf = True

    def __init__(self, directory: str = STATIC_DIR, index: str = "index.html"):
        super().__init__()
        self.index = index
        self.files = {}
        for name in os.listdir(directory):
            ext = os.path.splitext(name)[1]
            if ext in _CONTENT_TYPES:
                self.files[name] = (os.path.join(directory, name), _CONTENT_TYPES[ext])

    def render_GET(self, request):
        name = "/".join(p.decode("utf-8", "replace") for p in request.postpath) or self.index
        entry = self.files.get(name)
        if entry is None:
            return _json(request, {"error": f"no such file: {name}"}, 404)
        path, content_type = entry
        with open(path, "rb") as f:
            body = f.read()
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return body


class Dashboard(Resource):
    """``/`` (the dashboard page), ``/static/*`` and ``/api/*``."""

    def __init__(self, api: AdminAPI):
        super().__init__()
        self.putChild(b"api", api)
        static = StaticFiles()
        self.putChild(b"static", static)
        self.putChild(b"", static)
