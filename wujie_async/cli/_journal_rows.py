"""Which journal rows a ``journal`` command's words name, the rows of each input line, and an id
row's line as the manifest row of its own submit gives it.

Rows are named the way the input named them: ``id`` when the row had one, else its line, and
``row 12`` (the journal's row number) for a row that names neither; ``row 12`` names any row
too (the one way to name one row of a line that has several). ``#12`` names journal row 12 as
well, unless a row's own id reads ``#12`` (a ticket number): the CLI prints ``row 12``, which
no id shadows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .. import JournalEntry
from ._common import UsageError
from ._outcome import clean
from ._plan import line_of


def row_name(entry: JournalEntry) -> str:
    """The row as ``journal list`` names it (and ``forget``/``resend`` take it back)."""
    line, row_id = line_of(entry)
    if row_id is not None:
        return f"id {clean(row_id)}"
    return f"line {line}" if line else numbered(entry.id)


def numbered(row: int) -> str:
    """Journal row ``row`` as the CLI prints it for a command to take back: ``row 12``.
    Never ``#12``, which names the row whose own id reads ``#12`` when there is one."""
    return f"row {row}"


# A row as the CLI's summaries print it: ``line 4 (id fox)`` (the id decides).
_LINE_AND_ID = re.compile(r"^line (\d+) \(id (?P<id>.+)\)$", re.DOTALL)
# Journal row 12 as the CLI prints it (see numbered).
_NUMBERED = re.compile(r"^row (\d+)$")


def line_at(entry: JournalEntry, lines: Mapping[int, int] | None) -> tuple[int, str | None]:
    """The row's input line and id: an id row's line is the manifest's (``lines``, by journal
    row, see :func:`manifest_lines`), the one its summary printed (``line 3 (id c)``), else 0."""
    line, row_id = line_of(entry)
    if row_id is not None:
        line = (lines or {}).get(entry.id, 0)
    return line, row_id


def own_ids(entries: list[JournalEntry]) -> frozenset[str]:
    """Every row id ``entries`` hold, as given and as printed: a word that is one names that
    row alone (an id may read ``#1``, a ticket number, beside journal row 1)."""
    ids: set[str] = set()
    for entry in entries:
        row_id = line_of(entry)[1]
        if row_id is not None:
            ids |= {row_id, clean(row_id)}
    return frozenset(ids)


def matches(
    entry: JournalEntry,
    wanted: set[str],
    ids: frozenset[str] = frozenset(),
    lines: Mapping[int, int] | None = None,
) -> bool:
    """Whether ``wanted`` names the row: by its id or line number, or as the CLI prints it
    (``id fox``, ``line 4``, ``line 4 (id fox)`` in summaries, ``row 12`` or ``#12`` for
    journal row 12, the ``name`` of ``journal list --json``), which is what a user copies. A
    row's own id comes first: a word that is the id of a row of ``ids`` (see
    :func:`own_ids`), ``#1`` say, names that row, never journal row 1 (``row 1`` does; one
    that is an id too names two rows, see :func:`refuse_unknown`). An id row's line number
    is the one ``lines`` (see :func:`manifest_lines`) gives it, as the summaries print it."""
    return any(named_as(entry, word, ids, lines) is not None for word in wanted)


