"""Where ``job.save()`` writes: its name template (checked before the wait for the job), its
folder as a path, and the temporary files a killed save left in that folder.

Apart from ``_download`` because none of it downloads: these are the rules of the names and
the folder, which the ``Downloader`` applies before a ``job.save()``; the folder's file-system
reads (``prepare_folder``) block, and the downloader runs them on a worker thread, once per
folder.
"""

from __future__ import annotations

import contextlib
import os
import string
from pathlib import Path

from . import _atomic_file
from ._errors import InvalidRequestError
from ._file_names import DEFAULT_NAME, check_template

_CLI_ONLY_FIELDS = frozenset({"id", "line"})
# Our temporary files are ".wujie-<index>.<12 hex>.part" (".wujie.<12 hex>.part" inline).
TEMP_STEM = "wujie"
# A temporary file untouched for this long, and for longer than the deadline (plus
# STALE_MARGIN_S), is a killed process's: no save outlives its deadline, and a live one
# touches its file at every write. An hour at least: another process with a longer deadline
# than this client's may be writing into the same folder.
STALE_TEMP_S = 3600.0
STALE_MARGIN_S = 600.0  # a frozen disk's step may end past the deadline (STEP_GRACE_S and more)


def stale_after(deadline: float | None) -> float | None:
    """How old (by mtime) a temporary file of ours must be to be removed as a killed save's;
    None (none is removed) without a deadline: a save may then last any time."""
    if deadline is None:
        return None
    return max(STALE_TEMP_S, deadline + STALE_MARGIN_S)


def check_job_template(name: str) -> None:
    """Refuse a ``job.save`` template before waiting for the job.

    The fields are ``{key}``, ``{index}`` and ``{ext}``; ``{id}`` and ``{line}`` are the
    command line's (a row's id and input line) and a library job has neither.

    Raises:
        InvalidRequestError: an unusable template, or one with ``{id}`` or ``{line}``.
    """
    if not isinstance(name, str):
        raise InvalidRequestError([("name", "must be a template string, e.g. " + DEFAULT_NAME)])
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(name) if field}
    except ValueError:
        check_template(name)  # says what is wrong with it
        raise
    if fields & _CLI_ONLY_FIELDS:
        raise InvalidRequestError(
            [
                (
                    "name",
                    "{id} and {line} are the command line's row fields, and a job has neither: "
                    "use {key}, {index} and {ext}",
                )
            ]
        )
    if "key" not in fields and not fields - {"key", "index", "ext"}:
        # check_template would name the command line's {id} and {line} too.
        raise InvalidRequestError(
            [("name", "must use {key}, or every job would get the same name")]
        )
    check_template(name)


def folder_path(directory: object) -> Path:
    """``job.save()``'s folder as a path, refused when it is none (``None``, bytes)."""
    if isinstance(directory, str | os.PathLike):
        with contextlib.suppress(TypeError):  # a PathLike of bytes
            return Path(directory)
    raise InvalidRequestError([("directory", "must be a folder path (a str or os.PathLike)")])


def prepare_folder(folder: Path, older_than: float | None) -> tuple[Path | None, bool, list[str]]:
    """The file in ``folder``'s way (if any), whether it is a folder, and the names of the
    stale temporary files removed from it (blocking)."""
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        return blocker, False, []
    try:
        if not folder.is_dir():
            return None, False, []  # not there yet: the save creates it
    except OSError:
        return None, False, []
    if older_than is None:
        return None, True, []
    return None, True, _atomic_file.remove_stale(folder, TEMP_STEM, older_than)


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing part of ``folder``'s path, if it is not a folder (blocking)."""
    for part in (folder, *folder.parents):
        try:
            is_dir = part.is_dir()
            exists = is_dir or part.exists()
        except OSError:
            return None  # unreadable: the save says what is wrong when it writes
        if exists:
            return None if is_dir else part
    return None
