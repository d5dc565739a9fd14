"""mqttd store check|dump DIR: offline inspection that changes nothing."""
from __future__ import annotations

import io
import json
import os

from mqttd import cli
from mqttd.persistence import storetool
from mqttd.persistence.records import PutRetained

from .storehelpers import abandon, message, outbound, result_of, session


def populated(backend, close=True):
    store = backend()
    store.open()
    backend.write_all(store, [session("c1"), outbound("c1", 1), outbound("c1", 2),
                              PutRetained(message("r/1"))])
    if close:
        result_of(store.close())
        store = backend()
        store.open()
    backend.write_all(store, [outbound("c1", 3)])
    abandon(store)


def snapshot_of(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def run(*argv):
    out = io.StringIO()
    return storetool.main(list(argv), out=out), out.getvalue()


def test_check_reports_an_intact_directory_and_changes_nothing(durable_backend):
    """check: checkpoint + journal, counts, exit 0; the files are untouched."""
    populated(durable_backend)
    before = snapshot_of(durable_backend.path)
    status, text = run("check", durable_backend.path)
    assert status == 0, text
    assert "1 sessions, 3 queued/in-flight messages, 1 retained messages; intact" in text
    assert snapshot_of(durable_backend.path) == before


def flip_journal(backend, mask):
    path = os.path.join(backend.path, "journal.1")
    with open(path, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ mask]))


def test_check_reports_damage_and_what_it_costs(durable_backend):
    """check: a damaged byte in the journal -> exit 1, the damaged range named."""
    populated(durable_backend, close=False)
    flip_journal(durable_backend, 0xFF)
    status, text = run("check", durable_backend.path)
    assert status == 1
    assert "journal.1: damaged" in text and "damaged bytes" in text and "DAMAGED" in text


def test_check_reports_a_repairable_flipped_bit(durable_backend):
    """check: one flipped bit is repaired by recovery without loss, but still reported (exit 1)."""
    populated(durable_backend, close=False)
    flip_journal(durable_backend, 0x01)
    status, text = run("check", durable_backend.path)
    assert status == 1
    assert "journal.1: repaired (" in text and "repaired=1" in text
    assert "3 queued/in-flight messages" in text


def test_dump_lists_sessions_messages_and_retained(durable_backend):
    """dump: sessions, subscriptions, queued messages in order, retained, as text and JSON."""
    populated(durable_backend)
    status, text = run("dump", durable_backend.path, "--payloads")
    assert status == 0
    assert "session 'c1'" in text and "subscription 'a/#' qos=1" in text
    assert text.index("seq=1") < text.index("seq=2") < text.index("seq=3")
    assert "retained topic='r/1'" in text and "payload=m3" in text
    status, text = run("dump", durable_backend.path, "--json")
    document = json.loads(text)
    assert [o["seq"] for o in document["sessions"]["c1"]["outbound"]] == [1, 2, 3]
    assert document["counts"] == {"sessions": 1, "outbound": 3, "retained": 1,
                                  "messages": 3, "message_bytes": 15}


def test_store_subcommand_is_registered_and_refuses_a_non_store(tmp_path, capsys):
    """mqttd store ... through the console script; a directory without a store is exit 2."""
    assert "store" in cli.SUBCOMMANDS
    assert cli.main(["store", "check", str(tmp_path)]) == 2
    assert "holds no mqttd store" in capsys.readouterr().err