def named_as(
    entry: JournalEntry,
    word: str,
    ids: frozenset[str] = frozenset(),
    lines: Mapping[int, int] | None = None,
) -> str | None:
    """How ``word`` names the row: ``"row"`` (``row 12``, ``#12``), ``"id"``, ``"line"``, or
    None."""
    line, row_id = line_at(entry, lines)
    said = word.strip()
    if row_id is not None and said in (row_id, clean(row_id)):
        return "id"  # its own id first: an id may read "#1" (a ticket number)
    numbered_as = _NUMBERED.match(said)
    if numbered_as is not None:
        # Journal row N whatever ids read "#N": the form the CLI prints for it.
        return "row" if int(numbered_as[1]) == entry.id else None
    if said.startswith("#") and said[1:].isdigit():
        # Journal row N (the one way to name one row of a line that has several, or a row
        # with neither a line nor an id), unless a row's own id reads "#N": "#1" named
        # journal row 1 (another line's) beside the row of id "#1".
        return "row" if int(said[1:]) == entry.id and said not in ids else None
    both = _LINE_AND_ID.match(said)
    if both is not None:
        if row_id is not None and both["id"] in (row_id, clean(row_id)):
            return "id"
        return None
    if row_id is not None and said in (f"id {row_id}", f"id {clean(row_id)}"):
        return "id"
    if line > 0 and said in (str(line), f"line {line}"):
        return "line"
    return None


# What a manifest row records of its request (``_manifest.base_record``).
_RECORDED_FIELDS = ("model", "size", "prompt", "n")


def manifest_lines(entries: list[JournalEntry], records: list[dict[str, Any]]) -> dict[int, int]:
    """The input line of each id row of ``entries`` (every journal row: by its number) that
    a manifest row of its own submit gives (an id tag holds no line number).

    A folder's manifest may be another run's (a journal kept beside an earlier run's folder,
    or shared by several inputs): a row of the same id there is another line. A manifest row
    records a journal row's submit when it has the row's tag and request (what manifest rows
    record of it), and, holding a job key, the row's key (or, the row holding none, a key no
    row holds: a full disk kept it out of the journal, see ``record_manifest_keys``). The
    latest such row gives the line."""
    held = {entry.job_key for entry in entries if entry.job_key}
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        tag = record.get("tag")
        if isinstance(tag, str) and tag.startswith("id:"):
            by_tag.setdefault(tag, []).append(record)
    lines: dict[int, int] = {}
    for entry in entries:
        for record in by_tag.get(entry.tag or "", ()):
            line = record.get("line")
            if isinstance(line, int) and not isinstance(line, bool) and line > 0:
                if _records_submit_of(record, entry, held):
                    lines[entry.id] = line
    return lines


def _records_submit_of(record: dict[str, Any], entry: JournalEntry, held: set[str]) -> bool:
    """Whether a manifest row of ``entry``'s tag records that row's submit (see
    :func:`manifest_lines`)."""
    key = record.get("key")
    if isinstance(key, str) and key != entry.job_key and (entry.job_key or key in held):
        return False  # another job's row
    return all(
        record[name] == entry.request.get(name) for name in _RECORDED_FIELDS if name in record
    )


def rows_per_line(entries: list[JournalEntry]) -> list[list[JournalEntry]]:
    """Every row of each input line (by tag; a row without one is a line of its own), oldest
    first, the lines in the order of their latest rows. A line has several rows when it was
    sent again and the run ended before it forgot the old one, or after ``--retry-failed``."""
    # A row without a tag goes by its number, an int: a tag is any text a program chose
    # ("#2", its queue's message number), which "#N" for row N would have made one line.
    lines: dict[str | int, list[JournalEntry]] = {}
    for entry in entries:
        lines.setdefault(entry.tag or entry.id, []).append(entry)
    return sorted(lines.values(), key=lambda rows: rows[-1].id)


def latest_per_row(entries: list[JournalEntry]) -> list[JournalEntry]:
    """The latest row of each input line (see :func:`rows_per_line`), oldest first."""
    return [rows[-1] for rows in rows_per_line(entries)]


