"""The admin HTTP API: JSON views, actions, access rules (in-process, no sockets)."""
import base64
import json

import pytest
from twisted.internet import defer
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mqttd.admin.api import AccessPolicy, AdminAPI, Dashboard, StatsHistory, TopTopics
from mqttd.admin.ring import IncidentRing
from mqttd.codec.errors import ReasonCode
from mqttd.codec.packets import Disconnect, Properties
from tests.core.harness import FakeClient, make_broker


def _site(token=None, users=(), authenticator=None, **config):
    broker, clock = make_broker(**config)
    broker.authenticator = authenticator
    ring = IncidentRing(clock)
    ring.attach(broker)
    history = StatsHistory(broker, clock)
    top = TopTopics(broker, clock)
    api = AdminAPI(broker, ring, AccessPolicy(token, users, authenticator), None, history, top)
    return Dashboard(api), broker, clock


def call(root, method, path, args=None, headers=None, host=b"127.0.0.1:9884"):
    """(status, decoded body) of one request through the resource tree."""
    segments = [s.encode() for s in path.lstrip("/").split("/")]
    request = DummyRequest(segments)
    request.method = method.encode()
    request.args = {k.encode(): [str(v).encode()] for k, v in (args or {}).items()}
    request.requestHeaders.setRawHeaders(b"host", [host])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    resource = getChildForRequest(root, request)
    result = resource.render(request)
    if result is NOT_DONE_YET:
        if not request.finished:
            done = []
            request.notifyFinish().addBoth(done.append)
            assert done, "request did not finish"
        body = b"".join(request.written)
    else:
        body = result
    code = request.responseCode or 200
    ctype = request.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
    return code, (json.loads(body) if ctype.startswith(b"application/json") else body)


def test_info_reports_counts_and_version():
    """GET /api/info: broker id, version, online/offline counts."""
    root, broker, clock = _site()
    FakeClient(broker, clock).connect("c1")
    code, info = call(root, "GET", "/api/info")
    assert code == 200
    assert info["broker_id"] == "mqttd" and info["clients"]["online"] == 1
    from mqttd import __version__
    assert info["version"] == __version__


def test_clients_lists_state_subscriptions_queue_and_inflight():
    """GET /api/clients shows each session's state, subscriptions, queue depth, in-flight."""
    root, broker, clock = _site()
    online = FakeClient(broker, clock)
    online.connect("on")
    online.subscribe("a/#", qos=1)
    away = FakeClient(broker, clock)
    away.connect("away", clean=False)
    away.subscribe("a/#", qos=1)
    away.drop()
    for _ in range(3):
        broker.publish_message("a/b", b"x", qos=1)
    code, data = call(root, "GET", "/api/clients", {"sort": "queued"})
    assert code == 200 and data["total"] == 2
    first, second = data["clients"]
    assert (first["client_id"], first["online"], first["queued"]) == ("away", False, 3)
    assert (second["client_id"], second["online"], second["inflight"]) == ("on", True, 3)
    assert first["subscriptions"] == [{"topic_filter": "a/#", "qos": 1, "no_local": False,
                                       "retain_as_published": False, "retain_handling": 0}]
    code, only = call(root, "GET", "/api/clients", {"state": "online"})
    assert [c["client_id"] for c in only["clients"]] == ["on"]
    assert call(root, "GET", "/api/clients", {"state": "sideways"})[0] == 400


def test_client_detail_includes_recent_drops():
    """GET /api/clients/ID has the per-client ring of drops and refusals."""
    root, broker, clock = _site(max_queued_messages=1)
    client = FakeClient(broker, clock)
    client.connect("c1", clean=False)
    client.subscribe("a", qos=1)
    client.drop()
    broker.publish_message("a", b"1", qos=1)
    broker.publish_message("a", b"2", qos=1)
    code, data = call(root, "GET", "/api/clients/c1")
    assert code == 200 and data["state"] == "offline"
    assert data["recent"][-1]["reason"] == "queue-full"
    assert call(root, "GET", "/api/clients/nobody")[0] == 404


def test_disconnect_client_sends_v5_administrative_action():
    """POST /api/clients/ID/disconnect: DISCONNECT 0x98 to a v5 client; 404 when offline."""
    root, broker, clock = _site()
    client = FakeClient(broker, clock, level=5)
    client.connect("c1", clean=False, properties=Properties(session_expiry_interval=300))
    code, data = call(root, "POST", "/api/clients/c1/disconnect")
    assert (code, data) == (200, {"disconnected": "c1"})
    assert client.received()[-1] == Disconnect(ReasonCode.ADMINISTRATIVE_ACTION)
    assert "c1" in broker.sessions  # the persistent session stays
    assert call(root, "POST", "/api/clients/c1/disconnect")[0] == 404


