""""Why didn't my message arrive?" — explain, from live state, the fate of a
message on a topic for one client.

:func:`explain` looks at what the broker holds now: the client's session
(online, offline with its expiry, expired, ended clean, unknown), its
subscriptions that match the topic (or, when none does, the nearest filters
and how they differ: case, number of levels, a leading ``/``, a ``$`` topic
under a wildcard), the ACL verdicts through the authorizer seam, granted
against published QoS, No Local, shared-subscription groups, the queue
(full? what policy? what was dropped?), message expiry, the retained message
of the topic, and the client's recent drops and refusals from the
:class:`~mqttd.admin.ring.IncidentRing`.

The answer is a JSON-ready dict with a ``verdict`` (``delivered``,
``queued``, ``maybe``, ``not-delivered``), a one-line ``summary``, and
``steps``: the checks in order, each ``{"check", "ok", "detail"}``.
"""
from __future__ import annotations

from typing import List, Optional

from twisted.internet import defer

from mqttd import topics
from mqttd.codec.errors import MQTTError
from mqttd.messages import message_size

VERDICTS = ("delivered", "queued", "maybe", "not-delivered")
_LEVELS = {3: "3.1", 4: "3.1.1", 5: "5.0"}


def _step(steps: list, check: str, ok: Optional[bool], detail: str) -> None:
    steps.append({"check": check, "ok": ok, "detail": detail})


def _matches(topic_filter: str, topic: str) -> bool:
    _group, inner = topics.parse_shared(topic_filter)
    try:
        return topics.matches(inner, topic)
    except Exception:
        return False


def diagnose_mismatch(topic_filter: str, topic: str) -> dict:
    """How ``topic_filter`` fails to match ``topic``, and how close it is.

    Returns ``{"filter", "why", "score"}``; a higher score is nearer (the
    number of leading levels that match, plus bonuses for a case-only or a
    whitespace-only difference).
    """
    group, inner = topics.parse_shared(topic_filter)
    flevels, tlevels = inner.split("/"), topic.split("/")
    matching = 0
    for f, t in zip(flevels, tlevels):
        if f in ("+", "#") or f == t:
            matching += 1
        else:
            break
    why = None
    score = matching
    if topic.startswith("$") and inner[:1] in ("+", "#"):
        why = (f"a filter starting with {inner[0]!r} never matches a topic starting "
               f"with '$' [MQTT-4.7.2-1]; subscribe to {topic.split('/')[0] + '/#'!r}")
        score += 10
    elif _safe_matches(inner.lower(), topic.lower()):
        level = next((i + 1 for i, (f, t) in enumerate(zip(flevels, tlevels))
                      if f not in ("+", "#") and f != t), None)
        why = (f"differs only in letter case (level {level}: "
               f"{flevels[level - 1]!r} vs {tlevels[level - 1]!r}); topics are case-sensitive")
        score += 100
    elif _safe_matches(inner.replace(" ", ""), topic.replace(" ", "")):
        why = "differs only in spaces; spaces are part of a topic level"
        score += 90
    elif inner.startswith("/") != topic.startswith("/") and \
            _safe_matches(inner.strip("/"), topic.strip("/")):
        why = ("a leading '/' makes an empty first level: "
               f"{inner!r} and {topic!r} do not match")
        score += 80
    elif inner.endswith("/") != topic.endswith("/") and \
            _safe_matches(inner.rstrip("/"), topic.rstrip("/")):
        why = "a trailing '/' makes an empty last level"
        score += 80
    elif "#" not in flevels and len(flevels) < len(tlevels) and matching == len(flevels):
        why = (f"the filter has {len(flevels)} levels and the topic {len(tlevels)}: "
               f"'+' matches exactly one level; {inner + '/#'!r} would match deeper levels")
        score += 50
    elif len(flevels) > len(tlevels) and matching == len(tlevels) and \
            flevels[len(tlevels)] != "#":
        why = (f"the filter has {len(flevels)} levels and the topic only {len(tlevels)}")
        score += 40
    else:
        level = matching + 1
        f = flevels[matching] if matching < len(flevels) else "(none)"
        t = tlevels[matching] if matching < len(tlevels) else "(none)"
        why = f"level {level} differs: {f!r} in the filter, {t!r} in the topic"
    result = {"filter": topic_filter, "why": why, "score": score}
    if group is not None:
        result["share_group"] = group
    return result


def _safe_matches(topic_filter: str, topic: str) -> bool:
    try:
        return bool(topic_filter) and topics.matches(topic_filter, topic)
    except Exception:
        return False


