"""The file store: a pickled snapshot plus the append-only journal.

Directory layout::

    LOCK                      flock'ed while a store has the directory open
    snapshot.pkl              checkpoint (absent until the first compaction)
    journal.<g>               journals with g >= the snapshot's generation
    *.damaged-<time>          damaged byte ranges kept aside by recovery
    *.corrupt-<time>          whole files set aside (unusable, or from a newer mqttd)

Snapshot format (big-endian)::

    header   8s magic b"MQTTDSNP" | u32 FORMAT_VERSION | u64 generation
    frames   the journal's record framing (mark | u32 length | u32 crc32 | payload)

Each frame's payload is a :mod:`~mqttd.persistence.safepickle` pickle of one
checkpoint item (:func:`~mqttd.persistence.journal.state_items`: a session,
a chunk of up to 16 of its outbound messages, a chunk of up to 16 retained
messages); the last frame is ``("end", counts)`` (format 3 adds
``generation`` and ``version`` to the counts).  Small pickles keep the
reactor responsive while a worker thread writes a large snapshot; the end
frame proves the snapshot complete and tells what a damaged one lost.
Reading resynchronises on the next valid frame after damage
(:func:`read_snapshot`): a flipped byte costs the frame it is in.  It is written to
``snapshot.pkl.tmp``, fsynced, renamed over ``snapshot.pkl`` and the
directory fsynced; then the journals it covers are deleted.
"""
from __future__ import annotations

import os
import pickle
import struct
from typing import Optional

import attrs
from twisted.logger import Logger

from mqttd.persistence import safepickle
from mqttd.persistence.journal import (
    DEFAULT_COMPACT_BYTES, FILE_MODE, RECORD_HEADER, JournaledStore, StateAssembler,
    aside_path, encode_record, fsync_dir, keep_damaged, lost_counts, scan_frames,
    state_counts, state_items)
from mqttd.persistence.records import FORMAT_VERSION, StoredState

log = Logger(namespace="mqttd.persistence")

SNAPSHOT_NAME = "snapshot.pkl"
SNAPSHOT_MAGIC = b"MQTTDSNP"
SNAPSHOT_HEADER = struct.Struct(">8sIQ")


class SnapshotError(Exception):
    """The snapshot cannot be used at all (not a snapshot, or a newer format)."""


@attrs.define
class SnapshotRead:
    """A snapshot read without side effects (:func:`read_snapshot`)."""

    state: StoredState
    generation: int
    #: frames with a valid CRC
    frames: int = 0
    #: ``(start, end)`` damaged byte ranges
    damaged: list = attrs.Factory(list)
    #: what the end frame says was written (None: end frame lost)
    expected: Optional[dict] = None
    #: the first reason a frame could not be used ("" if none)
    reason: str = ""
    #: client ids whose session record was lost but whose messages were kept
    orphans: list = attrs.Factory(list)
    #: frames with one flipped bit that were repaired
    repaired: int = 0

    @property
    def lost(self) -> Optional[dict]:
        return lost_counts(self.state, self.expected)

    @property
    def intact(self) -> bool:
        """Nothing damaged, nothing missing against the counts written."""
        lost = self.lost
        return (not self.damaged and lost is not None and not any(lost.values())
                and not self.orphans and not self.reason and not self.repaired)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, FILE_MODE)


def write_snapshot(path: str, state: StoredState, generation: int, fsync=os.fsync) -> None:
    """Write ``state`` to ``path`` atomically (tmp, fsync, rename, fsync dir)."""
    tmp = path + ".tmp"
    end = dict(state_counts(state), generation=generation, version=FORMAT_VERSION)
    with open(tmp, "wb", buffering=1 << 20, opener=_private_opener) as f:
        os.fchmod(f.fileno(), FILE_MODE)  # a stale tmp file keeps its old mode otherwise
        f.write(SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, FORMAT_VERSION, generation))
        for item in state_items(state):
            f.write(encode_record(safepickle.dumps(item)))
        f.write(encode_record(safepickle.dumps(("end", end))))
        f.flush()
        fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path), fsync)


