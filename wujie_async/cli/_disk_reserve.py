"""Room kept on the output folder's disk for the manifest rows of the jobs in flight.

Images fill a disk far faster than manifest rows do. When the disk fills mid-run the run stops
sending, but the jobs already out still end, and their rows (key included) are what a re-run
needs to collect them instead of paying for their lines again: without a journal the manifest
is the only record. So a run sets aside a little room before it sends anything, and gives it
back to the rows the disk refused: half at the first refusal (that row, often a job's key, is
written at once, since a run killed outright would lose it), a slice for each later
``pending`` row (a job's key nothing else may hold: no journal, or one the full disk refuses
too), and the rest once every download has ended (nothing else can take it first). The file
is removed at the end of every run; one left by a killed run is reused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESERVE_NAME = ".wujie-async.reserve"
_BASE = 64 * 1024  # the summary's rows, rows of lines not sent
_PER_ROW = 1024  # a row's fields besides the request's own
_MOST = 16 * 1024 * 1024
_BLOCK = 8 * 1024


def reserve_size(bodies: Iterable[dict[str, Any]]) -> int:
    """Room for one row per image of every request that may go out (``bodies``), bounded."""
    size = _BASE
    for body in bodies:
        n = body.get("n")
        images = n if isinstance(n, int) and 0 < n <= 10 else 1
        size += images * (_PER_ROW + len(json.dumps(body, ensure_ascii=False).encode()))
        if size >= _MOST:
            return _MOST
    return size


class DiskReserve:
    """``OUT/.wujie-async.reserve``: taken before a run sends, released for the rows the disk
    refused (blocking methods: call them on a worker thread)."""

    def __init__(self, folder: Path, size: int) -> None:
        self.path = folder / RESERVE_NAME
        self.size = size
        self.taken = 0

    def take(self) -> OSError | None:
        """Set the room aside: all of it, or at least the rows of a summary's worth (a disk
        with less free is one a run would fill at once). The refusal, when not even that much
        could be set aside (its errno says why: a full disk, a file size limit, ...)."""
        refused: OSError | None = None
        for size in dict.fromkeys((self.size, min(self.size, _BASE))):
            try:
                with self.path.open("wb") as file:
                    _allocate(file.fileno(), size)
                self.taken = size
                return None
            except OSError as exc:
                refused = exc
        self.release()
        return refused

    def halve(self) -> None:
        """Give half the room back now: for the row the disk just refused (a key must be on
        disk at once: a run killed outright would lose it), the rest kept for the end."""
        with contextlib.suppress(OSError):
            os.truncate(self.path, self.taken // 2)
            self.taken //= 2

    def spare(self, size: int) -> None:
        """Give back room for one more row of ``size`` bytes that must be on disk at once (a
        job's key that nothing else holds), while any room is left."""
        with contextlib.suppress(OSError):
            # A block's worth more: the row may straddle one, and freed room is whole blocks.
            kept = max(self.taken - size - _BLOCK, 0)
            os.truncate(self.path, kept)
            self.taken = kept

    def release(self) -> None:
        """Give the room back (to the rows that need it, or at the end of the run)."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def _allocate(fd: int, size: int) -> None:
    """``size`` bytes of real blocks for ``fd`` (written out where fallocate is missing)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    chunk = bytes(64 * 1024)
    for start in range(0, size, len(chunk)):
        os.write(fd, chunk[: size - start])
    os.fsync(fd)
