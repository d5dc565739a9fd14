"""Subscription changes and session (dis)connections are journaled as deltas (REVIEW-S9 R15).

Format 5 journals a SUBSCRIBE as one ``PutSubscription`` per filter, an UNSUBSCRIBE as one
``DeleteSubscription`` per filter and a (re)connect / close as ``PutSessionState`` (the
session's fields without its subscriptions), so the bytes written per change do not grow
with the session's subscription count.  Stores written in format 4 (whole-record
``PutSession`` only) still open.
"""
from __future__ import annotations

from mqttd.messages import Message
from mqttd.persistence.records import (
    AddInboundQos2, DeleteSession, OutboundRecord, PutOutbound, PutRetained, PutSession,
    PutWill, SessionRecord, SubscriptionRecord, WillRecord)

# --- the operations of the format 4 fixtures (see fixtures/make_format4.py) --------------

_SUBS_A = (SubscriptionRecord("a/#", 1), SubscriptionRecord("b/+/c", 0),
           SubscriptionRecord("$share/g/s/t", 2, subscription_identifier=7),
           SubscriptionRecord("v5/opts", 1, True, True, 2, 12))

FORMAT4_OPS = [
    PutSession(SessionRecord("old-v3", 4, _SUBS_A[:2], None, 1000.5, "alice")),
    PutSession(SessionRecord("old-v5", 5, _SUBS_A, 3600, None, None)),
    PutSession(SessionRecord("gone", 4, (SubscriptionRecord("x/y", 1),))),
    PutOutbound("old-v3", OutboundRecord(1, Message("a/1", b"one", 1), 1)),
    PutOutbound("old-v3", OutboundRecord(2, Message("a/2", b"two", 1), 1, 5)),
    AddInboundQos2("old-v5", 9),
    PutRetained(Message("r/1", b"kept", 1, True)),
    PutWill(WillRecord("old-v5", Message("will/t", b"bye", 1), 2000.0)),
    # FORMAT4_SPLIT: the checkpoint holds the above, the journal what follows
    PutSession(SessionRecord("old-v3", 4, _SUBS_A[:2] + (SubscriptionRecord("new/#", 2),),
                             None, None, "alice")),
    PutSession(SessionRecord("old-v5", 5, _SUBS_A[1:], 3600, 1500.25, None)),
    DeleteSession("gone"),
    PutSession(SessionRecord("late", 4, (SubscriptionRecord("l/1", 0),
                                         SubscriptionRecord("l/2", 1)))),
    PutOutbound("late", OutboundRecord(1, Message("l/2", b"q", 1), 1)),
]
FORMAT4_SPLIT = 8
