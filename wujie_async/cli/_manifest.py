"""``manifest.jsonl``, the run's record of how each line ended: its file (opened, written,
read back) and what its rows say (whose input they are, which row ends a line, which
images are saved).

Apart from ``_outcome`` (how a line ended, in words) because it is about the file and its
rows: every command that reads or continues a folder's run reads them here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Final

from ._outcome import Status

# What ``input`` says for records of commands that read no input file.
COMMAND_SOURCES: Final = frozenset({"generate", "edit", "status", "resume", "resend"})


class Manifest:
    """``manifest.jsonl``: one line per saved image, one per line that ended without images.

    Append-only: a re-run adds lines, and a line's final outcome is its last record. Every
    record says which input it belongs to (``input``: the input file's absolute path, or the
    command that wrote it), so the runs of two inputs are never mistaken for one another.
    """

    def __init__(self, handle: BinaryIO, *, source: str) -> None:
        self._handle = handle  # unbuffered: a failed write leaves nothing behind to retry
        self._source = source
        self._torn = False  # a write the disk cut short left part of a line
        self.written: list[dict[str, Any]] = []  # this run's rows, while its file stands

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, straight to the file (a crash loses at most the line being
        written). A line the disk cut short is ended before the next, which stays readable.

        Raises:
            ManifestGoneError: the file was deleted while the run wrote it (its folder
                removed): this run's rows are in ``written``, this one included.
            OSError: the disk refused it (full, say); nothing of it was kept, or a torn part.
        """
        record = {**record, "input": self._source}
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        ending = b"\n" if self._torn else b""
        data = ending + data
        written = 0
        try:
            while written < len(data):
                written += self._handle.write(data[written:]) or 0
        except OSError:
            if written > len(ending):  # part of the row went in: take it out again
                try:
                    # Appended last, by the one writer (the out-folder lock): the row's part
                    # is the file's last ``written - len(ending)`` bytes.
                    fd = self._handle.fileno()
                    os.ftruncate(fd, os.fstat(fd).st_size - (written - len(ending)))
                    self._torn = False
                except OSError:
                    self._torn = True
            elif written:
                self._torn = False  # the torn line was ended, nothing of this row went in
            raise
        self._torn = False
        self.written.append(record)
        if os.fstat(self._handle.fileno()).st_nlink == 0:
            # Written to a file no name leads to any more: the run's rows, and the keys of
            # the jobs it paid for, would be gone with it (a run that went on into a deleted
            # folder said "saved 40" and named a manifest that did not exist).
            raise ManifestGoneError(
                errno.ENOENT,
                "the manifest was deleted while this run wrote it (its folder removed?)",
            )

    def close(self) -> None:
        """Close the file. Every row was written straight to it, so a close that fails (a
        full disk) has nothing left to lose, and the run has reported it already."""
        with contextlib.suppress(OSError):
            self._handle.close()


class ManifestGoneError(OSError):
    """The manifest's file was deleted while a run wrote it."""


def other_inputs(records: Iterable[dict[str, Any]], source: str) -> list[str]:
    """Input files other than ``source`` whose bulk runs wrote ``records``."""
    found = {r.get("input") for r in records}
    return sorted(
        name
        for name in found
        if isinstance(name, str) and name != source and name not in COMMAND_SOURCES
    )


def run_source(records: Iterable[dict[str, Any]], fallback: str) -> str:
    """The input a command that continues a run (``resume``, ``journal resend``) writes for:
    the one input file the manifest holds, else ``fallback``."""
    inputs = other_inputs(records, fallback)
    return inputs[0] if len(inputs) == 1 else fallback


# What ``input`` says for records of commands that continued a folder's journaled run when
# its manifest named no input yet (a run killed outright before its first row).
CONTINUED_SOURCES: Final = frozenset({"resume", "resend"})