def _shared_assignment(broker, share_filter: str, topic: str, publisher: Optional[str]):
    """``(members, online members, strategy, next member or None)`` of a shared group,
    predicted without changing the group's state (round-robin turn, sticky member)."""
    registry = getattr(broker, "shared", None)
    group = registry.group(share_filter) if registry is not None else None
    if group is None:  # no registry: the sessions that hold the filter
        members = sorted(c for c, s in broker.sessions.items()
                         if share_filter in s.subscriptions)
        strategy = "unknown"
    else:
        members = list(group.members)
        strategy = registry.strategy
    online = [c for c in members if c in broker.sessions
              and broker.sessions[c].connection is not None]
    offline = [c for c in members if c in broker.sessions
               and broker.sessions[c].connection is None and broker.sessions[c].persistent]
    candidates = online or offline
    assigned = None
    if len(candidates) == 1:
        assigned = candidates[0]
    elif candidates and group is not None:
        import zlib
        if strategy == "round-robin":
            assigned = candidates[group._turn % len(candidates)]
        elif strategy == "sticky":
            sticky = group._sticky
            assigned = sticky if sticky in candidates else \
                candidates[group._turn % len(candidates)]
        elif strategy == "hash-topic":
            assigned = candidates[zlib.crc32(topic.encode("utf-8", "surrogatepass"))
                                  % len(candidates)]
        elif strategy == "hash-clientid" and publisher is not None:
            assigned = candidates[zlib.crc32(publisher.encode("utf-8", "surrogatepass"))
                                  % len(candidates)]
    return sorted(members), sorted(online), strategy, assigned


def _client_info(broker, session, client_id: str):
    conn = session.connection if session is not None else None
    info = getattr(conn, "info", None)
    if info is not None:
        return info
    if session is not None and hasattr(broker, "session_client"):
        return broker.session_client(session)  # an offline session: its owner
    from mqttd.broker import ClientInfo
    level = session.protocol_level if session is not None else 4
    username = getattr(session, "username", None) or getattr(session, "owner", None)
    return ClientInfo(client_id, level, username=username)


@defer.inlineCallbacks
def _acl(broker, session, client_id: str, topic: str, qos: int,
         publisher: Optional[str], steps: list):
    """ACL verdicts through the authorizer seam; returns False if delivery is refused."""
    authorizer = getattr(broker, "authorizer", None)
    if authorizer is None:
        _step(steps, "acl", None, "no authorizer configured: every client may publish and "
                                  "receive every topic")
        return True
    from mqttd.messages import Message
    message = Message(topic, b"", qos, False, origin=publisher)
    allowed = True
    forward = getattr(authorizer, "authorize_forward", None)
    if forward is not None:
        verdict = yield defer.maybeDeferred(forward, _client_info(broker, session, client_id),
                                            message)
        ok = verdict is True
        _step(steps, "acl-read", ok, f"the ACL {'allows' if ok else 'refuses'} delivering "
                                     f"{topic!r} to {client_id!r}" +
              ("" if ok else f" (answer: {verdict!r}); the message is skipped silently"))
        allowed = allowed and ok
    may_subscribe = getattr(authorizer, "may_subscribe", None)
    if forward is None and may_subscribe is not None:
        info = _client_info(broker, session, client_id)
        verdict = yield defer.maybeDeferred(may_subscribe, client_id, info.username, topic)
        ok = verdict is True
        _step(steps, "acl-read", ok, f"the ACL {'allows' if ok else 'refuses'} "
                                     f"{client_id!r} reading {topic!r}")
        allowed = allowed and ok
    if publisher is not None:
        pub_session = broker.sessions.get(publisher)
        info = _client_info(broker, pub_session, publisher)
        publish_check = getattr(authorizer, "authorize_publish", None)
        if publish_check is not None:
            verdict = yield defer.maybeDeferred(publish_check, info, message)
        elif getattr(authorizer, "may_publish", None) is not None:
            verdict = yield defer.maybeDeferred(authorizer.may_publish, publisher,
                                                info.username, topic)
        else:
            verdict = True
        ok = verdict is True
        _step(steps, "acl-write", ok, f"the ACL {'allows' if ok else 'refuses'} "
                                      f"{publisher!r} publishing to {topic!r}" +
              ("" if ok else " (v5: PUBACK 0x87; v3: acknowledged and dropped)"))
        allowed = allowed and ok
    return allowed


