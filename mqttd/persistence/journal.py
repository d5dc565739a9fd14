"""The write-ahead journal shared by the durable stores, with group commit.

A data directory holds a *checkpoint* (what it is depends on the backend: a
pickled snapshot for :class:`~mqttd.persistence.filestore.FileStore`, a dbm
file set for :class:`~mqttd.persistence.dbmstore.DbmStore`) stamped with a
generation ``g``, plus journals ``journal.<n>`` for ``n >= g``.  Recovery
loads the checkpoint and replays the journals in order with
:func:`~mqttd.persistence.records.apply_op`.

Journal file format (all integers big-endian)::

    header   8s magic b"MQTTDJNL" | u32 FORMAT_VERSION | u64 generation
    record   4s mark  b"\\xa7MQR"  | u32 length | u32 crc32(payload) | payload

``payload`` is a :mod:`~mqttd.persistence.safepickle` pickle of the list of
operations written during one reactor turn (one ``os.write`` per batch).  The
record mark lets recovery tell a torn tail (nothing valid follows the damage:
skipped with a WARNING, file truncated) from damage in the middle (a valid
record follows: ERROR, replay stops there, the journal is set aside).

Group commit: :meth:`JournaledStore.sync` first writes the pending batch, then
waits for an fsync that started after that write.  At most one fsync runs at a
time (in a thread); requests arriving meanwhile are all served by the next one,
and Deferreds fire in the order of the requests.

Layer L3: no global reactor; the reactor (for ``callLater`` and the thread
pool) is passed in.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import os
import pickle
import re
import stat
import struct
import time
import zlib
from typing import List, Optional, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mqttd.interfaces import IBrokerStore
from mqttd.persistence import opcodec, safepickle
from mqttd.messages import Message, message_key
from mqttd.metrics import LatencyHistogram
from mqttd.persistence.records import (
    APPLY_HANDLERS, FORMAT_VERSION, OPERATION_TYPES, AddInboundQos2, OutboundRecord,
    OutboundRef, PutOutbound, PutOutboundMessage, PutOutboundRef, PutSubscription,
    SessionRecord, StoredSession, WillRecord, StoredState, add_message, apply_op,
    drop_unreferenced, hold_message, link_outbound, resolve_ref, share_equal_messages)

log = Logger(namespace="mqttd.persistence")

#: mode of every file the store creates and of the data directory it creates:
#: queued and retained payloads and session owners are for the broker's user
#: only, whatever the umask (as mosquitto's persistence file)
FILE_MODE = 0o600
DIR_MODE = 0o700

MiB = 1024 * 1024
DEFAULT_COMPACT_BYTES = 64 * MiB

JOURNAL_MAGIC = b"MQTTDJNL"
JOURNAL_HEADER = struct.Struct(">8sIQ")
RECORD_MARK = b"\xa7MQR"
RECORD_HEADER = struct.Struct(">4sII")
MAX_RECORD = 1 << 31

_JOURNAL_NAME = re.compile(r"^journal\.(\d+)$")
_NON_ZERO = re.compile(rb"[^\x00]")
_OP_TYPES = frozenset(OPERATION_TYPES)


class StoreError(Exception):
    """The store cannot do what was asked (closed, or a write/fsync failed)."""


class StoreUnavailable(StoreError):
    """The store cannot write right now (disk full, I/O error); it retries by itself.

    ``errno`` is the OS error number of the failure (``errno.ENOSPC`` for a
    full disk), or None.
    """

    def __init__(self, message: str, errno_: Optional[int] = None):
        super().__init__(message)
        self.errno = errno_


class StoreLockedError(StoreError):
    """Another process (or another store object) has this data directory open."""


# --- helpers ----------------------------------------------------------------

def parse_fsync_mode(mode: str) -> Tuple[str, Optional[float]]:
    """``"always"``, ``"never"`` or ``"interval:N"`` (N milliseconds, > 0)."""
    if mode in ("always", "never"):
        return mode, None
    if isinstance(mode, str) and mode.startswith("interval:"):
        try:
            ms = float(mode[len("interval:"):])
        except ValueError:
            ms = 0
        if ms > 0:
            return "interval", ms / 1000.0
    raise ValueError(
        f"fsync must be 'always', 'never' or 'interval:N' (N milliseconds > 0), not {mode!r}")


def copy_state(state: StoredState) -> StoredState:
    """A copy sharing the (immutable) records and messages; safe to read from
    another thread (the message table is copied too)."""
    copy = StoredState(
        {cid: StoredSession(s.record, dict(s.outbound), set(s.inbound_qos2))
         for cid, s in state.sessions.items()},
        dict(state.retained), dict(state.wills))
    copy.messages = dict(state.messages)
    copy.next_message_id = state.next_message_id
    copy.message_refs = dict(state.message_refs)
    copy.message_ids = dict(state.message_ids)
    return copy


def sort_outbound(state: StoredState) -> None:
    """Put every session's outbound dict in seq order (in place)."""
    for session in state.sessions.values():
        seqs = list(session.outbound)
        if any(a > b for a, b in zip(seqs, seqs[1:])):
            session.outbound = dict(sorted(session.outbound.items()))


#: records per checkpoint item: small pickles keep the reactor thread
#: responsive while a checkpoint is pickled in a worker thread (one 100k-message
#: pickle holds the GIL for up to 300 ms at a stretch; 1000-record chunks ~30 ms)
#: (and 16 records per item bounds what one damaged byte of a checkpoint
#: costs: the frame it is in)
CHUNK = 16

#: a message-table frame is closed once it holds this many payload bytes: a
#: damaged frame costs its messages for every session owing them, so large
#: messages get a frame each, and small frames stay within single-bit repair
#: (MAX_REPAIRABLE)
MESSAGE_FRAME_BYTES = 8 * 1024


def message_index(state: StoredState) -> dict:
    """``message_key(message) -> message id`` for every message an outbound record of
    ``state`` holds.  A message missing from the table (a state built without
    :func:`~mqttd.persistence.records.apply_op`) is added to it; a store's
    own state never lacks one."""
    index = state.message_ids
    for session in state.sessions.values():
        for record in session.outbound.values():
            if message_key(record.message) not in index:
                hold_message(state, record.message)
    return index


