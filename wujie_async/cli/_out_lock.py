"""One run at a time in an output folder.

Two runs writing one folder each read the manifest before the other wrote to it, so each would
send the lines the other is sending, and both would pay. The journal's lock already keeps out a
second run that uses the folder's own journal; this lock keeps it out whatever journal (or none)
each run keeps. The operating system drops the lock when its holder dies (``kill -9``
included), so a killed run never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".wujie-async.lock"


class OutFolderBusyError(Exception):
    """Another live run writes the same ``--out`` folder (its text is shown cleaned)."""


@contextlib.contextmanager
def out_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.wujie-async.lock`` for the block.

    Raises:
        OutFolderBusyError: another run holds it.
    """
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutFolderBusyError(
                f"--out {out} is in use by another run{holder}; wait for it to end, "
                "or give this run its own --out"
            ) from None
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            yield  # a file system without locks: run as before rather than not at all
            return
        raise
    try:
        with contextlib.suppress(OSError):  # the name in it only serves the message above
            os.ftruncate(fd, 0)
            mine = {"pid": os.getpid(), "host": socket.gethostname()}
            os.pwrite(fd, json.dumps(mine).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        pid, host = holder["pid"], holder["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not isinstance(pid, int) or not isinstance(host, str):
        return ""
    return f" (process {pid} on {host})"
