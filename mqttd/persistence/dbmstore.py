"""The dbm store: the shared journal plus checkpoints in stdlib ``dbm`` files.

On this Python only :mod:`dbm.dumb` exists, whose writes are neither atomic
nor crash-safe.  So a checkpoint is never updated in place: each one is a
*new* dbm file set ``state.<g>.dat/.dir`` written, ``sync()``\\ ed and fsynced,
and only then made current by atomically replacing the small pointer file
``CURRENT``; the previous generation and the journals it covers are removed
afterwards.  Between checkpoints every change goes to the journal (the WAL).

Format 3 keys; each value is a sequence of frames in the journal's framing
(``mark | u32 length | u32 crc32 | safepickle payload``), one frame per
checkpoint item (:func:`~mqttd.persistence.journal.state_items`: a session,
or a chunk of up to 16 outbound or retained messages)::

    meta                  one frame ("meta", {"version", "generation", counts...})
    c:<n>                 up to 64 item frames, in state_items order (sessions,
                          outbound chunks, retained chunks, pending-will chunks)

``dbm.dumb`` opens its files once per key and pads values to 512 bytes, so
one key per message would cost ~70 µs and ~512 bytes each (7 s and 51 MB
for 100,000 messages, measured); 64 frames per key cost next to nothing.

Reading resynchronises like the journal: the ``.dat`` file is scanned for
valid frames directly (zero padding skipped), so neither a damaged value
nor a damaged ``.dir`` index costs more than the frames whose bytes are
damaged; the damaged bytes are kept in ``state.<g>.dat.damaged-<time>``.
Format 1 and 2 checkpoints (``crc32 | pickle`` values under ``s:``, ``o:``,
``r:`` and ``w:`` keys) still load; a damaged value there costs its key.
"""
from __future__ import annotations

import dbm.dumb
import os
import re
import struct
import zlib

from twisted.logger import Logger

from mqttd.persistence import safepickle
from mqttd.persistence.filestore import SnapshotRead, report_damaged_checkpoint
from mqttd.persistence.journal import (
    DEFAULT_COMPACT_BYTES, FILE_MODE, RECORD_HEADER, JournaledStore, StateAssembler,
    aside_path, atomic_write, encode_record, fsync_dir, scan_frames, state_counts,
    state_items)
from mqttd.persistence.records import FORMAT_VERSION, StoredState

log = Logger(namespace="mqttd.persistence")

CURRENT_NAME = "CURRENT"
CURRENT_MAGIC = "mqttd-dbm-checkpoint"
_STATE_NAME = re.compile(r"^state\.(\d+)\.(dat|dir|bak)$")
_CRC = struct.Struct(">I")
#: checkpoint item frames per dbm value (format 3)
FRAMES_PER_KEY = 64


class CheckpointError(Exception):
    pass


def _pack(obj) -> bytes:
    payload = safepickle.dumps(obj)
    return _CRC.pack(zlib.crc32(payload)) + payload


def _unpack(value: bytes, key: str):
    if len(value) < _CRC.size:
        raise CheckpointError(f"value of {key!r} is truncated")
    payload = memoryview(value)[_CRC.size:]
    if zlib.crc32(payload) != _CRC.unpack_from(value)[0]:
        raise CheckpointError(f"checksum mismatch in value of {key!r}")
    try:
        return safepickle.loads(payload)
    except Exception as e:
        raise CheckpointError(f"cannot unpickle value of {key!r}: {e}") from e


