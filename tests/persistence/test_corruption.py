"""A flipped byte anywhere costs at most the record (frame) it is in."""
from __future__ import annotations

import dbm.dumb
import os
import random
import shutil

import pytest
from twisted.logger import LogLevel

from mqttd.persistence import dbmstore
from mqttd.persistence.filestore import SNAPSHOT_HEADER
from mqttd.persistence.journal import CHUNK, JOURNAL_HEADER, RECORD_HEADER
from mqttd.persistence.records import PutRetained

from .storehelpers import (
    abandon, events_at, message, outbound, reference_state, result_of, session)

N = 40          # journal records / checkpoint messages per session


def flip(path, offset, mask=0x10):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def frame_offsets(data, start):
    offsets, offset = [], start
    while offset + RECORD_HEADER.size <= len(data):
        offsets.append(offset)
        offset += RECORD_HEADER.size + RECORD_HEADER.unpack_from(data, offset)[1]
    return offsets


def messages_of(state):
    return {(cid, seq) for cid, s in state.sessions.items() for seq in s.outbound}


# --- journal ------------------------------------------------------------------------------

def journal_with_records(backend):
    """One session, then N records of one queued message each; the store is "killed"."""
    ops = [session("c1")] + [outbound("c1", i) for i in range(1, N + 1)]
    store = backend(compact_bytes=10**9)
    store.open()
    for op in ops:
        backend.write_all(store, [op])
    abandon(store)
    return ops, os.path.join(backend.path, "journal.1")


JOURNAL_POSITIONS = {
    "header magic": lambda rec: 3,
    "header version": lambda rec: 11,
    "header generation": lambda rec: 19,
    "record mark": lambda rec: rec + 1,
    "record length": lambda rec: rec + 6,
    "record crc": lambda rec: rec + 9,
    "record payload": lambda rec: rec + RECORD_HEADER.size + 10,
}