def read_snapshot(data: bytes) -> SnapshotRead:
    """Read a snapshot, losing only damaged frames.

    Raises :class:`SnapshotError` when nothing can be used: no header and no
    end frame to learn the generation from, a newer format, no valid frame.
    Format 3 end frames repeat the generation and version, so a damaged
    header costs nothing.
    """
    if len(data) < SNAPSHOT_HEADER.size:
        raise SnapshotError("file too short for a snapshot header")
    magic, version, generation = SNAPSHOT_HEADER.unpack_from(data, 0)
    scan = scan_frames(data, SNAPSHOT_HEADER.size)
    if not scan.frames:
        raise SnapshotError("bad magic (not an mqttd snapshot)" if magic != SNAPSHOT_MAGIC
                            else f"no readable frame after offset {SNAPSHOT_HEADER.size}")
    assembler = StateAssembler()
    damaged = list(scan.damaged)
    repaired = len(scan.repaired)
    end = None
    reason = ""
    for offset, payload in scan.frames:
        where = (offset, offset + RECORD_HEADER.size + len(payload))
        try:
            item = safepickle.loads(payload)
        except pickle.UnpicklingError as e:
            damaged.append(where)
            reason = reason or f"cannot unpickle frame at offset {offset}: {e}"
            continue
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "end":
            if isinstance(item[1], dict):
                end = item[1]
            continue
        try:
            assembler.add(item)
        except ValueError as e:
            damaged.append(where)
            reason = reason or f"frame at offset {offset}: {e}"
    header_ok = magic == SNAPSHOT_MAGIC and 1 <= version <= FORMAT_VERSION
    if end is not None and isinstance(end.get("generation"), int):
        if end.get("version", 1) > FORMAT_VERSION:
            raise SnapshotError(f"format version {end.get('version')} is newer than this "
                                f"mqttd supports ({FORMAT_VERSION})")
        if not header_ok or generation != end["generation"]:
            repaired += 1           # rebuilt from the end frame: nothing lost
            generation = end["generation"]
    else:
        if magic != SNAPSHOT_MAGIC:
            raise SnapshotError("bad magic (not an mqttd snapshot)")
        if version > FORMAT_VERSION:
            raise SnapshotError(f"format version {version} is newer than this mqttd "
                                f"supports ({FORMAT_VERSION})")
        if version < 1:
            raise SnapshotError(f"unknown format version {version}")
        if end is None:
            reason = reason or "end frame missing: cannot tell how much was lost"
    state = assembler.finish(tolerant=True)
    return SnapshotRead(state, generation, len(scan.frames), sorted(damaged), end,
                        reason, assembler.orphans, repaired)


def decode_snapshot(data: bytes):
    """Return ``(state, generation)`` of an undamaged snapshot; raise SnapshotError otherwise."""
    read = read_snapshot(data)
    if not read.intact:
        raise SnapshotError(read.reason or "damaged or incomplete")
    return read.state, read.generation


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
        now = self._reactor.seconds()
        try:
            read = read_snapshot(data)
        except SnapshotError as e:
            moved = aside_path(self.snapshot_path, "corrupt", now)
            os.rename(self.snapshot_path, moved)
            log.error("Corrupt snapshot {path} moved aside to {moved}: {error}; "
                      "starting from the journals alone",
                      path=self.snapshot_path, moved=moved, error=str(e))
            return None, 0, True
        if read.intact:
            return read.state, read.generation, False
        report_damaged_checkpoint(self.snapshot_path, data, read, now, self._fsync)
        return read.state, read.generation, True

    def _write_checkpoint(self, state, generation):
        write_snapshot(self.snapshot_path, state, generation, self._fsync)


def report_damaged_checkpoint(path, data, read, now, fsync) -> None:
    """Keep the damaged bytes of a checkpoint aside and log once what was lost."""
    lost = read.lost
    if (read.repaired and not read.damaged and not read.reason and not read.orphans
            and lost is not None and not any(lost.values())):
        log.warn("Repaired {repaired} frames with one flipped bit in checkpoint {path}; "
                 "nothing lost", path=path, repaired=read.repaired)
        return
    moved = keep_damaged(path, data, read.damaged, now, fsync)
    log.error("Damaged checkpoint {path}: {ranges} damaged byte ranges ({damaged} bytes) "
              "kept in {moved} ({error}); recovered {frames} good frames ({repaired} "
              "repaired); lost {lost}{orphans}", repaired=read.repaired,
              path=path, ranges=len(read.damaged), moved=moved,
              error=read.reason or "frames missing",
              damaged=sum(e - s for s, e in read.damaged), frames=read.frames,
              lost=("unknown (end frame damaged)" if lost is None else
                    "{sessions} sessions, {outbound} queued messages, "
                    "{retained} retained messages".format(**lost)),
              orphans=(f"; {len(read.orphans)} sessions whose record was lost keep their "
                       f"messages without subscriptions" if read.orphans else ""),
              lost_counts=lost)