def refuse_unknown(
    action: str,
    done: str,
    rows: list[str],
    entries: list[JournalEntry],
    lines: Mapping[int, int] | None = None,
) -> None:
    """Refuse a word that names no row, or names rows both by id and by line number (``2``:
    the row whose id is 2 and input line 2, an id row's line being the one ``lines`` gives)
    or by id and by journal number (``row 2``, the id of a row and journal row 2): each would
    act on rows the user did not mean."""
    ids = own_ids(entries)
    unknown = [
        row for row in rows if not any(matches(entry, {row}, ids, lines) for entry in entries)
    ]
    if unknown:
        shown = ", ".join(clean(row) for row in unknown[:20])
        raise UsageError(
            f"journal {action}: no journal row for {shown} (rows are input line numbers or "
            f"ids, as `journal list` and the summaries show them: 4 or 'line 4', fox or "
            f"'id fox', 'line 4 (id fox)', or 'row 12' for journal row 12); nothing was {done}"
        )
    for row in rows:
        # A line number the manifest gives rows of two ids, or an id row and the line's rows
        # without one (the line's id changed between runs), names two rows: each would be
        # sent, two jobs for one line.
        # (A row without an id is said by its journal number: its line names both.)
        by_line = {
            row_name(entry) if line_of(entry)[1] is not None else numbered(entry.id): entry
            for entry in entries
            if named_as(entry, row, ids, lines) == "line"
        }
        # (Rows of one line without ids, an edited line, are refused by resend with more.)
        if len(by_line) > 1 and any(line_of(entry)[1] is not None for entry in by_line.values()):
            choices = " or ".join(repr(name) for name in by_line)
            raise UsageError(
                f"journal {action}: {clean(row.strip())!r} names {len(by_line)} rows at that "
                f"line (its id changed between runs); say which ({choices}); nothing was {done}"
            )
        named = {named_as(entry, row, ids, lines): entry for entry in entries}
        if "id" in named and ("line" in named or "row" in named):
            by_id = row_name(named["id"])
            if "line" in named:
                other = said = f"line {line_at(named['line'], lines)[0]}"
            else:
                other, said = f"journal row {named['row'].id}", f"#{named['row'].id}"
            # "#N" is no other name for journal row N when a row's own id reads so.
            forms = [repr(by_id)] + ([repr(said)] if said not in ids else [])
            raise UsageError(
                f"journal {action}: {clean(row.strip())!r} names two rows, {by_id} and "
                f"{other}; say which, as `journal list` prints them ({' or '.join(forms)}); "
                f"nothing was {done}"
            )


def edited_lines(lines: list[list[JournalEntry]]) -> list[list[list[JournalEntry]]]:
    """The input lines of ``lines`` (each the rows of one request, see :func:`rows_per_line`)
    that hold two requests or more: a line edited between runs is a new request (a new tag)
    at the same line number. Sent by its number, each would be sent: two jobs for one line."""
    by_number: dict[int, list[list[JournalEntry]]] = {}
    for rows in lines:
        line, row_id = line_of(rows[-1])
        if row_id is None and line > 0:
            by_number.setdefault(line, []).append(rows)
    return [requests for requests in by_number.values() if len(requests) > 1]


def edited_said(edited: list[list[list[JournalEntry]]]) -> str:
    """Each line of two requests or more, its rows by journal number, state and prompt."""

    def request(rows: list[JournalEntry]) -> str:
        numbers = " and ".join(numbered(entry.id) for entry in rows)
        prompt = clean(str(rows[-1].request.get("prompt", "")))[:40]
        return f"{numbers} ({'/'.join(sorted({e.state for e in rows}))}, prompt {prompt!r})"

    return "; ".join(
        f"line {line_of(requests[0][-1])[0]} holds {len(requests)} requests (edited between "
        f"runs): " + ", ".join(request(rows) for rows in requests)
        for requests in edited[:10]
    )


# Rows whose job the gateway took (and charged for): sending them again pays again, and the
# new row would replace the one that leads to the first job's images.
PAID_STATES = {
    "accepted": "its job is running (paid)",
    "succeeded": "its job succeeded (paid)",
    "cancelled": "its job was accepted (paid) and only its wait cancelled",
}


def paid_said(paid: list[JournalEntry]) -> str:
    """The first ten rows of paid jobs, each with what its state means."""
    return "; ".join(
        f"{row_name(entry)} is {entry.state}: {PAID_STATES[entry.state]}" for entry in paid[:10]
    )
