"""Room kept on the output folder's disk for the manifest rows of the jobs in flight.

Images fill a disk far faster than manifest rows do. When the disk fills mid-run the run stops
sending, but the jobs already out still end, and their rows (key included) are what a re-run
needs to collect them instead of paying for their lines again: without a journal the manifest
is the only record. So a run sets aside a little room before it sends anything, and gives it
back to the rows the disk refused once every download has ended (nothing else can take it
first). The file is removed at the end of every run; one left by a killed run is reused.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESERVE_NAME = ".wujie-async.reserve"
_BASE = 64 * 1024  # the summary's rows, rows of lines not sent
_PER_ROW = 1024  # a row's fields besides the request's own
_MOST = 16 * 1024 * 1024


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

    def take(self) -> None:
        """Set the room aside, as much of it as the disk has (a disk already full gets none:
        the run then meets the full disk at its first row, before it pays for much)."""
        with contextlib.suppress(OSError), self.path.open("wb") as file:
            try:
                os.posix_fallocate(file.fileno(), 0, self.size)
            except (AttributeError, OSError):  # no fallocate here: write it out
                chunk = bytes(64 * 1024)
                for _ in range(0, self.size, len(chunk)):
                    file.write(chunk)
                file.flush()

    def release(self) -> None:
        """Give the room back (to the rows that need it, or at the end of the run)."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
