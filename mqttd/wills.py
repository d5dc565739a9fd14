"""Will Delay Interval: the scheduler of delayed wills (layer L1).

When a connection with a will ends without a DISCONNECT 0x00, the will is
published after its Will Delay Interval or when its session ends, whichever
comes first, and not at all if a new connection resumes the session before the
delay has passed [MQTT-3.1.2-8], [MQTT-3.1.3-9] (MQTT 5.0 §3.1.3.2.2).

:class:`WillScheduler` keeps at most one pending will per client id, each as a
durable :class:`~mqttd.persistence.records.WillRecord` (the broker writes
``PutWill`` / ``DeleteWill`` through the callbacks it passes in), and one timer
per will on the injected clock.  After a restart :meth:`WillScheduler.restore`
re-arms the stored wills; a will whose time passed while the broker was down
fires at once.

The scheduler decides *when*; the broker's ``publish`` callback decides what
publishing means (routing, retained, ``$SYS`` refusal).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

from twisted.logger import Logger

from mqttd.messages import Message
from mqttd.persistence import records as R

log = Logger(namespace="mqttd.wills")

__all__ = ["WillScheduler"]


class WillScheduler:
    """Pending delayed wills, by client id.

    :param clock: ``IReactorTime`` (``seconds``, ``callLater``).
    :param publish: ``publish(client_id, message)`` publishes a will now; the
        message's ``expires_at`` is still unset (its Message Expiry Interval
        counts from publication).
    :param write: ``write(operation)`` persists a store operation
        (``PutWill`` / ``DeleteWill``).

    ``limiter``: a :class:`~mqttd.ratelimit.LogRateLimiter` for the
    client-triggered lines (a cancelled delayed will), set by the broker;
    None logs every line.
    """

    limiter = None

    def __init__(self, clock, publish: Callable[[str, Message], None],
                 write: Callable[[object], None]):
        self._clock = clock
        self._publish = publish
        self._write = write
        self._pending: Dict[str, R.WillRecord] = {}
        self._calls: Dict[str, object] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._pending

    def pending(self, client_id: str) -> Optional[R.WillRecord]:
        return self._pending.get(client_id)

    def records(self) -> Iterable[R.WillRecord]:
        return list(self._pending.values())

    def schedule(self, client_id: str, message: Message, delay: float,
                 durable: bool) -> None:
        """Publish ``message`` for ``client_id`` after ``delay`` seconds.

        ``delay`` <= 0 publishes at once.  ``durable``: store the pending will
        (the session is persistent, so it may outlive the process).  A will
        already pending for the client is replaced (it was published or
        cancelled by the caller first, see :meth:`session_resumed`).
        """
        self._drop(client_id, write=False)
        if delay <= 0:
            self._fire_message(client_id, message)
            return
        record = R.WillRecord(client_id, message, self._clock.seconds() + delay, durable)
        self._arm(record)
        if durable:
            self._write(R.PutWill(record))

    def session_resumed(self, client_id: str) -> bool:
        """A new connection took the session over in time: the will is not sent
        [MQTT-3.1.3-9].  Returns True if a will was pending."""
        record = self._pending.get(client_id)
        if record is None:
            return False
        if self.limiter is None:
            log.info("Delayed will of {client_id} cancelled: the client reconnected",
                     client_id=client_id)
        else:
            self.limiter.emit(log.info, (client_id, "will-cancelled"),
                              "Delayed will of {client_id} cancelled: the client reconnected",
                              client_id=client_id)
        self._drop(client_id, write=record.durable)
        return True

    def session_resumed_elsewhere(self, client_id: str, publish: bool) -> bool:
        """Another broker node took the session over: a pending will is
        published now if ``publish`` (the new owner started a clean session:
        the old one ended [MQTT-3.1.2-8]), else forgotten without a store
        write (the new owner resumed it [MQTT-3.1.3-9]).  True if one was pending."""
        if client_id not in self._pending:
            return False
        if publish:
            record = self._drop(client_id, write=False)
            self._fire_message(client_id, record.message)
        else:
            self._drop(client_id, write=False)
        return True

    def cancel(self, client_id: str) -> Optional[R.WillRecord]:
        """Forget the pending will of ``client_id`` without publishing it (its
        topic is no longer allowed); the stored record is deleted.  Returns
        the record, or None if none was pending."""
        record = self._pending.get(client_id)
        if record is None:
            return None
        return self._drop(client_id, write=record.durable)

    def session_ended(self, client_id: str) -> bool:
        """The session is gone (expired, discarded, replaced by a clean start):
        a pending will is published now [MQTT-3.1.2-8].  True if one was."""
        if client_id not in self._pending:
            return False
        self._fire(client_id)
        return True

    def restore(self, wills: Iterable[R.WillRecord], known_sessions) -> None:
        """Re-arm stored wills after a restart (late ones fire at once).

        A will whose session is not in ``known_sessions`` fires at once: its
        session ended while the broker was down.
        """
        now = self._clock.seconds()
        for record in wills:
            if record.client_id not in known_sessions:
                record = R.WillRecord(record.client_id, record.message, now, record.durable)
            self._arm(record)

    def stop(self) -> None:
        """Cancel the timers (shutdown); the stored records stay for the next start."""
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()

    # --- internals ----------------------------------------------------------

    def _arm(self, record: R.WillRecord) -> None:
        delay = max(0.0, record.publish_at - self._clock.seconds())
        self._pending[record.client_id] = record
        self._calls[record.client_id] = self._clock.callLater(delay, self._fire,
                                                              record.client_id)

    def _drop(self, client_id: str, write: bool) -> Optional[R.WillRecord]:
        record = self._pending.pop(client_id, None)
        call = self._calls.pop(client_id, None)
        if call is not None and call.active():
            call.cancel()
        if record is not None and write:
            self._write(R.DeleteWill(client_id))
        return record

    def _fire(self, client_id: str) -> None:
        record = self._drop(client_id, write=False)
        if record is None:
            return
        try:
            self._fire_message(client_id, record.message)
        finally:
            if record.durable:
                # written after the publish: a crash in between publishes twice
                # (at least once), never loses the will
                self._write(R.DeleteWill(client_id))

    def _fire_message(self, client_id: str, message: Message) -> None:
        try:
            self._publish(client_id, message)
        except Exception:
            log.failure("Publishing the will of {client_id} failed", client_id=client_id)
