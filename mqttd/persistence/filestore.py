"""The file store: a pickled snapshot plus the append-only journal.

Directory layout::

    LOCK                      flock'ed while a store has the directory open
    snapshot.pkl              checkpoint (absent until the first compaction)
    journal.<g>               journals with g >= the snapshot's generation
    *.corrupt-<time>          damaged files set aside by recovery

Snapshot format (big-endian)::

    header   8s magic b"MQTTDSNP" | u32 FORMAT_VERSION | u64 generation
    frames   the journal's record framing (mark | u32 length | u32 crc32 | payload)

Each frame's payload is a :mod:`~mqttd.persistence.safepickle` pickle of one
checkpoint item (:func:`~mqttd.persistence.journal.state_items`: a session,
a chunk of up to 1000 of its outbound messages, a chunk of retained
messages); the last frame is ``("end", counts)``.  Small pickles keep the
reactor responsive while a worker thread writes a large snapshot, and the
end frame proves the snapshot complete.  It is written to
``snapshot.pkl.tmp``, fsynced, renamed over ``snapshot.pkl`` and the
directory fsynced; then the journals it covers are deleted.
"""
from __future__ import annotations

import os
import pickle
import struct

from twisted.logger import Logger

from mqttd.persistence import safepickle
from mqttd.persistence.journal import (
    DEFAULT_COMPACT_BYTES, RECORD_HEADER, JournaledStore, StateAssembler, aside_path,
    encode_record, fsync_dir, state_counts, state_items, valid_record_at)
from mqttd.persistence.records import FORMAT_VERSION, StoredState

log = Logger(namespace="mqttd.persistence")

SNAPSHOT_NAME = "snapshot.pkl"
SNAPSHOT_MAGIC = b"MQTTDSNP"
SNAPSHOT_HEADER = struct.Struct(">8sIQ")


class SnapshotError(Exception):
    pass


def write_snapshot(path: str, state: StoredState, generation: int, fsync=os.fsync) -> None:
    """Write ``state`` to ``path`` atomically (tmp, fsync, rename, fsync dir)."""
    tmp = path + ".tmp"
    with open(tmp, "wb", buffering=1 << 20) as f:
        f.write(SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, FORMAT_VERSION, generation))
        for item in state_items(state):
            f.write(encode_record(safepickle.dumps(item)))
        f.write(encode_record(safepickle.dumps(("end", state_counts(state)))))
        f.flush()
        fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path), fsync)


def decode_snapshot(data: bytes):
    """Return ``(state, generation)``; raise SnapshotError for anything wrong."""
    if len(data) < SNAPSHOT_HEADER.size:
        raise SnapshotError("file too short for a snapshot header")
    magic, version, generation = SNAPSHOT_HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotError("bad magic (not an mqttd snapshot)")
    if version > FORMAT_VERSION:
        raise SnapshotError(f"format version {version} is newer than this mqttd "
                            f"supports ({FORMAT_VERSION})")
    if version < 1:
        raise SnapshotError(f"unknown format version {version}")
    assembler = StateAssembler()
    view = memoryview(data)
    offset = SNAPSHOT_HEADER.size
    while True:
        if not valid_record_at(data, offset):
            raise SnapshotError(f"bad or missing frame at offset {offset}")
        length = RECORD_HEADER.unpack_from(data, offset)[1]
        start = offset + RECORD_HEADER.size
        try:
            item = safepickle.loads(view[start:start + length])
        except pickle.UnpicklingError as e:
            raise SnapshotError(f"cannot unpickle frame at offset {offset}: {e}") from e
        offset = start + length
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "end":
            if offset != len(data):
                raise SnapshotError(f"data after the end frame at offset {offset}")
            try:
                return assembler.finish(item[1]), generation
            except ValueError as e:
                raise SnapshotError(str(e)) from e
        try:
            assembler.add(item)
        except ValueError as e:
            raise SnapshotError(f"frame at offset {start}: {e}") from e


class FileStore(JournaledStore):
    """Durable store in directory ``path``: ``snapshot.pkl`` + ``journal.<g>``.

    See :class:`~mqttd.persistence.journal.JournaledStore` for the options.
    """

    def __init__(self, path, reactor, fsync="always", compact_bytes=DEFAULT_COMPACT_BYTES,
                 **options):
        super().__init__(path, reactor, fsync=fsync, compact_bytes=compact_bytes, **options)
        self.snapshot_path = os.path.join(self.path, SNAPSHOT_NAME)

    def _load_checkpoint(self):
        try:
            with open(self.snapshot_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, 0, False
        try:
            state, generation = decode_snapshot(data)
        except SnapshotError as e:
            moved = aside_path(self.snapshot_path, "corrupt", self._reactor.seconds())
            os.rename(self.snapshot_path, moved)
            log.error("Corrupt snapshot {path} moved aside to {moved}: {error}; "
                      "starting from the journals alone",
                      path=self.snapshot_path, moved=moved, error=str(e))
            return None, 0, True
        return state, generation, False

    def _write_checkpoint(self, state, generation):
        write_snapshot(self.snapshot_path, state, generation, self._fsync)
