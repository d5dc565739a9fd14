"""mqttd.pidfile: a pid file that a crash cannot turn into a refused restart."""
from __future__ import annotations

import os

import pytest

from mqttd.pidfile import PidFile, PidFileError


def test_acquire_writes_this_pid_and_release_removes_the_file(tmp_path):
    """The file names the running process while it runs and is gone after a clean stop."""
    path = tmp_path / "mqttd.pid"
    pid_file = PidFile(str(path))
    assert pid_file.acquire() is None
    assert path.read_text() == f"{os.getpid()}\n" and pid_file.held
    pid_file.release()
    pid_file.release()  # idempotent
    assert not path.exists() and not pid_file.held


def test_a_held_pid_file_refuses_a_second_owner_naming_the_pid(tmp_path):
    """Two brokers on one pid file: the second is refused with the running pid."""
    path = tmp_path / "mqttd.pid"
    first = PidFile(str(path))
    first.acquire()
    try:
        with pytest.raises(PidFileError, match=f"held by running pid {os.getpid()}"):
            PidFile(str(path)).acquire()
        assert path.read_text() == f"{os.getpid()}\n"  # the owner's file is untouched
    finally:
        first.release()


def test_a_file_left_by_a_dead_process_is_taken_over_even_if_its_pid_is_alive(tmp_path):
    """Staleness is "nobody holds the lock", not kill(pid, 0): after kill -9 the pid may
    still exist (unreaped zombie, or reused), and the restart must not be refused."""
    path = tmp_path / "mqttd.pid"
    path.write_text("1\n")  # pid 1 is certainly alive, but holds no lock on this file
    pid_file = PidFile(str(path))
    assert pid_file.acquire() == 1
    assert path.read_text() == f"{os.getpid()}\n"
    pid_file.release()


def test_garbage_in_a_stale_file_is_replaced(tmp_path):
    """A truncated or garbage stale file is no obstacle either."""
    path = tmp_path / "mqttd.pid"
    path.write_text("not a pid")
    pid_file = PidFile(str(path))
    assert pid_file.acquire() is None
    assert path.read_text() == f"{os.getpid()}\n"
    pid_file.release()


def test_release_leaves_a_file_that_is_no_longer_ours(tmp_path):
    """If an operator replaced the file meanwhile, stopping does not delete theirs."""
    path = tmp_path / "mqttd.pid"
    pid_file = PidFile(str(path))
    pid_file.acquire()
    path.unlink()
    path.write_text("4242\n")
    pid_file.release()
    assert path.read_text() == "4242\n"


def test_unwritable_location_is_a_clear_error(tmp_path):
    """A pid file in a missing directory is refused with the path and the cause."""
    with pytest.raises(PidFileError, match="cannot write pid file .*No such file"):
        PidFile(str(tmp_path / "missing" / "mqttd.pid")).acquire()