def state_items(state: StoredState):
    """Cut ``state`` into picklable checkpoint items, in a stable order.

    ``("s", SessionRecord, (inbound qos2 ids...))`` for each session, then
    ``("m", ((message id, Message)...))`` chunks: the message table, each
    message that some session is owed exactly once (format 6), then ``("l",
    client_id, (OutboundRef...))`` chunks of each session's references in
    seq order, then ``("r", (Message...))`` chunks of retained messages, then
    ``("w", (WillRecord...))`` chunks of pending delayed wills.  (Formats
    before 6 had ``("o", client_id, (OutboundRecord...))`` chunks, one copy
    of the message per session; :class:`StateAssembler` still reads them.)
    """
    index = message_index(state)
    used = set()
    links = []
    for client_id, session in state.sessions.items():
        yield "s", session.record, tuple(sorted(session.inbound_qos2))
        if session.outbound:
            refs = []
            for record in sorted(session.outbound.values(), key=lambda r: r.seq):
                mid = index[message_key(record.message)]
                used.add(mid)
                refs.append(OutboundRef(record.seq, mid, record.qos, record.packet_id,
                                        record.stage, record.share))
            links.append((client_id, refs))
    messages = state.messages
    chunk: list = []
    chunk_bytes = 0
    for mid in sorted(used):
        message = messages[mid]
        chunk.append((mid, message))
        chunk_bytes += len(message.payload) + len(message.topic)
        if len(chunk) == CHUNK or chunk_bytes >= MESSAGE_FRAME_BYTES:
            yield "m", tuple(chunk)
            chunk, chunk_bytes = [], 0
    if chunk:
        yield "m", tuple(chunk)
    for client_id, refs in links:
        for start in range(0, len(refs), CHUNK):
            yield "l", client_id, tuple(refs[start:start + CHUNK])
    retained = tuple(state.retained.values())
    for start in range(0, len(retained), CHUNK):
        yield "r", retained[start:start + CHUNK]
    wills = tuple(state.wills.values())
    for start in range(0, len(wills), CHUNK):
        yield "w", wills[start:start + CHUNK]


def state_counts(state: StoredState) -> dict:
    """What a checkpoint of ``state`` holds (its end/meta frame): sessions,
    outbound records, retained messages, wills and (format 6) distinct
    messages of the message table."""
    outbound = 0
    held = set()
    for session in state.sessions.values():
        outbound += len(session.outbound)
        for record in session.outbound.values():
            held.add(id(record.message))
    return {"sessions": len(state.sessions),
            "outbound": outbound,
            "retained": len(state.retained),
            "wills": len(state.wills),
            "messages": len(held)}


class StateAssembler:
    """Rebuilds a StoredState from :func:`state_items`; raises ValueError on nonsense."""

    def __init__(self):
        self.state = StoredState()
        self._outbound = collections.defaultdict(list)
        #: client id -> OutboundRefs (format 6), resolved in finish()
        self._refs = collections.defaultdict(list)
        #: client ids whose outbound messages were found without their session
        #: record (tolerant finish: kept under a record without subscriptions)
        self.orphans: List[str] = []
        #: references to a message that is not in the table (its frame was
        #: damaged): those outbound messages are lost
        self.dangling = 0
        #: outbound records of a format < 6 checkpoint (one copy per session)
        self.legacy = 0

    def add(self, item) -> None:
        if not isinstance(item, tuple) or not item:
            raise ValueError(f"not a checkpoint item: {type(item).__name__}")
        kind = item[0]
        if kind == "s" and len(item) == 3 and isinstance(item[1], SessionRecord):
            self.state.sessions[item[1].client_id] = StoredSession(
                item[1], {}, {int(p) for p in item[2]})
        elif kind == "l" and len(item) == 3 and isinstance(item[1], str) and all(
                isinstance(r, OutboundRef) for r in item[2]):
            self._refs[item[1]].extend(item[2])
        elif kind == "m" and len(item) == 2 and all(
                isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], int)
                and isinstance(e[1], Message) for e in item[1]):
            for mid, message in item[1]:
                add_message(self.state, mid, message)
        elif kind == "o" and len(item) == 3 and all(
                isinstance(r, OutboundRecord) for r in item[2]):
            self._outbound[item[1]].extend(item[2])
            self.legacy += len(item[2])
        elif kind == "r" and len(item) == 2 and all(isinstance(m, Message) for m in item[1]):
            for message in item[1]:
                self.state.retained[message.topic] = message
        elif kind == "w" and len(item) == 2 and all(
                isinstance(w, WillRecord) for w in item[1]):
            for will in item[1]:
                self.state.wills[will.client_id] = will
        else:
            raise ValueError(f"malformed checkpoint item of kind {kind!r}")

    def finish(self, expected_counts: Optional[dict] = None,
               tolerant: bool = False) -> StoredState:
        """The state; strict (default) raises ValueError if it is incomplete.

        ``tolerant``: outbound messages of a session whose record is missing
        are kept under a fresh :class:`SessionRecord` (no subscriptions,
        never expires), listed in :attr:`orphans`; counts are not checked
        (see :func:`lost_counts`).  References to a message whose frame was
        lost are dropped (counted in :attr:`dangling`).
        """
        state = self.state
        owed = collections.defaultdict(list)
        for client_id, records in self._outbound.items():
            owed[client_id].extend(records)
        for client_id, refs in self._refs.items():
            records = owed[client_id]
            for ref in refs:
                record = resolve_ref(state, ref)
                if record is None:
                    self.dangling += 1
                else:
                    records.append(record)
        for client_id, records in owed.items():
            session = state.sessions.get(client_id)
            if session is None:
                if not records:
                    continue
                if not tolerant:
                    raise ValueError(f"outbound messages for unknown session {client_id!r}")
                session = state.sessions[client_id] = StoredSession(
                    SessionRecord(client_id), {}, set())
                self.orphans.append(client_id)
            records.sort(key=lambda r: r.seq)
            for record in records:
                link_outbound(state, client_id, record)
        # (messages no record references stay in the table until the journals
        # were replayed: one whose "l" frame was damaged may be referenced by a
        # later journal record; JournaledStore._recover drops the rest)
        if self.legacy:
            share_equal_messages(state)
        if self.dangling and not tolerant:
            raise ValueError(f"{self.dangling} outbound messages reference a message "
                             f"the checkpoint does not hold")
        if expected_counts is not None and not tolerant:
            counts = state_counts(state)
            for key, value in counts.items():
                # checkpoints of format 1 have no "wills" count (and no wills);
                # formats before 6 no "messages" count
                default = 0 if key == "wills" else value if key == "messages" else None
                if expected_counts.get(key, default) != value:
                    raise ValueError(f"holds {value} {key}, expected "
                                     f"{expected_counts.get(key)}: incomplete")
        return state


def lost_counts(state: StoredState, expected: Optional[dict]) -> Optional[dict]:
    """How many sessions/outbound/retained ``state`` lacks against ``expected``
    (a checkpoint's end-frame counts); None when they are unknown."""
    if not expected:
        return None
    counts = state_counts(state)
    return {key: max(0, int(expected.get(key, 0)) - counts[key]) for key in counts}


def fsync_dir(path: str, fsync=os.fsync) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync(fd)
    finally:
        os.close(fd)


def _write(fd: int, data) -> int:
    return os.write(fd, data)


