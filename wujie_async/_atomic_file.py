"""Files that appear under their final name complete or not at all.

Bytes go to a new hidden temporary file in the destination folder (``O_EXCL``, never through
a link, with the user's umask), which is flushed, fsynced, closed and then renamed over the
final name; the folder is fsynced so the rename itself survives a crash. On any failure the
temporary file is removed. Every function here blocks: call them on a worker thread.

A process killed while it writes (a plain SIGTERM, ``kill -9``, a crash) leaves its temporary
file: :func:`remove_stale` removes those of a folder that nobody has touched for long enough.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

_TOKEN_BYTES = 6  # the random part of a temporary file's name: 12 hex digits


def open_temp(folder: Path, stem: str) -> tuple[IO[bytes], Path]:
    """A new temporary file in ``folder`` (created if missing), open for writing."""
    # O_EXCL + O_NOFOLLOW: a new file, never through a link; mode 0o666 & ~umask, like the
    # manifest (mkstemp would force 0600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    temp = folder / f".{stem}.{secrets.token_hex(_TOKEN_BYTES)}.part"
    try:
        fd = os.open(temp, flags, 0o666)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, flags, 0o666)
    return os.fdopen(fd, "wb"), temp


def commit(
    handle: IO[bytes], temp: Path, path: Path, *, wanted: Callable[[], bool] = lambda: True
) -> None:
    """Make the temporary file durable, then give it its final name.

    ``wanted()`` is asked just before the rename: False (its save gave up meanwhile) leaves
    the temporary file, closed, for the caller to remove.
    """
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    if not wanted():
        return
    os.replace(temp, path)
    _sync_folder(path.parent)


def discard(handle: IO[bytes], temp: Path) -> None:
    """Close and remove a temporary file (whatever state it is in)."""
    with contextlib.suppress(OSError):
        handle.close()
    with contextlib.suppress(FileNotFoundError):
        os.remove(temp)


def _sync_folder(folder: Path) -> None:
    # The rename is durable once the folder's entry is on disk too.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale(folder: Path, prefix: str, older_than: float) -> list[str]:
    """Remove the temporary files in ``folder`` whose stem is ``prefix`` or ``prefix-<n>``
    and that nobody has written to (mtime) for ``older_than`` seconds; returns their names.

    Only names :func:`open_temp` makes (``.<stem>.<12 hex>.part``), only regular files (a
    link is left alone), never anything else; a folder that cannot be listed, or a file that
    cannot be removed, is left as it is.
    """
    name = re.compile(
        rf"\.{re.escape(prefix)}(?:-[0-9]+)?\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.part", re.ASCII
    )
    cutoff = time.time() - older_than
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed  # no folder yet, or not ours to read: nothing to do here
    for entry in entries:
        if not name.fullmatch(entry.name):
            continue
        try:
            status = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(status.st_mode) and status.st_mtime < cutoff:
                os.remove(entry.path)
                removed.append(entry.name)
        except OSError:
            continue  # gone meanwhile (another process's sweep), or not ours to remove
    return removed