def of_source(records: Iterable[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The records of ``source`` (records from before inputs were recorded count as its own,
    and so do those ``resume`` or ``journal resend`` wrote for the folder's one input without
    knowing its name: else a re-run would collect their jobs again and count their points
    twice)."""
    return [
        r
        for r in records
        if r.get("input", source) == source or r.get("input") in CONTINUED_SOURCES
    ]


def base_record(
    status: Status, line: int, row_id: str | None, body: dict[str, Any], tag: str | None = None
) -> dict[str, Any]:
    """The fields every manifest line has (``tag``: how re-runs recognise the row)."""
    record: dict[str, Any] = {"status": status, "line": line}
    if row_id is not None:
        record["id"] = row_id
    if tag is not None:
        record["tag"] = tag
    record["model"] = body.get("model")
    record["size"] = body.get("size")
    record["prompt"] = body.get("prompt")
    record["n"] = body.get("n")
    return record


def recorded_request(record: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """The request a manifest row was written for, as far as rows tell it (the fields of
    ``body`` they do not record are taken from it)."""
    recorded = dict(body)
    for name in ("model", "size", "prompt", "n"):
        if name in record:
            if record[name] is None:
                recorded.pop(name, None)
            else:
                recorded[name] = record[name]
    return recorded


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Every readable record of a manifest (a torn last line is skipped)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return manifest_records(raw)


def manifest_records(raw: bytes) -> list[dict[str, Any]]:
    """Every readable record of a manifest's bytes (a torn line is skipped)."""
    records = []
    # Rows end at "\n" only (JSON escapes it in strings); not ``splitlines()``, which also
    # splits at U+2028 or U+0085 in a prompt, losing that row: its line would be paid again.
    # Each line is decoded on its own: one the disk cut short inside a character is no UTF-8,
    # and decoded whole, the file failed every run of the folder.
    for line in raw.split(b"\n"):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError among them
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def open_manifest(path: Path) -> BinaryIO:
    """The manifest, open for appending rows, unbuffered (blocking: call it on a worker thread).

    A torn last line (a crash mid-write) is ended first, so the next row starts on a line of
    its own: written onto the torn one, both would be unreadable, and the run's own row lost.

    Created ``0600``, and an existing one (an older run's, ``0644``) is tightened to its
    owner, as the journal is: it holds the prompts, keys and paths of the run.

    Raises:
        OSError: the file cannot be opened or written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "ab", buffering=0)
    try:
        _restrict(fd, path)
        with path.open("rb") as raw:
            torn = raw.seek(0, 2) > 0 and raw.seek(-1, 2) >= 0 and raw.read(1) != b"\n"
        if torn:
            handle.write(b"\n")
    except BaseException:
        handle.close()
        raise
    return handle


def _restrict(fd: int, path: Path) -> None:
    """Take group/other access away from the open manifest ``fd``, unless ``path`` is a
    symbolic link: its name is ours, not the user's, and a link planted there would have its
    target's mode changed (the journal's ``-wal`` is treated so)."""
    with contextlib.suppress(OSError):
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077 and not path.is_symlink():
            os.fchmod(fd, mode & 0o700)


def line_outcome(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row that says how a line ended, of its rows (oldest first; at least one): its
    last, unless ``not_sent`` rows follow an ``uncertain`` one. A line resent with
    ``--retry-uncertain`` that the budget (or a stop) kept from being sent is still
    uncertain: it may have been charged, and a plain re-run must neither send it nor stop
    holding its price."""
    for record in reversed(rows):
        if record.get("status") != "not_sent":
            return record if record.get("status") == "uncertain" else rows[-1]
    return rows[-1]


def lines_ended(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tagged line's :func:`line_outcome`, by tag."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        tag = record.get("tag")
        if isinstance(tag, str):
            rows.setdefault(tag, []).append(record)
    return {tag: line_outcome(mine) for tag, mine in rows.items()}


def saved_indexes(records: Iterable[dict[str, Any]]) -> dict[str, set[int]]:
    """Image indexes already saved, per job key."""
    saved: dict[str, set[int]] = {}
    for record in records:
        key, index = record.get("key"), record.get("index")
        if record.get("status", "saved") == "saved" and isinstance(key, str):
            if isinstance(index, int):
                saved.setdefault(key, set()).add(index)
    return saved