def write_all(fd: int, data: bytes, write=_write) -> None:
    view = memoryview(data)
    while view:
        written = write(fd, view)
        view = view[written:]


def restrict_permissions(path: str) -> int:
    """Make the store's files in directory ``path`` readable by their owner
    only (files an older mqttd or another umask left group/world-readable:
    mode & ~0o077); warn once if the directory itself lets others in (their
    names stay visible, their contents no longer).  Files of other users are
    left alone.  Returns the number of files changed."""
    changed = 0
    try:
        names = os.listdir(path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0
    uid = os.getuid()
    for name in names:
        full = os.path.join(path, name)
        try:
            info = os.lstat(full)
            if (stat.S_ISREG(info.st_mode) and info.st_mode & 0o077 and info.st_uid == uid):
                os.chmod(full, stat.S_IMODE(info.st_mode) & ~0o077)
                changed += 1
        except OSError:
            continue
    if changed:
        log.warn("Store files in {path} were readable by other users; {changed} made "
                 "owner-only (mode 0600)", path=path, changed=changed)
    if mode & 0o077:
        log.warn("Data directory {path} is accessible to other users (mode {mode}); "
                 "the store's files are owner-only, but consider chmod 700 {path}",
                 path=path, mode=oct(mode)[2:])
    return changed


def atomic_write(path: str, data: bytes, fsync=os.fsync) -> None:
    """Write ``data`` to ``path`` via ``path.tmp``, fsync, rename, fsync the dir."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # a stale tmp file keeps its old mode otherwise
        write_all(fd, data)
        fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".", fsync)


def aside_path(path: str, reason: str, now: float) -> str:
    """A free name ``<path>.<reason>-<UTC timestamp>[.<n>]`` to move a file to."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate = f"{path}.{reason}-{stamp}"
    n = 1
    while os.path.exists(candidate):
        candidate = f"{path}.{reason}-{stamp}.{n}"
        n += 1
    return candidate


def journal_path(directory: str, generation: int) -> str:
    return os.path.join(directory, f"journal.{generation}")


def list_journals(directory: str) -> List[int]:
    gens = []
    for name in os.listdir(directory):
        match = _JOURNAL_NAME.match(name)
        if match:
            gens.append(int(match.group(1)))
    return sorted(gens)


def encode_record(payload: bytes) -> bytes:
    return RECORD_HEADER.pack(RECORD_MARK, len(payload), zlib.crc32(payload)) + payload


def valid_record_at(data, offset: int) -> bool:
    end = len(data)
    if end - offset < RECORD_HEADER.size:
        return False
    mark, length, crc = RECORD_HEADER.unpack_from(data, offset)
    start = offset + RECORD_HEADER.size
    return (mark == RECORD_MARK and 0 < length <= end - start
            and zlib.crc32(data[start:start + length]) == crc)


def next_valid_frame(data, position: int) -> Optional[int]:
    """Offset of the first frame at or after ``position`` with a valid mark,
    length and CRC (the resynchronisation point after damage), or None."""
    probe = data.find(RECORD_MARK, position)
    while probe != -1:
        if valid_record_at(data, probe):
            return probe
        probe = data.find(RECORD_MARK, probe + 1)
    return None


def _looks_torn(data, offset: int) -> bool:
    """Damage running to EOF that looks like an interrupted append (not a flipped byte)."""
    remaining = len(data) - offset
    if remaining < RECORD_HEADER.size:
        return True
    mark, length, _ = RECORD_HEADER.unpack_from(data, offset)
    if not any(data[offset:offset + min(remaining, 4096)]):
        return True   # zeros: the size grew but the data never landed
    return mark == RECORD_MARK and length > remaining - RECORD_HEADER.size


@attrs.define
class FrameScan:
    """What :func:`scan_frames` found in a run of frames."""

    #: ``(offset, payload)`` of every frame with a valid mark, length and CRC
    frames: list = attrs.Factory(list)
    #: ``(start, end)`` byte ranges no valid frame covers, in order
    damaged: list = attrs.Factory(list)
    #: the last damaged range runs to the end of the data and looks like an
    #: interrupted write (a torn tail), not like damage
    torn: bool = False
    #: ``(start, end)`` of frames with one flipped bit, repaired (their
    #: payloads are in ``frames``)
    repaired: list = attrs.Factory(list)

    @property
    def damaged_bytes(self) -> int:
        return sum(end - start for start, end in self.damaged)


# --- single-bit repair ---------------------------------------------------------
#
# CRC-32 (IEEE) has a Hamming distance of at least 4 for frames up to 11 KiB:
# any single flipped bit of a frame (mark, length, CRC or payload) is located
# exactly from the CRC syndrome, and no 2-bit error can pass for a 1-bit one.
# So a frame whose only damage is one flipped bit is repaired, not lost.

_CRC_POLY = 0xEDB88320
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _CRC_POLY if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)
_CRC_TOP = {_CRC_TABLE[_i] >> 24: _i for _i in range(256)}
_CRC_BIT = {_CRC_TABLE[1 << _b]: _b for _b in range(8)}
#: largest frame (header included) repaired: where CRC-32's distance is >= 4
MAX_REPAIRABLE = 11 * 1024


