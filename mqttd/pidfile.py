"""The pid file of ``mqttd run --pidfile PATH`` (layer L6).

A production pid file must not stop a restart after a crash.  twistd's own
pid file decides "another server is running" from ``kill(pid, 0)``, which
after ``kill -9`` still succeeds while the dead broker is an unreaped zombie,
and later succeeds for whatever unrelated process got the pid.  Here the
running broker holds an exclusive ``flock`` on the file for its whole life;
the kernel drops that lock when the process ends, however it ends (SIGKILL,
OOM killer, power loss), so a file nobody holds a lock on is stale by
definition and is taken over.  A file whose lock is held belongs to a running
broker: starting a second one is refused with one line naming its pid.

POSIX only (``fcntl``), like twistd's foreground mode it is used with.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import Optional


class PidFileError(RuntimeError):
    """The pid file is held by a running process (or cannot be written); the message says which."""


class PidFile:
    """``path`` holds this process's pid (decimal, newline) while it runs.

    :param path: file name; made absolute at construction so a later change
        of directory does not matter.
    """

    #: attempts when another process removes the file while we lock it
    ATTEMPTS = 5

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> Optional[int]:
        """Lock the file and write this process's pid into it.

        :returns: the pid a stale file (left by a process that died without
            removing it) named, or None if there was no file or it was empty.
        :raises PidFileError: a running process holds the file (the message
            names its pid), or the file cannot be created or written.
        """
        if self._fd is not None:
            return None
        for _ in range(self.ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                             0o644)
            except OSError as error:
                raise PidFileError(f"cannot write pid file {self.path}: "
                                   f"{error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_pid(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise PidFileError(f"cannot lock pid file {self.path}: "
                                       f"{error.strerror or error}") from None
                who = f"pid {holder}" if holder else "another process"
                raise PidFileError(f"pid file {self.path} is held by running {who} "
                                   f"(another broker?)") from None
            # the previous owner may have removed the file between our open
            # and our lock: then we hold a lock on a file nobody can see
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = _read_pid(fd)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, b"%d\n" % os.getpid(), 0)
            except OSError as error:
                os.close(fd)
                raise PidFileError(f"cannot write pid file {self.path}: "
                                   f"{error.strerror or error}") from None
            self._fd = fd
            return stale
        raise PidFileError(f"pid file {self.path} keeps being replaced by another process")

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass  # already gone or replaced: nothing of ours to remove
        finally:
            os.close(fd)  # drops the lock


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