@defer.inlineCallbacks
def explain(broker, ring, client_id: str, topic: str, qos: Optional[int] = None,
            publisher: Optional[str] = None):
    """Explain what happens to a message on ``topic`` for ``client_id``.

    :param qos: the QoS it is published with (None: 1, and the answer says
        what QoS 0 would change).
    :param publisher: the publishing client id, if known (No Local, ACL).
    :returns: a Deferred firing with the JSON-ready explanation (see module doc).
    :raises ValueError: (through the Deferred) for an invalid topic name or QoS.
    """
    if qos is not None and qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
    pub_qos = 1 if qos is None else qos
    now = broker.clock.seconds()
    steps: List[dict] = []
    result = {"client": client_id, "topic": topic, "qos": pub_qos, "publisher": publisher,
              "steps": steps, "matching": [], "nearest": [],
              "recent": [i.to_json() for i in (ring.recent(client_id) if ring else [])]}

    def done(verdict: str, summary: str):
        result["verdict"] = verdict
        result["summary"] = summary
        return result

    try:
        topics.validate_topic_name(topic)
    except MQTTError as error:
        raise ValueError(f"not a valid topic name {topic!r}: {error.message}") from None
    if topic.startswith("$SYS") and publisher is not None:
        _step(steps, "topic", False, "clients cannot publish to $SYS topics (v5: PUBACK 0x87)")
        return done("not-delivered", f"{publisher!r} cannot publish to {topic!r}: $SYS is "
                                     "the broker's")
    _step(steps, "topic", True, f"{topic!r} is a valid topic name")

    fetch = getattr(broker.retained, "fetch", None)   # a cluster's: from Redis
    if fetch is not None:
        retained = yield defer.maybeDeferred(fetch, topic)
    else:
        retained = broker.retained.get(topic)
    if retained is not None:
        expires = getattr(retained, "expires_at", None)
        size = message_size(retained)
        result["retained"] = {"qos": retained.qos, "bytes": size, "expires_at": expires}
        _step(steps, "retained", True, f"a retained message ({size} bytes, "
                                       f"QoS {retained.qos}) is held for {topic!r}: a new "
                                       "matching subscription gets it at once")

    # --- the session ------------------------------------------------------------------
    session = broker.sessions.get(client_id)
    if session is None:
        expired = ring.last(client_id, "session-expired") if ring else None
        gone = ring.last(client_id, "disconnected") if ring else None
        if expired is not None:
            result["session"] = {"state": "expired", "at": expired.at}
            _step(steps, "session", False, expired.text)
            return done("not-delivered", f"the session of {client_id!r} expired "
                                         f"{now - expired.at:.0f} s ago: nothing is kept for it")
        if gone is not None:
            result["session"] = {"state": "ended", "at": gone.at}
            _step(steps, "session", False,
                  f"{client_id!r} had a clean session (v3 clean session 1 / v5 Session Expiry "
                  f"0); it ended when the client left {now - gone.at:.0f} s ago "
                  f"({gone.text}): messages published while it is away are not kept. "
                  "Connect with clean session 0 / a Session Expiry Interval to keep them")
            return done("not-delivered", f"{client_id!r} is not connected and had no "
                                         "persistent session")
        result["session"] = {"state": "unknown"}
        _step(steps, "session", False, f"no session for {client_id!r}: it has not connected "
                                       "since the broker started (client ids are "
                                       "case-sensitive)")
        similar = [c for c in broker.sessions if c.lower() == client_id.lower()]
        if similar:
            _step(steps, "session", None, f"a session with a similar id exists: {similar!r}")
        return done("not-delivered", f"no session for {client_id!r}")

    online = session.connection is not None
    state = "online" if online else "offline"
    session_info = {"state": state, "persistent": bool(session.persistent),
                    "protocol": _LEVELS.get(session.protocol_level, session.protocol_level),
                    "queued": len(session.queue), "queued_bytes": session.queued_bytes,
                    "inflight": len(session.inflight),
                    "inflight_bytes": getattr(session, "inflight_bytes", 0),
                    "dropped": dict(session.dropped)}
    if not online and session.expiry_interval is not None \
            and session.disconnected_at is not None:
        session_info["expires_at"] = session.disconnected_at + session.expiry_interval
        session_info["expires_in"] = max(0.0, session_info["expires_at"] - now)
    result["session"] = session_info
    if online:
        _step(steps, "session", True, f"{client_id!r} is connected (MQTT "
                                      f"{session_info['protocol']})")
    else:
        expiry = ("never expires" if "expires_in" not in session_info else
                  f"expires in {session_info['expires_in']:.0f} s")
        _step(steps, "session", True, f"{client_id!r} is offline with a persistent session "
                                      f"({expiry}): QoS 1/2 messages wait in its queue")

    # --- subscriptions ------------------------------------------------------------------
    matching = [(f, s) for f, s in session.subscriptions.items() if _matches(f, topic)]
    if not matching:
        nearest = sorted((diagnose_mismatch(f, topic) for f in session.subscriptions),
                         key=lambda d: -d["score"])[:3]
        for entry in nearest:
            entry.pop("score", None)
        result["nearest"] = nearest
        if not session.subscriptions:
            _step(steps, "subscriptions", False, f"{client_id!r} has no subscriptions")
        else:
            _step(steps, "subscriptions", False,
                  f"none of the {len(session.subscriptions)} subscriptions of {client_id!r} "
                  f"matches {topic!r}; nearest: " +
                  "; ".join(f"{n['filter']!r}: {n['why']}" for n in nearest))
        return done("not-delivered", f"no subscription of {client_id!r} matches {topic!r}")

    best = None
    shared_only = True
    shared_mine = False
    shared_assigned: list = []
    for topic_filter, sub in matching:
        group, _inner = topics.parse_shared(topic_filter)
        granted = getattr(sub, "qos", 0)
        entry = {"filter": topic_filter, "granted_qos": granted,
                 "delivered_qos": min(granted, pub_qos),
                 "no_local": bool(getattr(sub, "no_local", False)),
                 "retain_as_published": bool(getattr(sub, "retain_as_published", False))}
        if group is not None:
            members, online_members, strategy, assigned = _shared_assignment(
                broker, topic_filter, topic, publisher)
            entry["share_group"] = group
            entry["group_members"] = members
            entry["strategy"] = strategy
            entry["next_member"] = assigned
            if assigned is None:
                who = ("the member is picked at random" if strategy == "random" else
                       "no member can take it now")
            elif assigned == client_id:
                who = f"the next message on {topic!r} goes to {client_id!r}"
                shared_mine = True
            else:
                who = f"the next message on {topic!r} goes to {assigned!r}, not {client_id!r}"
            _step(steps, "shared", None if assigned is None else assigned == client_id,
                  f"{topic_filter!r} is a shared subscription: each message goes to ONE of "
                  f"the {len(members)} members of group {group!r} ({len(online_members)} "
                  f"online: {', '.join(online_members) or 'none'}; strategy {strategy}): "
                  f"{who}")
            shared_assigned.append(assigned)
        else:
            shared_only = False
        result["matching"].append(entry)
        if best is None or granted > best[1]:
            best = (topic_filter, granted, entry)
    _step(steps, "subscriptions", True,
          f"{len(matching)} subscription(s) match: " +
          ", ".join(f"{e['filter']!r} (granted QoS {e['granted_qos']})"
                    for e in result["matching"]))
    delivered_qos = min(best[1], pub_qos)
    result["delivered_qos"] = delivered_qos
    _step(steps, "qos", True,
          f"published QoS {pub_qos}, granted QoS {best[1]}: delivered at QoS {delivered_qos} "
          "(the lower of the two [MQTT-3.8.4-8])")

    # --- No Local ---------------------------------------------------------------------
    if publisher is not None and publisher == client_id:
        nl = [e for e in result["matching"] if e["no_local"]]
        if nl and len(nl) == len(result["matching"]):
            _step(steps, "no-local", False, f"every matching subscription has No Local: a "
                                            f"client never gets its own messages "
                                            f"[MQTT-3.8.3-3]")
            return done("not-delivered", f"No Local: {client_id!r} published it itself")
        if nl:
            _step(steps, "no-local", None, "some matching subscriptions have No Local")

    # --- ACL --------------------------------------------------------------------------
    allowed = yield _acl(broker, session, client_id, topic, pub_qos, publisher, steps)
    if not allowed:
        return done("not-delivered", "refused by the ACL")

    # --- queue, expiry, recent drops -------------------------------------------------------
    config = broker.config
    limit_msgs, limit_bytes = config.max_queued_messages, config.max_queued_bytes
    full = len(session.queue) >= limit_msgs or session.queued_bytes >= limit_bytes
    expired_queued = sum(1 for r in session.queue
                         if getattr(r.message, "expires_at", None) is not None
                         and r.message.expires_at <= now)
    result["queue"] = {"queued": len(session.queue), "limit": limit_msgs,
                       "bytes": session.queued_bytes, "limit_bytes": limit_bytes,
                       "policy": config.overflow_policy, "full": full,
                       "expired_waiting": expired_queued,
                       "congested": getattr(session, "congested_since", None) is not None}
    drops = [i for i in (ring.recent(client_id) if ring else [])
             if i.reason not in ("disconnected",)]
    if drops:
        last = drops[-1]
        _step(steps, "recent", False, f"{len(drops)} recent drop(s)/refusal(s); last "
                                      f"{now - last.at:.0f} s ago: {last.text}" +
              (f" (x{last.repeated})" if last.repeated > 1 else ""))
    if session.dropped:
        _step(steps, "dropped", False, "dropped for this session so far: " +
              ", ".join(f"{n} {reason}" for reason, n in sorted(session.dropped.items())))
    expired_dropped = session.dropped.get("expired", 0)
    if expired_queued or expired_dropped:
        _step(steps, "expiry", False, f"{expired_queued} queued message(s) passed their "
                                      "Message Expiry Interval and will not be delivered; "
                                      f"{expired_dropped} expired before delivery so far")
    else:
        _step(steps, "expiry", True, "a message published with a Message Expiry Interval "
                                     "is dropped if it is still queued when it expires")

    if full:
        what = ("the oldest queued message is dropped to make room"
                if config.overflow_policy == "drop-oldest" else "a new message is dropped")
        _step(steps, "queue", False,
              f"the queue is full ({len(session.queue)}/{limit_msgs} messages, "
              f"{session.queued_bytes}/{limit_bytes} bytes): {what} "
              f"(--overflow-policy {config.overflow_policy}, counted as queue-full)")
    else:
        _step(steps, "queue", True, f"queue {len(session.queue)}/{limit_msgs} messages, "
                                    f"{session.queued_bytes}/{limit_bytes} bytes")

    maybe = None
    if shared_only:
        if shared_mine:
            maybe = None  # this client is the member chosen next
        elif shared_assigned and all(a is not None for a in shared_assigned):
            return done("not-delivered", f"the shared group gives the next message on "
                                         f"{topic!r} to {shared_assigned[0]!r}")
        else:
            maybe = "maybe"
    if online and delivered_qos:
        window = getattr(session.connection, "send_window", config.max_inflight)
        held_bytes = getattr(session, "inflight_bytes", 0)
        limit_inflight = config.max_inflight_bytes
        if len(session.inflight) >= window or (
                limit_inflight and held_bytes >= limit_inflight) or getattr(
                    session, "inflight_held", False):
            _step(steps, "inflight", False,
                  f"the client's in-flight window is full ({len(session.inflight)}/{window} "
                  f"QoS 1/2 messages, --max-inflight or its Receive Maximum; {held_bytes}/"
                  f"{limit_inflight or 'unbounded'} bytes, --max-inflight-bytes): new "
                  "messages wait in its queue until it acknowledges (PUBACK/PUBCOMP)")
        else:
            _step(steps, "inflight", True,
                  f"in flight {len(session.inflight)}/{window} messages, {held_bytes}/"
                  f"{limit_inflight or 'unbounded'} bytes")
    if online:
        if result["queue"]["congested"] or session.queue:
            _step(steps, "delivery", True, "the client is behind: the message waits in its "
                                           "queue behind the others")
            if full and config.overflow_policy == "drop-new":
                return done("not-delivered", "queue full: new messages are dropped")
            return done(maybe or "queued", f"queued behind {len(session.queue)} message(s)")
        return done(maybe or "delivered", f"delivered to {client_id!r} at QoS {delivered_qos}"
                    + (" (if its group member is chosen)" if maybe else ""))
    if delivered_qos == 0 and not config.queue_qos0:
        _step(steps, "offline-qos0", False,
              "QoS 0 messages are not kept for offline sessions (--queue-qos0 would keep "
              "them); publish and subscribe with QoS 1 or 2")
        return done("not-delivered", f"{client_id!r} is offline and the message would be "
                                     f"QoS 0")
    if full and config.overflow_policy == "drop-new":
        return done("not-delivered", "queue full: new messages are dropped")
    if qos is None:
        _step(steps, "offline-qos0", None, "published at QoS 0 it would not be kept "
              "(the client is offline)" if not config.queue_qos0 else
              "QoS 0 is queued too (--queue-qos0)")
    return done(maybe or "queued", f"queued for {client_id!r} until it reconnects "
                                   f"(QoS {delivered_qos})")