@pytest.mark.parametrize("mask", [0x10, 0xFF], ids=["one bit", "eight bits"])
@pytest.mark.parametrize("where", sorted(JOURNAL_POSITIONS))
def test_damaged_journal_byte_loses_at_most_its_record(durable_backend, log_events, where, mask):
    """Header, mark, length, CRC or payload: one flipped bit is repaired; a damaged byte
    costs its record only (replay resynchronises)."""
    ops, path = journal_with_records(durable_backend)
    with open(path, "rb") as f:
        records = frame_offsets(f.read(), JOURNAL_HEADER.size)
    middle = records[N // 2]
    flip(path, JOURNAL_POSITIONS[where](middle), mask)
    store = durable_backend()
    state = store.open()
    expected = messages_of(reference_state(ops))
    lost = expected - messages_of(state)
    errors = events_at(log_events, LogLevel.error)
    if where.startswith("header") or mask == 0x10:
        assert lost == set() and not errors
        repaired = [e for e in events_at(log_events, LogLevel.warn)
                    if "Repaired" in e["log_format"]]
        assert len(repaired) == 1
        assert repaired[0]["repaired"] == (0 if where.startswith("header") else 1)
    else:
        assert len(lost) == 1        # the message of the damaged record, nothing else
        assert len(errors) == 1
    result_of(store.close())


def test_losing_the_session_record_does_not_cascade(durable_backend, log_events):
    """Damage to the record holding PutSession costs that record, not every later message."""
    ops, path = journal_with_records(durable_backend)
    with open(path, "rb") as f:
        first = frame_offsets(f.read(), JOURNAL_HEADER.size)[0]
    flip(path, first + RECORD_HEADER.size + 4, 0xFF)
    store = durable_backend()
    state = store.open()
    assert messages_of(state) == messages_of(reference_state(ops))
    assert state.sessions["c1"].record.subscriptions == ()     # its record was lost
    errors = events_at(log_events, LogLevel.error)
    assert any("Session records of" in e["log_format"] and e["count"] == 1 for e in errors)
    result_of(store.close())


# --- checkpoints --------------------------------------------------------------------------

def checkpointed(backend, sessions=3):
    """sessions x N queued messages and N retained messages in a checkpoint (clean close)."""
    ops = []
    for c in range(sessions):
        ops.append(session(f"c{c}"))
        ops += [outbound(f"c{c}", i) for i in range(1, N + 1)]
    ops += [PutRetained(message(f"r/{i}")) for i in range(N)]
    store = backend()
    store.open()
    backend.write_all(store, ops)
    result_of(store.close())
    return reference_state(ops)


def checkpoint_file(backend):
    if backend.kind == "file":
        return os.path.join(backend.path, "snapshot.pkl"), SNAPSHOT_HEADER.size
    names = [n for n in os.listdir(backend.path) if n.endswith(".dat")]
    return os.path.join(backend.path, names[0]), 0


def loss(reference, state):
    return (len(reference.sessions) - len(set(state.sessions) & set(reference.sessions)),
            len(messages_of(reference) - messages_of(state)),
            len(set(reference.retained) - set(state.retained)))


CHECKPOINT_POSITIONS = ["header", "mark", "length", "crc", "payload", "last frame"]


def checkpoint_byte(backend, where):
    """``(path, offset)`` of the checkpoint byte at position ``where`` (one of
    :data:`CHECKPOINT_POSITIONS`) in the middle frame (or the last one) of
    ``backend``'s checkpoint."""
    path, start = checkpoint_file(backend)
    with open(path, "rb") as f:
        data = f.read()
    frames = frame_offsets(data, start) if backend.kind == "file" else [
        data.find(b"\xa7MQR", 600)]
    frame = frames[len(frames) // 2]
    offset = {"header": 5, "mark": frame + 2, "length": frame + 5, "crc": frame + 10,
              "payload": frame + RECORD_HEADER.size + 20,
              "last frame": (frames[-1] + RECORD_HEADER.size + 3)}[where]
    if where == "header" and backend.kind == "dbm":
        offset = 2     # the meta frame at the start of the .dat file
    return path, offset


@pytest.mark.parametrize("where", CHECKPOINT_POSITIONS)
def test_damaged_checkpoint_byte_loses_at_most_one_frame(durable_backend, log_events, where):
    """One damaged byte in a snapshot/dbm checkpoint costs one frame: <= 16 messages or a session record."""
    reference = checkpointed(durable_backend)
    path, offset = checkpoint_byte(durable_backend, where)
    flip(path, offset, 0xFF)
    store = durable_backend()
    state = store.open()
    sessions_lost, messages_lost, retained_lost = loss(reference, state)
    assert sessions_lost == 0        # a lost session record keeps its messages (orphan)
    assert messages_lost + retained_lost <= CHUNK
    errors = events_at(log_events, LogLevel.error)
    if where == "header" and durable_backend.kind == "file":
        # the header is rebuilt from the end frame (generation, version)
        assert (messages_lost, retained_lost, errors) == (0, 0, [])
        result_of(store.close())
        return
    assert len(errors) == 1 and "Damaged checkpoint" in errors[0]["log_format"]
    assert errors[0]["moved"] and os.path.exists(errors[0]["moved"])
    if errors[0]["lost_counts"] is not None:
        assert errors[0]["lost_counts"]["outbound"] == messages_lost
    result_of(store.close())


@pytest.mark.parametrize("where", CHECKPOINT_POSITIONS)
def test_one_flipped_bit_in_a_checkpoint_is_repaired(durable_backend, log_events, where):
    """A single flipped bit anywhere in a checkpoint frame loses nothing (CRC-32 locates it)."""
    reference = checkpointed(durable_backend)
    path, offset = checkpoint_byte(durable_backend, where)
    flip(path, offset, 0x04)
    store = durable_backend()
    assert store.open() == reference
    assert not events_at(log_events, LogLevel.error)
    result_of(store.close())


def test_random_flips_lose_at_most_one_frame_each(durable_backend, tmp_path):
    """20 random single-bit flips of a checkpoint: each costs at most one frame."""
    rng = random.Random(8)
    reference = checkpointed(durable_backend, sessions=2)
    pristine = str(tmp_path / "pristine")
    shutil.copytree(durable_backend.path, pristine)
    path, _ = checkpoint_file(durable_backend)
    size = os.path.getsize(path)
    worst = 0
    for _ in range(20):
        shutil.rmtree(durable_backend.path)
        shutil.copytree(pristine, durable_backend.path)
        flip(path, rng.randrange(size), 1 << rng.randrange(8))
        store = durable_backend()
        state = store.open()
        result_of(store.close())
        worst = max(worst, sum(loss(reference, state)[1:]))
    assert worst <= CHUNK


# --- older formats, dbm index -------------------------------------------------------------

def test_format_1_dbm_checkpoint_still_loads(tmp_path, durable_backend):
    """A checkpoint written by format 1 (crc|pickle values per key) is read as before."""
    if durable_backend.kind != "dbm":
        pytest.skip("dbm only")
    os.makedirs(durable_backend.path)
    base = os.path.join(durable_backend.path, "state.3")
    ops = [session("c1"), outbound("c1", 1), outbound("c1", 2), PutRetained(message("r"))]
    state = reference_state(ops)
    db = dbm.dumb.open(base, "n")
    db[b"s:c1"] = dbmstore._pack(("s", state.sessions["c1"].record, ()))
    db[b"o:c1:0"] = dbmstore._pack(("o", "c1", tuple(state.sessions["c1"].outbound.values())))
    db[b"r:0"] = dbmstore._pack(("r", tuple(state.retained.values())))
    db[b"meta"] = dbmstore._pack({"version": 1, "generation": 3, "sessions": 1,
                                  "outbound": 2, "retained": 1})
    db.close()
    with open(os.path.join(durable_backend.path, "CURRENT"), "w") as f:
        f.write("mqttd-dbm-checkpoint 1 3\n")
    store = durable_backend()
    assert store.open() == state
    result_of(store.close())


def test_damaged_dbm_index_costs_nothing(durable_backend, log_events):
    """The .dat file is scanned for frames: garbage in the .dir index loses no record."""
    if durable_backend.kind != "dbm":
        pytest.skip("dbm only")
    reference = checkpointed(durable_backend)
    path, _ = checkpoint_file(durable_backend)
    with open(path[:-4] + ".dir", "r+b") as f:
        f.write(b"\x00garbage\x00" * 4)
    store = durable_backend()
    assert store.open() == reference
    assert not events_at(log_events, LogLevel.error)
    result_of(store.close())
