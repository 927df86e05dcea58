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
from collections.abc import Iterator
from pathlib import Path

from .. import _lock_file

LOCK_NAME = ".wujie-async.lock"


class OutFolderBusyError(Exception):
    """Another live run writes the same ``--out`` folder (its text is shown cleaned)."""


@contextlib.contextmanager
def out_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.wujie-async.lock`` for the block.

    Raises:
        OutFolderBusyError: another run holds it.
    """
    try:
        fd = _lock_file.take(out / LOCK_NAME)
    except _lock_file.LockHeldError as held:
        raise OutFolderBusyError(
            f"--out {out} is in use by another run{_named(held)}; wait for it to end, "
            "or give this run its own --out"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        yield  # a file system without locks: run as before rather than not at all
        return
    try:
        yield
    finally:
        _lock_file.release(fd)


def _named(held: _lock_file.LockHeldError) -> str:
    if held.pid is None or held.host is None:
        return ""
    return f" (process {held.pid} on {held.host})"
