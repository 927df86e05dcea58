"""Reading a file the user named (a private-key file, an ``edit`` image): bounded, never stuck.

``Path.read_bytes()`` on ``/dev/zero`` reads until memory runs out, and opening a FIFO for
reading blocks until a writer opens it, which may be never. So the path is checked to be a
regular file before it is opened; it is opened without blocking (a FIFO put there after the
check does not stop the open either) and checked again on the open file; and at most one byte
more than the largest size that can be valid is read, so a file that grows meanwhile is
refused too.
"""

from __future__ import annotations

import errno
import os
import stat

# What a path that is not a regular file is, in the words of an error message.
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class LocalFileError(Exception):
    """A named file that cannot be used.

    Attributes:
        reason: why, in words; never the file's name or any of its bytes.
        too_large: it is larger than the limit (the caller may say which rule that is).
    """

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


def not_regular(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read as a regular file; None when it is one.

    A directory gets the words its ``open()`` error has always given.
    """
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return os.strerror(errno.EISDIR)
    kind = next((words for test, words in _KINDS if test(mode)), "an unknown kind of file")
    return f"{kind}, not a regular file"


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the regular file at ``path``, which may hold at most ``limit`` bytes.

    Blocks (it reads a file): call it on a worker thread from async code.

    Raises:
        LocalFileError: the path is missing, unreadable, not a regular file (a FIFO, a
            device, a directory) or larger than ``limit``. It is raised outside any
            ``except`` block, so no ``OSError`` (whose text holds the file's name, which may
            be a key pasted where its path belongs) rides along as its ``__context__``.
    """
    try:
        return _read(path, limit)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__  # never the file name
    except ValueError:  # a NUL in the path: no file has that name
        reason = "not a usable file name (it holds a NUL character)"
    raise LocalFileError(reason)


def _read(path: str | os.PathLike[str], limit: int) -> bytes:
    # Checked before it is opened: opening a FIFO for reading blocks until a writer comes.
    info = os.stat(path)
    problem = not_regular(info.st_mode)
    if problem is not None:
        raise LocalFileError(problem)
    if info.st_size > limit:  # refused unread: a sparse file may claim gigabytes
        raise LocalFileError(_too_large(limit), too_large=True)
    # O_NONBLOCK: a FIFO swapped in after the check above must not block the open either
    # (it has no effect on reading a regular file).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        problem = not_regular(os.fstat(fd).st_mode)
        if problem is not None:
            raise LocalFileError(problem)
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew since the check
        raise LocalFileError(_too_large(limit), too_large=True)
    return data


def _too_large(limit: int) -> str:
    return f"larger than {limit} bytes"