def _key(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class DbmStore(JournaledStore):
    """Durable store in directory ``path``: ``CURRENT`` -> ``state.<g>`` dbm + journals.

    See :class:`~mqttd.persistence.journal.JournaledStore` for the options.
    """

    def __init__(self, path, reactor, fsync="always", compact_bytes=DEFAULT_COMPACT_BYTES,
                 **options):
        super().__init__(path, reactor, fsync=fsync, compact_bytes=compact_bytes, **options)
        self.current_path = os.path.join(self.path, CURRENT_NAME)

    def _base(self, generation: int) -> str:
        return os.path.join(self.path, f"state.{generation}")

    # -- reading --

    def _load_checkpoint(self):
        try:
            with open(self.current_path, "rb") as f:
                pointer = f.read()
        except FileNotFoundError:
            return None, 0, False
        generation = None
        try:
            generation, version = self._parse_current(pointer)
            if version >= 3:
                read, data = self.read_checkpoint(generation)
            else:
                read, data = self._read_dbm_v1(generation), None
        except Exception as e:  # unusable: set aside, start from journals
            now = self._reactor.seconds()
            moved = []
            names = [CURRENT_NAME]
            if generation is not None:
                names += [f"state.{generation}.{ext}" for ext in ("dat", "dir", "bak")]
            else:  # which generation is unknown: keep every state file for inspection
                names += [n for n in sorted(os.listdir(self.path)) if _STATE_NAME.match(n)]
            for name in names:
                path = os.path.join(self.path, name)
                if os.path.exists(path):
                    target = aside_path(path, "corrupt", now)
                    os.rename(path, target)
                    moved.append(target)
            log.error("Corrupt checkpoint {path} moved aside to {moved}: {error}; "
                      "starting from the journals alone",
                      path=self._base(generation) if generation is not None else self.current_path,
                      moved=", ".join(moved), error=str(e))
            return None, 0, True
        if read.intact:
            return read.state, read.generation, False
        if data is None:  # format 1/2: no byte ranges, the log line says what was lost
            read.damaged = []
        report_damaged_checkpoint(self._base(generation) + ".dat", data or b"", read,
                                  self._reactor.seconds(), self._fsync)
        return read.state, read.generation, True

    def read_checkpoint(self, generation: int):
        """Read format 3 checkpoint ``generation`` without side effects.

        Returns ``(SnapshotRead, dat bytes)``; raises CheckpointError when
        nothing is usable.  The ``.dat`` file is scanned for frames, so the
        ``.dir`` index is not needed.
        """
        base = self._base(generation)
        try:
            with open(base + ".dat", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"{base}.dat missing") from None
        scan = scan_frames(data, 0, padding=True)
        if not scan.frames:
            raise CheckpointError(f"{base}.dat holds no readable frame")
        assembler = StateAssembler()
        damaged = list(scan.damaged)
        meta = None
        reason = ""
        for offset, payload in scan.frames:
            where = (offset, offset + RECORD_HEADER.size + len(payload))
            try:
                item = safepickle.loads(payload)
                if isinstance(item, tuple) and len(item) == 2 and item[0] == "meta":
                    meta = item[1]
                    continue
                assembler.add(item)
            except Exception as e:  # UnpicklingError, ValueError
                damaged.append(where)
                reason = reason or f"frame at offset {offset}: {e}"
        if meta is not None:
            if not isinstance(meta, dict) or meta.get("generation") != generation:
                raise CheckpointError(f"meta of {base} does not match generation {generation}")
            if meta.get("version", 0) > FORMAT_VERSION:
                raise CheckpointError(f"format version {meta.get('version')} is newer than "
                                      f"this mqttd supports ({FORMAT_VERSION})")
        else:
            reason = reason or "meta frame damaged: cannot tell how much was lost"
        state = assembler.finish(tolerant=True)
        return SnapshotRead(state, generation, len(scan.frames), sorted(damaged), meta,
                            reason, assembler.orphans, len(scan.repaired)), data

    def _parse_current(self, pointer: bytes) -> int:
        try:
            magic, version, generation = pointer.decode("ascii").split()
            version, generation = int(version), int(generation)
        except ValueError:
            raise CheckpointError(f"{self.current_path} is not a checkpoint pointer") from None
        if magic != CURRENT_MAGIC:
            raise CheckpointError(f"{self.current_path} is not a checkpoint pointer")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"format version {version} is newer than this mqttd "
                                  f"supports ({FORMAT_VERSION})")
        if version < 1:
            raise CheckpointError(f"unknown format version {version}")
        return generation, version

    def _read_dbm_v1(self, generation: int) -> SnapshotRead:
        """Read a format 1 or 2 checkpoint; a damaged value costs its key."""
        base = self._base(generation)
        if not os.path.exists(base + ".dat") or not os.path.exists(base + ".dir"):
            raise CheckpointError(f"{base}.dat/.dir missing")
        assembler = StateAssembler()
        bad_keys = []
        reason = ""
        db = dbm.dumb.open(base, "r")
        try:
            meta = _unpack(db[b"meta"], "meta")
            if not isinstance(meta, dict) or meta.get("generation") != generation:
                raise CheckpointError(f"meta of {base} does not match generation {generation}")
            for raw_key in db.keys():
                if raw_key == b"meta":
                    continue
                key = raw_key.decode("utf-8", "surrogatepass")
                try:
                    assembler.add(_unpack(db[raw_key], key))
                except (ValueError, CheckpointError) as e:
                    bad_keys.append(key)
                    reason = reason or f"value of {key!r}: {e}"
        finally:
            db.close()
        state = assembler.finish(tolerant=True)
        return SnapshotRead(state, generation, 0, [], meta,
                            reason, assembler.orphans)

    # -- writing (in a thread, or in open() after damage) --

    def _write_checkpoint(self, state: StoredState, generation: int) -> None:
        base = self._base(generation)
        for ext in ("dat", "dir", "bak"):
            try:
                os.unlink(f"{base}.{ext}")
            except FileNotFoundError:
                pass
        db = dbm.dumb.open(base, "n", FILE_MODE)
        try:
            meta = {"version": FORMAT_VERSION, "generation": generation}
            meta.update(state_counts(state))
            db[b"meta"] = encode_record(safepickle.dumps(("meta", meta)))
            frames = []
            number = 0
            for item in state_items(state):
                frames.append(encode_record(safepickle.dumps(item)))
                if len(frames) == FRAMES_PER_KEY:
                    db[_key(f"c:{number}")] = b"".join(frames)
                    number += 1
                    frames = []
            if frames:
                db[_key(f"c:{number}")] = b"".join(frames)
            db.sync()
        finally:
            db.close()
        for ext in ("dat", "dir"):
            fd = os.open(f"{base}.{ext}", os.O_RDONLY)
            try:
                self._fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.path, self._fsync)
        pointer = f"{CURRENT_MAGIC} {FORMAT_VERSION} {generation}\n".encode("ascii")
        atomic_write(self.current_path, pointer, self._fsync)

    def _remove_old_checkpoints(self, generation: int) -> None:
        for name in os.listdir(self.path):
            match = _STATE_NAME.match(name)
            if match and int(match.group(1)) != generation:
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

