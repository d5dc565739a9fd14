"""The dbm store: the shared journal plus checkpoints in stdlib ``dbm`` files.

On this Python only :mod:`dbm.dumb` exists, whose writes are neither atomic
nor crash-safe.  So a checkpoint is never updated in place: each one is a
*new* dbm file set ``state.<g>.dat/.dir`` written, ``sync()``\\ ed and fsynced,
and only then made current by atomically replacing the small pointer file
``CURRENT``; the previous generation and the journals it covers are removed
afterwards.  Between checkpoints every change goes to the journal (the WAL).

Keys (values are ``crc32 | safepickle`` bytes of one checkpoint item, see
:func:`~mqttd.persistence.journal.state_items`)::

    meta                  {"version": FORMAT_VERSION, "generation": g, counts...}
    s:<client_id>         ("s", SessionRecord, (inbound QoS 2 packet ids, ...))
    o:<client_id>:<n>     ("o", client_id, (OutboundRecord, ...))  n-th chunk, seq order
    r:<n>                 ("r", (Message, ...))                      n-th retained chunk
    w:<n>                 ("w", (WillRecord, ...))                   n-th pending-will chunk

Outbound and retained messages are stored in chunks of up to 1000 records:
``dbm.dumb`` opens its files once per key and pads values to 512 bytes, so
one key per message costs ~70 µs and ~512 bytes each (7 s and 51 MB for
100,000 messages, measured) where chunks cost next to nothing.
"""
from __future__ import annotations

import collections
import dbm.dumb
import os
import re
import struct
import zlib

from twisted.logger import Logger

from mqttd.persistence import safepickle
from mqttd.persistence.journal import (
    DEFAULT_COMPACT_BYTES, JournaledStore, StateAssembler, aside_path, atomic_write,
    fsync_dir, state_counts, state_items)
from mqttd.persistence.records import FORMAT_VERSION, StoredState

log = Logger(namespace="mqttd.persistence")

CURRENT_NAME = "CURRENT"
CURRENT_MAGIC = "mqttd-dbm-checkpoint"
_STATE_NAME = re.compile(r"^state\.(\d+)\.(dat|dir|bak)$")
_CRC = struct.Struct(">I")


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
            generation = self._parse_current(pointer)
            state = self._read_dbm(generation)
        except Exception as e:  # any damage: set aside, start from journals
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
        return state, generation, False

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
        return generation

    def _read_dbm(self, generation: int) -> StoredState:
        base = self._base(generation)
        if not os.path.exists(base + ".dat") or not os.path.exists(base + ".dir"):
            raise CheckpointError(f"{base}.dat/.dir missing")
        assembler = StateAssembler()
        db = dbm.dumb.open(base, "r")
        try:
            meta = _unpack(db[b"meta"], "meta")
            if not isinstance(meta, dict) or meta.get("generation") != generation:
                raise CheckpointError(f"meta of {base} does not match generation {generation}")
            if meta.get("version", 0) > FORMAT_VERSION:
                raise CheckpointError(f"format version {meta.get('version')} is newer than "
                                      f"this mqttd supports ({FORMAT_VERSION})")
            for raw_key in db.keys():
                if raw_key == b"meta":
                    continue
                key = raw_key.decode("utf-8", "surrogatepass")
                try:
                    assembler.add(_unpack(db[raw_key], key))
                except ValueError as e:
                    raise CheckpointError(f"value of {key!r}: {e}") from e
        finally:
            db.close()
        try:
            return assembler.finish(meta)
        except ValueError as e:
            raise CheckpointError(f"{base}: {e}") from e

    # -- writing (in a thread, or in open() after damage) --

    def _write_checkpoint(self, state: StoredState, generation: int) -> None:
        base = self._base(generation)
        for ext in ("dat", "dir", "bak"):
            try:
                os.unlink(f"{base}.{ext}")
            except FileNotFoundError:
                pass
        db = dbm.dumb.open(base, "n")
        try:
            chunk_numbers = collections.Counter()
            for item in state_items(state):
                if item[0] == "s":
                    key = f"s:{item[1].client_id}"
                elif item[0] == "o":
                    key = f"o:{item[1]}:{chunk_numbers[item[1]]}"
                    chunk_numbers[item[1]] += 1
                elif item[0] == "w":
                    key = f"w:{chunk_numbers[('w',)]}"
                    chunk_numbers[('w',)] += 1
                else:
                    key = f"r:{chunk_numbers[None]}"
                    chunk_numbers[None] += 1
                db[_key(key)] = _pack(item)
            meta = {"version": FORMAT_VERSION, "generation": generation}
            meta.update(state_counts(state))
            db[b"meta"] = _pack(meta)
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

