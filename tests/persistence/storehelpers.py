"""Helpers shared by the store tests: backends, synchronous runners, sample records."""
from __future__ import annotations

import os

import attrs
from twisted.internet import defer, task
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mqttd.codec.packets import Properties
from mqttd.messages import Message
from mqttd.persistence import store_from_spec
from mqttd.persistence.records import (
    OutboundRecord, PutOutbound, PutSession, SessionRecord, StoredState, SubscriptionRecord,
    apply_op)

BACKENDS = ["memory", "file", "dbm"]
DURABLE = ["file", "dbm"]


def run_synchronously(f, *args):
    """A ``run_in_thread`` that runs the job at once in the calling thread."""
    return defer.maybeDeferred(f, *args)


def result_of(d):
    """The result of an already fired Deferred (raise its failure)."""
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def reference_state(ops) -> StoredState:
    """What the ops mean, by the one definition (apply_op)."""
    state = StoredState()
    for op in ops:
        apply_op(state, op)
    return state


def abandon(store) -> None:
    """Drop a durable store as a killed process would: no flush, no checkpoint."""
    if store._flush_call is not None and store._flush_call.active():
        store._flush_call.cancel()
    for fd in store._retired + [store._fd]:
        os.close(fd)
    store._retired, store._fd = [], None
    store._stop_threads()
    store._unlock()
    store._state = "closed"


@attrs.define
class StoreMaker:
    """Makes stores of one backend on one directory (synchronous by default)."""

    kind: str
    path: str
    reactor: object = attrs.field(factory=task.Clock)

    @property
    def durable(self) -> bool:
        return self.kind != "memory"

    def __call__(self, **options):
        if self.kind != "memory":
            options.setdefault("run_in_thread", run_synchronously)
        spec = "memory" if self.kind == "memory" else f"{self.kind}:{self.path}"
        return store_from_spec(spec, self.reactor, **options)

    def write_all(self, store, ops, sync=True):
        for op in ops:
            store.write(op)
        if sync:
            result_of(store.sync())

    def reopen(self, store, **options):
        """Close ``store`` and open a new one on the same directory."""
        result_of(store.close())
        new = self(**options)
        return new, new.open()


def events_at(events, level: LogLevel):
    return [e for e in events if e.get("log_level") == level]


# --- sample records ---------------------------------------------------------

def session(client_id="c1", *subscriptions, **kw) -> PutSession:
    subs = tuple(SubscriptionRecord(f, qos) for f, qos in subscriptions) or (
        SubscriptionRecord("a/#", 1),)
    return PutSession(SessionRecord(client_id, subscriptions=subs, **kw))


def message(topic="t/1", payload=b"x" * 64, qos=1, **kw) -> Message:
    return Message(topic, payload, qos, **kw)


def outbound(client_id="c1", seq=1, **kw) -> PutOutbound:
    return PutOutbound(client_id, OutboundRecord(seq, message(payload=b"m%d" % seq), 1, **kw))


RICH_MESSAGE = Message(
    "rich/topic", b"\x00\xffbinary", 2, True,
    Properties(payload_format_indicator=1, content_type="text/plain",
               response_topic="reply/here", correlation_data=b"\x01\x02",
               user_properties=(("k", "v"), ("k", "v2")), message_expiry_interval=60),
    origin="publisher", expires_at=1234.5)