def test_delete_session_discards_it_with_its_queue():
    """DELETE /api/sessions/ID removes an offline session and its queued messages."""
    root, broker, clock = _site()
    client = FakeClient(broker, clock)
    client.connect("c1", clean=False)
    client.subscribe("a", qos=1)
    client.drop()
    broker.publish_message("a", b"x", qos=1)
    assert call(root, "DELETE", "/api/sessions/c1") == (200, {"deleted": "c1"})
    assert "c1" not in broker.sessions
    assert broker.publish_message("a", b"x", qos=1) == 0
    assert call(root, "DELETE", "/api/sessions/c1")[0] == 404


def test_internal_sessions_are_neither_deleted_nor_disconnected():
    """A bridge's local session (reserved client id): DELETE and disconnect answer 409 and
    leave it and its queue alone."""
    root, broker, clock = _site()
    client = FakeClient(broker, clock)
    client.connect("local.edge", clean=False)
    client.subscribe("a", qos=1)
    broker.reserve_client_id("local.edge", "bridge central")
    code, data = call(root, "POST", "/api/clients/local.edge/disconnect")
    assert code == 409 and "bridge central" in data["error"]
    client.drop()
    broker.publish_message("a", b"x", qos=1)
    code, data = call(root, "DELETE", "/api/sessions/local.edge")
    assert code == 409 and "bridge central" in data["error"]
    assert len(broker.sessions["local.edge"].queue) == 1


def test_retained_topics_are_paged_and_can_be_cleared():
    """GET /api/retained pages sorted topics with a cursor; DELETE clears one."""
    root, broker, clock = _site()
    for i in range(5):
        broker.publish_message(f"r/{i}", b"v", qos=1, retain=True)
    code, page = call(root, "GET", "/api/retained", {"limit": 2})
    assert [t["topic"] for t in page["topics"]] == ["r/0", "r/1"] and page["next"] == "r/1"
    code, page = call(root, "GET", "/api/retained", {"limit": 2, "after": page["next"]})
    assert [t["topic"] for t in page["topics"]] == ["r/2", "r/3"]
    code, page = call(root, "GET", "/api/retained", {"limit": 2, "after": "r/3"})
    assert [t["topic"] for t in page["topics"]] == ["r/4"] and page["next"] is None
    assert call(root, "DELETE", "/api/retained", {"topic": "r/0"}) == (200, {"cleared": "r/0"})
    assert "r/0" not in broker.retained
    assert call(root, "DELETE", "/api/retained", {"topic": "r/0"})[0] == 404
    assert call(root, "GET", "/api/retained", {"limit": "many"})[0] == 400


def test_why_endpoint_answers_and_validates():
    """GET /api/why returns the explanation; a bad topic or missing argument is a 400."""
    root, broker, clock = _site()
    client = FakeClient(broker, clock)
    client.connect("c1")
    client.subscribe("Sensors/#")
    code, answer = call(root, "GET", "/api/why", {"client": "c1", "topic": "sensors/1"})
    assert code == 200 and answer["verdict"] == "not-delivered"
    assert "letter case" in answer["nearest"][0]["why"]
    assert call(root, "GET", "/api/why", {"client": "c1", "topic": "a/#"})[0] == 400
    assert call(root, "GET", "/api/why", {"client": "c1"})[0] == 400
    assert call(root, "GET", "/api/why", {"client": "c1", "topic": "a", "qos": 3})[0] == 400


def test_stats_history_and_top_topics():
    """GET /api/stats gives samples for rates; /api/topics counts only once watched."""
    root, broker, clock = _site()
    root.children[b"api"].history.start()
    broker.publish_message("before/watch", b"x")
    call(root, "GET", "/api/topics")  # starts counting
    for _ in range(3):
        broker.publish_message("hot", b"x")
    broker.publish_message("cold", b"x")
    clock.advance(2)
    code, stats = call(root, "GET", "/api/stats")
    assert stats["now"]["messages_in"] == 5 and len(stats["history"]) == 2
    code, top = call(root, "GET", "/api/topics")
    assert top["topics"] == [{"topic": "hot", "messages": 3}, {"topic": "cold", "messages": 1}]
    clock.advance(121)  # nobody watching: the observer is removed
    assert not broker._observers["published"]


def test_unknown_route_and_wrong_method():
    root, broker, clock = _site()
    assert call(root, "GET", "/api/nothing")[0] == 404
    assert call(root, "PUT", "/api/info")[0] == 405


def test_open_api_refuses_non_loopback_host_and_cross_origin_posts():
    """Without a token: only loopback Host names (DNS rebinding), no cross-origin POST (CSRF)."""
    root, broker, clock = _site()
    assert call(root, "GET", "/api/info", host=b"evil.example:9884")[0] == 403
    assert call(root, "GET", "/api/info", host=b"localhost:9884")[0] == 200
    assert call(root, "GET", "/api/info", host=b"[::1]:9884")[0] == 200
    code, _ = call(root, "DELETE", "/api/sessions/x",
                   headers={"Origin": "http://evil.example"})
    assert code == 403


