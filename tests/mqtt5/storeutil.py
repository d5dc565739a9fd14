"""A durable in-memory store for the MQTT 5 feature tests: it records every
operation and rebuilds the stored state through the allow-listed pickle, as a
restart from disk would."""
from __future__ import annotations

from twisted.internet import defer

from mqttd.persistence import records as R
from mqttd.persistence import safepickle


class RecordingStore:
    durable = True

    def __init__(self):
        self.ops = []

    def open(self):
        return R.StoredState()

    def write(self, op):
        self.ops.append(safepickle.dumps(op))

    def sync(self):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    def stored_state(self) -> R.StoredState:
        """What a broker restarted on this store would restore."""
        state = R.StoredState()
        for data in self.ops:
            R.apply_op(state, safepickle.loads(data))
        return state
