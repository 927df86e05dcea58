"""One run at a time in an output folder.

Two runs writing one folder each read the manifest before the other wrote to it, so each would
send the lines the other is sending, and both would pay. The journal's lock already keeps out a
second run that uses the folder's own journal; this lock keeps it out whatever journal (or none)
each run keeps. The operating system drops the lock when its holder dies (``kill -9``
included), so a killed run never leaves the folder locked.

A run killed outright (``kill -9``) while it downloaded leaves the temporary files of its
images behind; the next run that takes the lock removes them (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .. import _lock_file
from ._common import UsageError

LOCK_NAME = ".wujie-async.lock"

logger = logging.getLogger("wujie_async.cli")

# The temporary files of ours in an output folder: an image being written
# (``.wujie-INDEX.HEX.part``, or ``.wujie.HEX.part`` for one sent inline, see _atomic_file) and
# the write test of the folder (``.wujie-async-write-test-XXXXXXXX``, see check_out_folder).
_OUR_TEMP = re.compile(r"\.wujie(-\d+)?\.[0-9a-f]{12}\.part|\.wujie-async-write-test-\w+")
# Without /proc to tell which files a live process holds open: only files this old are taken
# for a killed run's (no download lasts that long unless --download-timeout says so).
_STALE_WITHOUT_PROC_S = 24 * 3600.0


class OutFolderBusyError(Exception):
    """Another live run writes the same ``--out`` folder (its text is shown cleaned)."""


@contextlib.contextmanager
def out_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.wujie-async.lock`` for the block.

    Raises:
        OutFolderBusyError: another run holds it.
        UsageError: the lock file is a symbolic link (never followed).
    """
    try:
        fd = _lock_file.take(out / LOCK_NAME)
    except _lock_file.LockHeldError as held:
        raise OutFolderBusyError(
            f"--out {out} is in use by another run{_named(held)}; wait for it to end, "
            "or give this run its own --out"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(
                f"--out {out}: {LOCK_NAME} is a symbolic link; a lock file is never one: "
                "remove it (followed, the run would have emptied the file it points at)"
            ) from None
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


def remove_stale_temp_files(out: Path, started: float) -> int:
    """Remove the temporary files of ours in ``out`` that no live process writes: a run killed
    outright (``kill -9``) while it downloaded left them, and no later run would. Returns how
    many were removed (an INFO line says so).

    Blocking. Call it holding the folder's lock: no other bulk or resume run writes there. A
    ``generate``, ``edit`` or ``status --wait`` may (they take no lock): a file is removed only
    when it was last written before ``started`` (this run's start, as ``time.time()``) and no
    process holds it open (read from /proc; where there is none, only files a day old).
    """
    try:
        names = [entry for entry in os.scandir(out) if _OUR_TEMP.fullmatch(entry.name)]
    except OSError:
        return 0
    stale: dict[tuple[int, int], tuple[str, float]] = {}  # (device, inode): name, written
    for entry in names:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.is_file(follow_symlinks=False) and info.st_mtime < started:
            stale[(info.st_dev, info.st_ino)] = (entry.name, info.st_mtime)
    if not stale:
        return 0
    held = _held_open(set(stale))
    if held is None:  # no /proc: only what no download could still be writing
        stale = {
            file: (name, written)
            for file, (name, written) in stale.items()
            if started - written > _STALE_WITHOUT_PROC_S
        }
        held = set()
    removed = 0
    for file, (name, _) in stale.items():
        if file in held:
            continue
        with contextlib.suppress(FileNotFoundError):
            try:
                os.remove(out / name)
            except OSError as exc:
                logger.debug("could not remove the temporary file %s: %s", name, exc)
                continue
            removed += 1
    if removed:
        logger.info(
            "removed %d temporary file(s) a run killed while it wrote images left in %s",
            removed,
            out,
        )
    return removed


def _held_open(files: set[tuple[int, int]]) -> set[tuple[int, int]] | None:
    """Which of ``files`` (device, inode) a live process holds open; None: no /proc to say."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held: set[tuple[int, int]] = set()
    try:
        pids = [name for name in os.listdir(proc) if name.isdecimal()]
    except OSError:
        return None
    for pid in pids:
        fds = proc / pid / "fd"
        try:
            numbers = os.listdir(fds)
        except OSError:
            continue  # gone, or another user's
        for number in numbers:
            try:
                info = os.stat(fds / number)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in files:
                held.add((info.st_dev, info.st_ino))
    return held