def test_token_is_required_when_set():
    """--admin-token: 401 without it or with a wrong one, 200 with Bearer TOKEN."""
    root, broker, clock = _site(token="s3cret")
    code, body = call(root, "GET", "/api/info", host=b"mqtt.example:9884")
    assert code == 401 and "Bearer" in body["error"]
    assert call(root, "GET", "/api/info", headers={"Authorization": "Bearer nope"})[0] == 401
    assert call(root, "GET", "/api/info", host=b"mqtt.example:9884",
                headers={"Authorization": "Bearer s3cret"})[0] == 200


class _Users:
    """A broker authenticator of the seam: alice/wonderland only."""

    def authenticate(self, connect):
        ok = connect.username == "alice" and connect.password == b"wonderland"
        return defer.succeed(0 if ok else 0x86)


def test_admin_users_log_in_with_the_brokers_own_authenticator():
    """--admin-user NAME: HTTP Basic checked by the broker's IAuthenticator."""
    root, broker, clock = _site(users=("alice",), authenticator=_Users())

    def basic(user, password):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode())
                .decode()}
    assert call(root, "GET", "/api/info", headers=basic("alice", "wonderland"))[0] == 200
    assert call(root, "GET", "/api/info", headers=basic("alice", "wrong"))[0] == 401
    assert call(root, "GET", "/api/info", headers=basic("bob", "wonderland"))[0] == 401


def test_dashboard_files_are_served_from_the_package():
    """/ is the dashboard page; /static/app.js its script; nothing outside the package."""
    root, broker, clock = _site()
    code, page = call(root, "GET", "/")
    assert code == 200 and b"<canvas" in page
    code, script = call(root, "GET", "/static/app.js")
    assert code == 200 and b"/api/stats" in script
    assert call(root, "GET", "/static/../../setup.cfg")[0] == 404


@pytest.mark.parametrize("description, ok", [
    ("tcp:9884:interface=127.0.0.1", True), ("tcp:9884:interface=\\:\\:1", True),
    ("unix:/run/mqttd-admin.sock", True), ("tcp:9884", False),
    ("tcp:9884:interface=0.0.0.0", False), ("tcp:9884:interface=192.168.1.5", False),
])
def test_admin_listen_beyond_loopback_needs_credentials(description, ok):
    """--admin-listen on a non-loopback interface without a token refuses to start (exit 2)."""
    from mqttd import tap
    from mqttd.options import ConfigError
    argv = ["--persistence", "memory", "--admin-listen", description]
    if ok:
        tap.Options().parseOptions(argv)
    else:
        with pytest.raises(ConfigError, match="--admin-listen: .*needs --admin-token"):
            tap.Options().parseOptions(argv)
        tap.Options().parseOptions(argv + ["--admin-token", "t"])


def test_loopback_host_names_are_case_insensitive():
    """Host: LOCALHOST is localhost (RFC 9110 host names are case-insensitive)."""
    root, broker, clock = _site()
    assert call(root, "GET", "/api/info", host=b"LOCALHOST:9884")[0] == 200
    assert call(root, "GET", "/api/info", host=b"Example.COM:9884")[0] == 403


def test_why_cli_with_an_admin_value_that_is_no_url_is_one_line():
    """mqttd why --admin notaurl: the one-line 'cannot reach' error, not a traceback."""
    from mqttd.admin.cli import fetch
    with pytest.raises(RuntimeError, match="cannot reach the admin API at notaurl"):
        fetch("notaurl", "/api/why", {"client": "x", "topic": "y"})


def test_admin_users_log_in_with_the_real_password_file_authenticator(tmp_path):
    """The broker's own Authenticator (password file, twisted.cred) accepts the admin's Basic login
    (REVIEW-SEC2 N7: it used to get a CONNECT packet, fail and answer 401 silently)."""
    from twisted.logger import capturedLogs

    from mqttd.auth.checkers import Authenticator, PasswordFileChecker, make_portal
    from mqttd.auth.passwd import update_file
    path = str(tmp_path / "pw")
    update_file(path, "alice", "wonderland", create=True, iterations=1000)
    checker = PasswordFileChecker(path, gate=None)
    authenticator = Authenticator(make_portal([checker]), allow_anonymous=False)
    broker, clock = make_broker()
    broker.authenticator = authenticator
    ring = IncidentRing(clock)
    api = AdminAPI(broker, ring, AccessPolicy(None, ("alice",), lambda: broker.authenticator,
                                              refused=broker.refused),
                   None, StatsHistory(broker, clock), TopTopics(broker, clock))
    root = Dashboard(api)

    def basic(user, password):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode())
                .decode()}
    assert call(root, "GET", "/api/info", headers=basic("alice", "wonderland"))[0] == 200
    with capturedLogs() as events:
        assert call(root, "GET", "/api/info", headers=basic("alice", "wrong"))[0] == 401
    lines = [e for e in events if e.get("what") == "admin-login"]
    assert len(lines) == 1 and "0x86" in lines[0]["detail"]
    assert broker.stats.refused.get("admin-login") == 1