def _bits(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


def _flip_one_bit(payload: bytes, stored_crc: int) -> Optional[bytes]:
    """``payload`` with the one bit flipped that makes its CRC ``stored_crc``, or None."""
    reg = zlib.crc32(payload) ^ stored_crc
    n = len(payload)
    for k in range(n):     # walk the syndrome back one byte at a time
        bit = _CRC_BIT.get(reg)
        if bit is not None:
            fixed = bytearray(payload)
            fixed[n - 1 - k] ^= 1 << bit
            if zlib.crc32(fixed) == stored_crc:
                return bytes(fixed)
        i = _CRC_TOP[reg >> 24]
        reg = (((reg ^ _CRC_TABLE[i]) << 8) & 0xFFFFFFFF) | i
    return None


def repair_frame(data, start: int, stop: int) -> Optional[bytes]:
    """The payload of the frame filling ``data[start:stop]`` if exactly one bit
    of it is flipped (mark, length, CRC or payload), else None."""
    size = stop - start
    header = RECORD_HEADER.size
    if size <= header or size > MAX_REPAIRABLE:
        return None
    raw = bytes(data[start:stop])
    payload = raw[header:]
    actual = zlib.crc32(payload)
    expected_header = RECORD_HEADER.pack(RECORD_MARK, len(payload), actual)
    flipped = _bits(raw[:header], expected_header)
    if flipped == 1:
        return payload      # one bit of the header; the payload matches a CRC
    if flipped == 0 or raw[:8] != expected_header[:8]:
        return None
    # mark and length right, CRC field differs: one bit of the payload?
    return _flip_one_bit(payload, RECORD_HEADER.unpack_from(raw)[2])


def scan_frames(data, start: int, padding: bool = False) -> FrameScan:
    """Split ``data[start:]`` into frames, resynchronising after damage.

    After a bad frame the scan continues at the next offset holding a frame
    with a valid mark, length and CRC32, so one damaged byte costs the
    frame it is in, not everything after it -- and a frame with a single
    flipped bit is repaired (:func:`repair_frame`).  With ``padding``, runs
    of zero bytes between frames (dbm.dumb pads values) are not damage.
    """
    scan = FrameScan()
    view = memoryview(data)
    end = len(data)
    offset = start
    header = RECORD_HEADER.size
    while offset < end:
        if valid_record_at(data, offset):
            length = RECORD_HEADER.unpack_from(data, offset)[1]
            body = offset + header
            scan.frames.append((offset, view[body:body + length]))
            offset = body + length
            continue
        if padding and data[offset] == 0:
            found = _NON_ZERO.search(data, offset)    # skip dbm.dumb's padding
            offset = end if found is None else found.start()
            continue
        probe = next_valid_frame(data, offset + 1)
        stop = end if probe is None else probe
        if padding:
            # pickles end with b"." (STOP): trailing zeros are dbm.dumb's padding
            gap = bytes(view[offset:stop]).rstrip(b"\0")
            if not gap:
                offset = stop
                continue
            stop = offset + len(gap)
        payload = repair_frame(data, offset, stop)
        if payload is not None:
            scan.frames.append((offset, memoryview(payload)))
            scan.repaired.append((offset, stop))
            if probe is None:
                break
            offset = probe
            continue
        scan.damaged.append((offset, stop))
        if probe is None:
            scan.torn = not padding and _looks_torn(data, offset)
            break
        offset = probe
    return scan


DAMAGED_MAGIC = b"MQTTDDMG"
DAMAGED_RANGE = struct.Struct(">QI")


def keep_damaged(path: str, data, ranges, now: float, fsync=os.fsync) -> Optional[str]:
    """Copy the damaged byte ``ranges`` of ``data`` (read from ``path``) to a
    new file ``<path>.damaged-<time>`` and return its name (None if no ranges).

    Format: ``b"MQTTDDMG"`` then per range ``u64 offset | u32 length | bytes``.
    """
    if not ranges:
        return None
    target = aside_path(path, "damaged", now)
    out = [DAMAGED_MAGIC]
    for start, end in ranges:
        out.append(DAMAGED_RANGE.pack(start, end - start))
        out.append(bytes(data[start:end]))
    atomic_write(target, b"".join(out), fsync)
    return target


def read_damaged(data: bytes) -> list:
    """The ``(offset, bytes)`` ranges of a ``.damaged`` file."""
    if not data.startswith(DAMAGED_MAGIC):
        raise ValueError("not a .damaged file")
    ranges, offset = [], len(DAMAGED_MAGIC)
    while offset + DAMAGED_RANGE.size <= len(data):
        start, length = DAMAGED_RANGE.unpack_from(data, offset)
        offset += DAMAGED_RANGE.size
        ranges.append((start, data[offset:offset + length]))
        offset += length
    return ranges


@attrs.define
class JournalRead:
    """One journal file, read without side effects (:func:`read_journal`)."""

    generation: int
    #: operation lists of the good records, in order
    batches: list = attrs.Factory(list)
    #: ``(start, end)`` damaged byte ranges (undecodable records included)
    damaged: list = attrs.Factory(list)
    #: offset to truncate a torn tail at (None: no torn tail)
    torn_at: Optional[int] = None
    #: what is wrong with the header ("" if nothing)
    header: str = ""
    #: the file is from a newer mqttd: nothing in it could be read
    newer: bool = False
    #: records with one flipped bit that were repaired
    repaired: int = 0

    @property
    def operations(self) -> int:
        return sum(len(batch) for batch in self.batches)

    @property
    def clean(self) -> bool:
        return (not self.damaged and self.torn_at is None and not self.header
                and not self.repaired)


def read_journal(data: bytes, generation: int) -> JournalRead:
    """Decode a journal file's bytes, resynchronising after damage.

    The generation comes from the file name; a damaged header is noted and
    the records are read all the same (each is checked by its CRC and the
    allow-listing unpickler).  A file whose header names a newer format and
    none of whose records decode is reported as ``newer``.
    """
    read = JournalRead(generation)
    if len(data) < JOURNAL_HEADER.size:
        # created but header not (fully) written: nothing was ever in it
        read.torn_at = 0
        return read
    magic, version, gen = JOURNAL_HEADER.unpack_from(data, 0)
    problems = []
    if magic != JOURNAL_MAGIC:
        problems.append("bad journal magic")
    if version > FORMAT_VERSION or version < 1:
        problems.append(f"journal format version {version} is not supported "
                        f"(this mqttd reads versions 1 to {FORMAT_VERSION})")
    if gen != generation:
        problems.append(f"header says generation {gen}")
    read.header = "; ".join(problems)
    scan = scan_frames(data, JOURNAL_HEADER.size)
    read.repaired = len(scan.repaired)
    damaged = list(scan.damaged)
    if scan.torn:
        read.torn_at = damaged.pop()[0]
    for offset, payload in scan.frames:
        try:
            read.batches.append(decode_payload(payload))
        except Exception:  # CRC-valid but not operations: damage all the same
            damaged.append((offset, offset + RECORD_HEADER.size + len(payload)))
    read.damaged = sorted(damaged)
    if problems and not read.batches and (version > FORMAT_VERSION and magic == JOURNAL_MAGIC):
        read.newer = True
    return read


def replay_batches(state: StoredState, batches, tolerant: bool, orphans: set) -> int:
    """Apply journal ``batches`` to ``state``; returns how many ``PutOutbound``
    operations (format < 6: the message in the operation) it applied.

    ``tolerant`` (after damage was found): a queued message, inbound QoS 2
    id or subscription delta (format 5) of a session whose record was in a
    damaged record is kept under a fresh :class:`SessionRecord` (no other
    subscriptions, never expires) instead of being ignored, and the client id
    added to ``orphans`` -- so losing one record never cascades into losing
    every later message of its session.
    """
    sessions = state.sessions
    legacy = 0
    for batch in batches:
        for op in batch:
            cls = op.__class__
            if tolerant and cls in (PutOutbound, PutOutboundMessage, PutOutboundRef,
                                    AddInboundQos2, PutSubscription) \
                    and op.client_id not in sessions:
                sessions[op.client_id] = StoredSession(SessionRecord(op.client_id))
                orphans.add(op.client_id)
            if cls is PutOutbound and op.client_id in sessions:
                legacy += 1
            apply_op(state, op)
    return legacy


def journal_ops(pending: list) -> list:
    """The operations of a pending batch: ``(PutOutbound, message id, new)``
    entries (:meth:`JournaledStore.write`) become :class:`PutOutboundMessage`
    (``new``: the message's first record) or :class:`PutOutboundRef`."""
    ops = []
    for op in pending:
        if op.__class__ is tuple:
            put, mid, new = op
            record = put.record
            if new:
                op = PutOutboundMessage(put.client_id, record, mid)
            else:
                op = PutOutboundRef(put.client_id, record.seq, mid, record.qos,
                                    record.packet_id, record.stage, record.share)
        ops.append(op)
    return ops


def decode_payload(payload) -> list:
    """The operations in one journal record (pickled, or in the compact form of
    :mod:`~mqttd.persistence.opcodec`); raises UnpicklingError if not ops."""
    if opcodec.is_encoded(payload):
        try:
            return opcodec.decode(payload)
        except (ValueError, UnicodeDecodeError, struct.error, TypeError) as e:
            raise pickle.UnpicklingError(f"compact operations record: {e}") from e
    ops = safepickle.loads(payload)
    if not isinstance(ops, list):
        ops = [ops]
    for op in ops:
        if type(op) not in _OP_TYPES:
            raise pickle.UnpicklingError(f"not a store operation: {type(op).__name__}")
    return ops


# --- the store --------------------------------------------------------------

@implementer(IBrokerStore)
class JournaledStore:
    """Base of the durable stores: journal, mirror state, group commit, compaction.

    Subclasses provide the checkpoint: :meth:`_load_checkpoint` (called in
    :meth:`open`) and :meth:`_write_checkpoint` (called in a thread during
    compaction, or synchronously in :meth:`open` after damage).

    :param path: the data directory (created if missing).
    :param reactor: provides ``callLater`` and, unless ``run_in_thread`` is
        given, ``callFromThread`` for the store's own thread pool.
    :param fsync: ``"always"`` (sync() fires after an fsync covering every
        earlier write), ``"interval:N"`` (fsync every N ms in the background;
        sync() fires once the batch is written to the OS) or ``"never"``.
    :param compact_bytes: a journal larger than this triggers a checkpoint.
    :param threadpool: a started ThreadPool to use instead of a private one.
    :param fsync_function: replaces both :func:`os.fsync` and :func:`os.fdatasync`
        (tests count or slow it).  By default the journal's appends are made
        durable with ``fdatasync`` where the OS has it (Linux): it writes the data
        and the metadata needed to read it back (the file size), not the
        modification time, so it costs less than ``fsync`` for the same guarantee
        (PostgreSQL's default for its WAL on Linux); directories and checkpoints
        get ``fsync``.
    :param write_function: replaces :func:`os.write` for journal appends (tests
        inject ENOSPC).
    :param run_in_thread: ``f(callable, *args) -> Deferred``; replaces the thread
        pool (tests pass a synchronous runner).
    """

    durable = True
    #: takes the subscription delta operations (format 5, see IBrokerStore)
    subscription_deltas = True
    #: seconds before the first recovery attempt after a failed write or
    #: fsync; doubled after each failed attempt, up to RETRY_MAX
    RETRY_INITIAL = 0.5
    RETRY_MAX = 10.0

    def __init__(self, path, reactor, fsync="always", compact_bytes=DEFAULT_COMPACT_BYTES,
                 threadpool=None, fsync_function=None, run_in_thread=None,
                 write_function=None):
        self.path = os.path.abspath(path)
        self._reactor = reactor
        self.fsync_mode, self._interval = parse_fsync_mode(fsync)
        if compact_bytes <= 0:
            raise ValueError("compact_bytes must be positive")
        self.compact_bytes = compact_bytes
        #: directories, checkpoints: fsync; journal appends: fdatasync (see above)
        self._fsync = fsync_function or os.fsync
        self._datasync = fsync_function or getattr(os, "fdatasync", os.fsync)
        self._os_write = write_function or _write
        #: seconds per batch write and per fsync (exported by the admin metrics)
        self.write_latency = LatencyHistogram()
        self.fsync_latency = LatencyHistogram()
        self._pool = threadpool
        self._own_pool = False
        self._run_in_thread = run_in_thread
        self._shutdown_trigger = None

        self._lock_fd = None
        self._fd = None                 # current journal
        self._gen = 0                   # current journal generation
        self._journal_bytes = 0
        self._retired: List[int] = []   # fds of earlier journals, closed after an fsync
        self._dir_dirty = False         # a new journal's directory entry needs an fsync

        self._mirror = StoredState()
        self._pending: list = []
        #: PutOutbound operations (format < 6) replayed by the last recovery
        self._legacy_outbound = 0
        self._flush_call = None
        self._interval_call = None

        self._written = 0               # bytes handed to os.write, over all journals
        self._durable = 0               # bytes covered by the last completed fsync
        self._waiters = collections.deque()   # (target, Deferred), in request order
        self._syncing = False
        self._compacting: Optional[defer.Deferred] = None
        #: the failure that makes the store refuse syncs until a recovery
        #: checkpoint succeeds (disk full, I/O error); None while healthy
        self._failing: Optional[Failure] = None
        self._failed_at = 0.0
        self._retry_call = None
        self._retry_delay = self.RETRY_INITIAL
        self._recovering = False
        self._refused = 0               # syncs refused during the current failure
        self._compaction_blocked_until = 0.0
        self._state = "new"             # new -> open -> closing -> closed

        #: completed fsync rounds (each serves every waiter of its batch)
        self.fsync_count = 0
        #: completed compactions
        self.compaction_count = 0
        #: write/fsync failure episodes, and recoveries from them
        self.failure_count = 0
        self.recovery_count = 0

    # -- subclass hooks --

    def _load_checkpoint(self) -> Tuple[Optional[StoredState], int, bool]:
        """Return ``(state or None, generation, damaged)``; never raise for damage."""
        raise NotImplementedError

    def _write_checkpoint(self, state: StoredState, generation: int) -> None:
        """Durably replace the checkpoint with ``state`` stamped ``generation``."""
        raise NotImplementedError

    def _remove_old_checkpoints(self, generation: int) -> None:
        """Remove checkpoint files older than ``generation`` (after it is durable)."""

    # -- IBrokerStore --

    def open(self) -> StoredState:
        if self._state != "new":
            raise StoreError("open() may be called only once")
        started = time.monotonic()
        self.lock()
        try:
            state = self._recover()
        except BaseException:
            self._unlock()
            raise
        self._mirror = state
        self._start_threads()
        self._state = "open"
        if self._interval is not None:
            self._interval_call = self._reactor.callLater(self._interval, self._interval_tick)
        outbound = sum(len(s.outbound) for s in state.sessions.values())
        log.info("Opened store {path}: {sessions} sessions, {outbound} outbound messages, "
                 "{retained} retained messages in {seconds:.3f}s",
                 path=self.path, sessions=len(state.sessions), outbound=outbound,
                 retained=len(state.retained), seconds=time.monotonic() - started)
        result = copy_state(state)
        sort_outbound(result)
        return result

    def write(self, op) -> None:
        if self._state != "open":
            raise StoreError(f"store {self.path} is not open")
        cls = op.__class__
        if cls is PutOutbound:
            # the message table: the message with its first record only
            held = link_outbound(self._mirror, op.client_id, op.record)
            if held is None:
                # unknown session: the operation means nothing; journaled as given
                self._pending.append(op)
            else:
                # (op, message id, new): written as PutOutboundMessage (new) or
                # PutOutboundRef by opcodec, or made those ops for a pickle
                # (journal_ops); no op object is made on the hot path
                self._pending.append((op, held[0], held[1]))
        else:
            # apply_op's own table, looked up once (once per message sent)
            handler = APPLY_HANDLERS.get(cls)
            if handler is None:
                raise TypeError(f"not a store operation: {op!r}")
            handler(self._mirror, op)
            self._pending.append(op)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def sync(self) -> defer.Deferred:
        if self._state != "open":
            return defer.fail(StoreError(f"store {self.path} is not open"))
        self._flush()
        if self._failing is not None:
            self._refused += 1
            return defer.fail(self._unavailable())
        if self.fsync_mode != "always":
            return defer.succeed(None)
        return self._wait_for_fsync()

    def close(self) -> defer.Deferred:
        if self._state in ("closing", "closed"):
            return defer.succeed(None)
        if self._state == "new":
            self._unlock()  # locked (lock()) but never opened
            self._state = "closed"
            return defer.succeed(None)
        return defer.ensureDeferred(self._close())

    # -- writing --

    def _flush(self) -> None:
        """Write the pending batch as one record with one os.write."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._pending:
            return
        if self._failing is not None:
            if not self._recovering:
                # the mirror holds them; the recovery checkpoint will write them
                self._pending = []
            return
        ops, self._pending = self._pending, []
        started = time.monotonic()
        try:
            payload = opcodec.encode(ops)
            if payload is None:  # an operation the compact form does not carry
                payload = safepickle.dumps(journal_ops(ops))
            record = encode_record(payload)
            write_all(self._fd, record, self._os_write)
            self.write_latency.observe(time.monotonic() - started)
        except Exception:
            failure = Failure()
            try:  # never leave half a record behind (shrinking needs no space)
                os.ftruncate(self._fd, self._journal_bytes)
            except OSError:
                pass
            self._fail(failure, "write to journal")
            return
        self._journal_bytes += len(record)
        self._written += len(record)
        if (self._journal_bytes >= self.compact_bytes and self._compacting is None
                and self._state == "open"
                and self._reactor.seconds() >= self._compaction_blocked_until):
            try:
                self._start_compaction(final=False)
            except OSError:
                self._fail(Failure(), "starting a new journal")

    # -- failure and recovery --

    @property
    def failure(self) -> Optional[StoreUnavailable]:
        """While writes fail: the :class:`StoreUnavailable` that syncs fail with."""
        return self._unavailable() if self._failing is not None else None

    def _unavailable(self) -> StoreUnavailable:
        error = self._failing.value
        return StoreUnavailable(f"store {self.path} cannot write: {error}",
                                getattr(error, "errno", None))

    def _fail(self, failure: Failure, what: str) -> None:
        """A write or fsync failed: refuse syncs, retry with backoff, log once."""
        first = self._failing is None
        if first:
            self._failing = failure
            self._failed_at = self._reactor.seconds()
            self._refused = 0
            self.failure_count += 1
            self._retry_delay = self.RETRY_INITIAL
            error = failure.value
            log.error("Store {path}: {what} failed ({error}); acknowledgements that need "
                      "the store are refused until it can write again (retrying every "
                      "{initial}-{maximum} s, nothing acknowledged is lost)",
                      path=self.path, what=what, error=str(error),
                      errno=getattr(error, "errno", None),
                      initial=self.RETRY_INITIAL, maximum=self.RETRY_MAX)
        unavailable = self._unavailable()
        waiters, self._waiters = self._waiters, collections.deque()
        for _, d in waiters:
            self._refused += 1
            d.errback(unavailable)
        if first:
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._state != "open" or self._retry_call is not None:
            return
        self._retry_call = self._reactor.callLater(self._retry_delay, self._retry)

    def _retry(self) -> None:
        """Try to make the whole state durable again: checkpoint + fresh journal."""
        self._retry_call = None
        if self._state != "open" or self._failing is None:
            return
        if self._syncing or self._compacting is not None:
            self._retry_call = self._reactor.callLater(0.05, self._retry)
            return
        self._recovering = True
        self._pending = []          # all in the mirror, so all in the checkpoint
        new_gen = self._gen + 1
        d = self._run(self._recovery_job, copy_state(self._mirror), new_gen)
        d.addCallbacks(self._recovered, self._recovery_failed, callbackArgs=(new_gen,))

    def _recovery_job(self, snapshot: StoredState, new_gen: int) -> int:
        self._write_checkpoint(snapshot, new_gen)
        path = journal_path(self.path, new_gen)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, FILE_MODE)
        try:
            write_all(fd, JOURNAL_HEADER.pack(JOURNAL_MAGIC, FORMAT_VERSION, new_gen),
                      self._os_write)
            self._fsync(fd)
            fsync_dir(self.path, self._fsync)
        except BaseException:
            os.close(fd)
            raise
        for gen in list_journals(self.path):
            if gen < new_gen:
                try:
                    os.unlink(journal_path(self.path, gen))
                except FileNotFoundError:
                    pass
        self._remove_old_checkpoints(new_gen)
        return fd

    def _recovered(self, fd: int, new_gen: int) -> None:
        self._recovering = False
        old = [self._fd] if self._fd is not None else []
        for old_fd in self._retired + old:
            os.close(old_fd)
        self._retired = []
        self._fd = fd
        self._gen = new_gen
        self._journal_bytes = JOURNAL_HEADER.size
        self._written += JOURNAL_HEADER.size
        self._durable = self._written
        self._failing = None
        self.recovery_count += 1
        log.info("Store {path} writes again after {seconds:.1f} s (checkpoint {generation} "
                 "holds everything); {refused} syncs were refused meanwhile",
                 path=self.path, seconds=self._reactor.seconds() - self._failed_at,
                 generation=new_gen, refused=self._refused)
        if self._state != "open":
            return
        self._flush()              # what arrived while the checkpoint was written
        self._maybe_start_fsync()

    def _recovery_failed(self, failure: Failure) -> None:
        self._recovering = False
        log.debug("Store {path} still cannot write: {error}", path=self.path,
                  error=str(failure.value))
        self._retry_delay = min(self._retry_delay * 2, self.RETRY_MAX)
        self._schedule_retry()

    def _open_journal(self, generation: int, create: bool) -> int:
        path = journal_path(self.path, generation)
        if create:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, FILE_MODE)
            header = JOURNAL_HEADER.pack(JOURNAL_MAGIC, FORMAT_VERSION, generation)
            write_all(fd, header, self._os_write)
            self._dir_dirty = True
            self._journal_bytes = len(header)
            self._written += len(header)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._journal_bytes = os.fstat(fd).st_size
        self._gen = generation
        return fd

    # -- group commit --

    def _wait_for_fsync(self) -> defer.Deferred:
        target = self._written
        if target <= self._durable and not self._waiters and not self._syncing:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((target, d))
        self._maybe_start_fsync()
        return d

    def _maybe_start_fsync(self, force: bool = False) -> None:
        if self._syncing or self._failing is not None or self._fd is None:
            return
        if not (self._waiters or (force and (self._written > self._durable or self._retired))):
            return
        self._syncing = True
        covered = self._written
        fds = self._retired + [self._fd]
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        d = self._run(self._fsync_job, fds, dir_dirty)
        d.addCallbacks(self._fsync_done, self._fsync_failed,
                       callbackArgs=(covered, fds), errbackArgs=(dir_dirty,))

    def _fsync_job(self, fds, dir_dirty) -> float:
        started = time.monotonic()
        for fd in fds:
            self._datasync(fd)
        if dir_dirty:
            fsync_dir(self.path, self._fsync)
        return time.monotonic() - started

    def _fsync_done(self, seconds, covered, fds) -> None:
        self.fsync_count += 1
        if isinstance(seconds, float):
            self.fsync_latency.observe(seconds)
        if covered > self._durable:
            self._durable = covered
        for fd in fds:
            if fd in self._retired:
                self._retired.remove(fd)
                os.close(fd)
        self._syncing = False
        # fire in request order; a callback may write and sync again: its
        # request queues behind the ones still to fire here (and may start
        # the next fsync at once)
        while self._waiters and self._waiters[0][0] <= covered:
            _, d = self._waiters.popleft()
            d.callback(None)
        self._maybe_start_fsync()

    def _fsync_failed(self, failure, dir_dirty) -> None:
        self._syncing = False
        self._dir_dirty = self._dir_dirty or dir_dirty
        # after a failed fsync the page cache state is unknown ("fsyncgate"):
        # never report later data as durable; recovery rewrites everything
        self._fail(failure, "fsync")

    def _interval_tick(self) -> None:
        self._interval_call = None
        if self._state != "open":
            return
        self._flush()
        self._maybe_start_fsync(force=True)
        self._interval_call = self._reactor.callLater(self._interval, self._interval_tick)

    # -- compaction --

    def _start_compaction(self, final: bool) -> defer.Deferred:
        """Checkpoint the mirror as of now; later writes go to a new journal."""
        self._flush()
        old_gen = self._gen
        new_gen = old_gen + 1
        snapshot = copy_state(self._mirror)
        if not final:
            old_fd = self._fd
            self._fd = self._open_journal(new_gen, create=True)
            self._retired.append(old_fd)
        d = self._run(self._compaction_job, snapshot, new_gen)
        self._compacting = d
        d.addCallbacks(self._compaction_done, self._compaction_failed,
                       callbackArgs=(final,))
        return d

    def _compaction_job(self, snapshot: StoredState, new_gen: int) -> None:
        self._write_checkpoint(snapshot, new_gen)
        for gen in list_journals(self.path):
            if gen < new_gen:
                try:
                    os.unlink(journal_path(self.path, gen))
                except FileNotFoundError:
                    pass
        self._remove_old_checkpoints(new_gen)

    def _compaction_done(self, _, final: bool) -> None:
        self._compacting = None
        self.compaction_count += 1
        if not self._syncing:
            # the checkpoint covers the old journals: their fds are done with
            while self._retired:
                os.close(self._retired.pop())
        if (not final and self._state == "open"
                and self._journal_bytes >= self.compact_bytes):
            self._start_compaction(final=False)

    def _compaction_failed(self, failure: Failure) -> None:
        self._compacting = None
        # the journals still hold everything; keep running on them, and do not
        # try again on every write (a full disk would make that a storm)
        self._compaction_blocked_until = self._reactor.seconds() + self.RETRY_MAX
        if isinstance(failure.value, OSError):
            log.warn("Compaction of {path} failed ({error}); the journals still hold "
                     "the data; next attempt in {seconds} s at the earliest",
                     path=self.path, error=str(failure.value), seconds=self.RETRY_MAX)
        else:
            log.failure("Compaction of {path} failed; the journals still hold the data",
                        failure, path=self.path)

    # -- closing --

    async def _close(self) -> None:
        self._state = "closing"
        for call in (self._flush_call, self._interval_call):
            if call is not None and call.active():
                call.cancel()
        self._interval_call = None
        self._flush()
        try:
            if self._compacting is not None:
                await _quiet(self._compacting)
            if self._retry_call is not None and self._retry_call.active():
                self._retry_call.cancel()
            self._retry_call = None
            if self._failing is not None and not self._recovering:
                # one last attempt to save the state; unacknowledged only, if it fails
                try:
                    fd = await self._run(self._recovery_job, copy_state(self._mirror),
                                         self._gen + 1)
                except Exception as e:
                    log.error("Store {path} closed while it cannot write ({error}); what "
                              "was never acknowledged since {seconds:.1f} s ago is not "
                              "saved", path=self.path, error=str(e),
                              seconds=self._reactor.seconds() - self._failed_at)
                else:
                    self._recovered(fd, self._gen + 1)
            if self._failing is None:
                # make everything written durable whatever the fsync mode
                await _quiet(self._wait_for_fsync())
            if self._failing is None and self._journal_bytes > JOURNAL_HEADER.size:
                await _quiet(self._start_compaction(final=True))
            while self._syncing or self._compacting is not None:
                await _quiet(self._compacting or self._wait_for_fsync())
        finally:
            for fd in self._retired + ([self._fd] if self._fd is not None else []):
                os.close(fd)
            self._retired, self._fd = [], None
            waiters, self._waiters = self._waiters, collections.deque()
            for _, d in waiters:
                d.errback(StoreError(f"store {self.path} closed"))
            self._stop_threads()
            self._unlock()
            self._state = "closed"

    # -- recovery --

    def _recover(self) -> StoredState:
        for name in os.listdir(self.path):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.path, name))
        state, snap_gen, damaged = self._load_checkpoint()
        if state is None:
            state = StoredState()
        gens = list_journals(self.path)
        for gen in gens:
            if gen < snap_gen:          # already in the checkpoint
                os.unlink(journal_path(self.path, gen))
        live = [gen for gen in gens if gen >= snap_gen]
        append_to = None
        orphans: set = set()
        self._legacy_outbound = 0
        for index, gen in enumerate(live):
            last = index == len(live) - 1
            if not self._replay(gen, state, last, damaged, orphans):
                damaged = True
            append_to = gen
        # the message table: a message whose records were all deleted (or
        # whose references were in damaged records) leaves it; a store of
        # format < 6 held a copy per session: equal messages become one
        drop_unreferenced(state)
        if self._legacy_outbound:
            merged = share_equal_messages(state)
            if merged:
                log.info("Store {path}: {merged} copies of queued messages written by an "
                         "older mqttd (one per session) are now shared", path=self.path,
                         merged=merged)
        if orphans:
            log.error("Session records of {count} clients were in damaged records; their "
                      "later messages are kept under sessions without subscriptions: "
                      "{clients}", count=len(orphans),
                      clients=", ".join(sorted(orphans)[:20]))
        if damaged:
            # start afresh from what was recovered: new checkpoint, new journal
            new_gen = max([snap_gen] + gens) + 1
            self._write_checkpoint(copy_state(state), new_gen)
            for gen in list_journals(self.path):
                if gen < new_gen:
                    os.unlink(journal_path(self.path, gen))
            self._remove_old_checkpoints(new_gen)
            self._fd = self._open_journal(new_gen, create=True)
        elif append_to is not None:
            self._fd = self._open_journal(append_to, create=False)
        else:
            self._fd = self._open_journal(max(snap_gen, 1), create=True)
        fsync_dir(self.path, self._fsync)
        self._dir_dirty = False
        return state

    def _replay(self, gen: int, state: StoredState, last: bool, after_damage: bool = False,
                orphans: Optional[set] = None) -> bool:
        """Apply journal ``gen`` to ``state``; False if it was damaged.

        Damage costs only the damaged records: replay resynchronises on the
        next valid frame, the damaged bytes are kept in ``journal.<g>.damaged-
        <time>``, one ERROR line gives the counts, and the caller starts a
        fresh checkpoint.  A torn tail of the last journal (a crash during a
        write, never acknowledged) is cut off with a WARNING.
        """
        path = journal_path(self.path, gen)
        with open(path, "rb") as f:
            data = f.read()
        read = read_journal(data, gen)
        self._legacy_outbound += replay_batches(
            state, read.batches, after_damage or bool(read.damaged),
            orphans if orphans is not None else set())
        if read.clean:
            return True
        now = self._reactor.seconds()
        if read.newer:
            moved = aside_path(path, "corrupt", now)
            os.rename(path, moved)
            log.error("Journal {path} is from a newer mqttd ({reason}); nothing in it "
                      "could be read, moved aside to {moved}",
                      path=path, reason=read.header, moved=moved)
            return False
        if not read.damaged and read.torn_at is None:
            log.warn("Repaired {repaired} records with one flipped bit in journal {path}"
                     "{header}; nothing lost", path=path, repaired=read.repaired,
                     header=f" and its header ({read.header})" if read.header else "")
            return False            # a fresh checkpoint replaces the damaged file
        if not read.damaged and not read.header and not read.repaired and last:
            log.warn("Torn record at the end of journal {path} at offset {offset}; "
                     "truncated to the last good record", path=path, offset=read.torn_at)
            if read.torn_at < JOURNAL_HEADER.size:
                with open(path, "wb") as f:
                    f.write(JOURNAL_HEADER.pack(JOURNAL_MAGIC, FORMAT_VERSION, gen))
                    f.flush()
                    self._fsync(f.fileno())
            else:
                with open(path, "r+b") as f:
                    f.truncate(read.torn_at)
                    self._fsync(f.fileno())
            return True
        ranges = list(read.damaged)
        if read.torn_at is not None:
            ranges.append((read.torn_at, len(data)))
        if read.header:
            ranges.insert(0, (0, JOURNAL_HEADER.size))
        moved = keep_damaged(path, data, ranges, now, self._fsync)
        log.error("Damaged journal {path}: {ranges} damaged byte ranges ({damaged} bytes, "
                  "first at offset {offset}{header}) kept in {moved}; replay resynchronised "
                  "and applied {records} good records ({operations} operations, "
                  "{repaired} repaired)", repaired=read.repaired,
                  path=path, ranges=len(ranges), offset=ranges[0][0],
                  damaged=sum(e - s for s, e in ranges), moved=moved,
                  header=f"; header: {read.header}" if read.header else "",
                  records=len(read.batches), operations=read.operations)
        return False

    # -- lock --

    def lock(self) -> None:
        """Take the data directory's ``LOCK`` (created with the directory if
        missing) without reading anything else; :meth:`open` keeps it.

        Idempotent.  A broker takes it before it listens, so a second broker on
        a directory in use never accepts a connection.

        :raises StoreLockedError: another process (or store object) holds it;
            the message names the directory and the pid that last locked it.
        :raises OSError: the directory or its ``LOCK`` cannot be created.
        """
        if self._lock_fd is not None:
            return
        if self._state != "new":
            raise StoreError(f"store {self.path} is {self._state}; it can be locked only "
                             f"before open()")
        os.makedirs(self.path, mode=DIR_MODE, exist_ok=True)
        self._lock()
        restrict_permissions(self.path)

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` of a store never opened (a
        broker that could not listen); an opened store releases it in
        :meth:`close`."""
        if self._state == "new":
            self._unlock()

    def _lock(self) -> None:
        lock_path = os.path.join(self.path, "LOCK")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"data directory {self.path} is already in use (lock file {lock_path} "
                    f"is held, last locked by pid {holder}); is another broker running?"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- threads --

    def _start_threads(self) -> None:
        if self._run_in_thread is not None or self._pool is not None:
            return
        self._pool = ThreadPool(minthreads=0, maxthreads=2, name=f"mqttd-store {self.path}")
        self._pool.start()
        self._own_pool = True
        add_trigger = getattr(self._reactor, "addSystemEventTrigger", None)
        if add_trigger is not None:
            self._shutdown_trigger = add_trigger("during", "shutdown", self._pool.stop)

    def _stop_threads(self) -> None:
        if self._own_pool:
            if self._shutdown_trigger is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
            self._pool.stop()
            self._own_pool = False

    def _run(self, f, *args) -> defer.Deferred:
        if self._run_in_thread is not None:
            return self._run_in_thread(f, *args)
        return deferToThreadPool(self._reactor, self._pool, f, *args)


async def _quiet(d: defer.Deferred) -> None:
    """Wait for ``d`` ignoring its failure (already handled and logged)."""
    try:
        await d
    except Exception:
        pass
