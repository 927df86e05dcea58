"""An exclusive ``flock`` on a file that names its holder (pid and host).

One process at a time: the journal's one writer, the command line's one run per output folder.
The operating system drops the lock when its holder dies, however it dies (``kill -9``
included), so a dead holder never leaves it taken. The name inside only serves the message a
second taker gets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

# The errnos of a lock another holder has; any other OSError is the file system's.
HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class LockHeldError(Exception):
    """Another live holder has the lock.

    Attributes:
        pid: its process id, when it wrote one.
        host: its host name, when it wrote one.
    """

    def __init__(self, pid: int | None, host: str | None) -> None:
        super().__init__(f"held by process {pid} on {host}")
        self.pid = pid
        self.host = host


def take(path: Path) -> int:
    """Take the lock on ``path`` (created ``0600`` if missing, an older one's group and
    other access taken away); returns the open file, kept until :func:`release`.

    Raises:
        LockHeldError: another holder has it.
        OSError: the file cannot be opened (``errno.ELOOP``: ``path`` is a symbolic link), or
            the file system cannot lock it.
    """
    # Never through a link: the lock file is emptied and written, and whoever may write in
    # its folder could point a link at any file of ours (a key file, a config).
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OSError(
            errno.ELOOP, "a lock file is never a symbolic link: refused (remove it)", str(path)
        ) from None
    try:
        with contextlib.suppress(OSError):  # an older lock file, created with looser rights
            mode = os.fstat(fd).st_mode & 0o777
            if mode & 0o077:
                os.fchmod(fd, mode & 0o700)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid, host = _holder(fd)
        os.close(fd)
        if exc.errno in HELD_ERRNOS:
            raise LockHeldError(pid, host) from None
        raise
    with contextlib.suppress(OSError):  # the lock is what matters; the name is for messages
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    return fd


def release(fd: int) -> None:
    """Erase the holder's name (still ours while we do) and let the lock go."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _holder(fd: int) -> tuple[int | None, str | None]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        pid, host = holder.get("pid"), holder.get("host")
    except (OSError, ValueError, AttributeError):
        return None, None
    return (
        pid if isinstance(pid, int) else None,
        host if isinstance(host, str) else None,
    )
