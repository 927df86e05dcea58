"""Reading a bulk input file: every row validated before anything is sent.

Formats, chosen by extension: ``.txt`` (a prompt per line; blank lines and ``#`` comments
skipped), ``.jsonl``/``.ndjson`` (a JSON object per line), ``.csv`` (a header row with a
``prompt`` column plus request-field columns) and ``.json`` (an array of strings or objects).
A row may carry ``id``: the user's own name for it, written to the manifest and used as the
journal tag, so re-runs recognise the row even when lines move.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shlex
import stat
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import InvalidRequestError
from .._local_files import not_regular
from .._models import EditRequest, GenerationRequest

MAX_REPORTED_PROBLEMS = 20
FORMATS = {
    ".txt": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".json": "json",
}
REQUEST_FIELDS = tuple(GenerationRequest.model_fields)
ALLOWED_FIELDS = ("id", *REQUEST_FIELDS)
# Numbers arrive as text in a CSV cell; these fields are converted before validation.
_INT_FIELDS = frozenset({"n", "output_compression"})


class InputFileError(Exception):
    """The input file cannot be used; each problem reads ``file:line: field: rule``."""

    def __init__(self, problems: list[str], *, usage: bool = False) -> None:
        self.problems = problems
        self.usage = usage
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One request of the input, with where it came from.

    Attributes:
        line: the line (or array element, counted from 1) it came from.
        request: the validated request.
        row_id: the row's own ``id``, when it gave one.
    """

    line: int
    request: GenerationRequest | EditRequest
    row_id: str | None = None

    @property
    def tag(self) -> str:
        """The journal tag of this row: its id, or its line number and a digest of its body.

        The digest makes an edited line a new row, so a re-run never mistakes it for the
        request that used to stand there.
        """
        if self.row_id is not None:
            return f"id:{self.row_id}"
        body = json.dumps(self.request.body(), sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(body.encode()).hexdigest()[:12]
        return f"line:{self.line}:{digest}"


def line_tag(tag: str) -> tuple[int, str] | None:
    """(line, digest) of a ``line:N:DIGEST`` tag; None for an id tag or anything else."""
    parts = tag.split(":")
    if len(parts) == 3 and parts[0] == "line" and parts[1].isdecimal():
        return int(parts[1]), parts[2]
    return None


def moved_rows(
    items: list[BulkItem], recorded: Collection[str], *, claimed: Collection[str] = ()
) -> dict[str, str]:
    """Lines that moved since they were recorded: item tag -> the recorded tag it stands for.

    A row without an id is known by its line and its request. When lines are added or
    removed above it, its line changes but its request does not: a line whose own tag was
    never recorded takes the first recorded line of the same request that no line of the
    input claims (in line order). So a header added to the file resends nothing, and two
    identical lines stay two rows. ``claimed``: recorded tags that lines of the input other
    than ``items`` hold (``items`` being a part of it).
    """
    current = {item.tag for item in items} | set(claimed)
    free: dict[str, list[tuple[int, str]]] = {}
    for tag in recorded:
        parsed = line_tag(tag)
        if parsed is not None and tag not in current:
            free.setdefault(parsed[1], []).append((parsed[0], tag))
    for lines in free.values():
        lines.sort(reverse=True)  # popped from the end: lowest line first
    moved: dict[str, str] = {}
    for item in sorted(items, key=lambda item: item.line):
        parsed = line_tag(item.tag)
        if parsed is None or item.tag in recorded:
            continue
        candidates = free.get(parsed[1])
        if candidates:
            moved[item.tag] = candidates.pop()[1]
    return moved


def _lines(text: str) -> list[str]:
    """The lines of ``text`` as an editor numbers them: split at LF, CRLF or CR only.

    Not ``str.splitlines()``: it also splits at a form feed, U+2028 and other separators a
    prompt (or a JSON string) may hold, which would send one prompt as two paid ones and
    number every later line wrongly.
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


_UTF16_32_MARKS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def decode_input(path: Path, data: bytes) -> str:
    """The text of an input (UTF-8, a byte order mark skipped), or an error that says where it
    is not UTF-8 and how to convert it.

    Raises:
        InputFileError: ``data`` is not UTF-8 (named by line, or as UTF-16/32 by its mark).
    """
    source = "FILE" if path.name == "<stdin>" else shlex.quote(str(path))
    convert = (
        "bulk input must be UTF-8: save it as UTF-8, or convert it: "
        f"iconv -f {{encoding}} -t UTF-8 {source} > prompts-utf8{path.suffix or '.txt'}"
    )
    for mark, encoding in _UTF16_32_MARKS:
        if data.startswith(mark):
            raise InputFileError(
                [
                    f"{path}: is {encoding} text (it starts with a {encoding} byte order mark); "
                    + convert.format(encoding=encoding)
                ]
            )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = len(_lines(data[: exc.start].decode("utf-8-sig")))
        raise InputFileError(
            [
                f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); "
                + convert.format(encoding="ENCODING")
                + ", ENCODING being the one it was saved in (GB18030, CP1252, LATIN1, ...)"
            ]
        ) from None


def _raw_rows(path: Path, kind: str, text: str) -> list[tuple[int, Any]]:
    """(line number, raw row) pairs; raises InputFileError for a file that cannot be parsed."""
    if kind == "text":
        rows: list[tuple[int, Any]] = []
        for number, line in enumerate(_lines(text), start=1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                rows.append((number, {"prompt": stripped}))
        return rows
    if kind == "jsonl":
        rows = []
        for number, line in enumerate(_lines(text), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            try:
                rows.append((number, _json(stripped)))
            except _UnreadableJson as exc:
                rows.append((number, _Bad(f"not valid JSON ({exc.why})")))
        return rows
    if kind == "json":
        try:
            loaded = _json(text)
        except _UnreadableJson as exc:
            where = f"{path}:{exc.line}" if exc.line is not None else str(path)
            raise InputFileError([f"{where}: not valid JSON ({exc.why})"]) from None
        if not isinstance(loaded, list):
            raise InputFileError([f"{path}:1: must be a JSON array of prompts or request objects"])
        return [
            (number, {"prompt": row} if isinstance(row, str) else row)
            for number, row in enumerate(loaded, start=1)
        ]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    header = [name.strip() for name in reader.fieldnames]
    if "prompt" not in header:
        raise InputFileError([f"{path}:1: the header row needs a 'prompt' column"])
    unknown = [name for name in header if name not in ALLOWED_FIELDS]
    if unknown:
        raise InputFileError(
            [
                f"{path}:1: {', '.join(unknown)}: unknown column; "
                f"allowed: {', '.join(ALLOWED_FIELDS)}"
            ]
        )
    rows = []
    for record in reader:
        values = list(record.values())
        # A quoted cell may span lines: the row is named by its first line, not its last.
        cells = [c for v in values for c in (v if isinstance(v, list) else [v]) if c is not None]
        number = reader.line_num - sum(cell.count("\n") for cell in cells)
        if None in record or any(isinstance(v, list) for v in values):
            rows.append((number, _Bad("more cells than the header has columns")))
            continue
        row: dict[str, Any] = {}
        for name, cell in zip(header, values, strict=True):
            if cell is None or not cell.strip():
                continue  # an empty cell leaves the field to the default
            row[name] = int(cell) if name in _INT_FIELDS and cell.strip().isdecimal() else cell
        if row:
            rows.append((number, row))
    return rows


@dataclass(frozen=True, slots=True)
class _Bad:
    """A row that could not even be parsed, with why."""

    reason: str


class _UnreadableJson(Exception):
    """JSON input that cannot be read: why, and its line when known."""

    def __init__(self, why: str, line: int | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.line = line


class _Object(dict[str, Any]):
    """A JSON object as read, with the keys it gave more than once (the last one won)."""

    __slots__ = ("repeated",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.repeated: list[str] = []
        if len(self) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.repeated.append(key)
                seen.add(key)


def _json(text: str) -> Any:
    """``text`` read as JSON, each object an :class:`_Object`. What Python's reader raises
    besides a syntax error is bad input too, said as such (it ended the command as an
    internal error, exit 70): nesting too deep for it (``[[[...`` 100,000 deep, a
    RecursionError) and an integer of more digits than it converts (a ValueError)."""
    try:
        return json.loads(text, object_pairs_hook=_Object)
    except json.JSONDecodeError as exc:
        raise _UnreadableJson(exc.msg, exc.lineno) from None
    except RecursionError:
        raise _UnreadableJson("nested too deeply") from None
    except ValueError:  # the one other ValueError: an integer past Python's digit limit
        digits = sys.get_int_max_str_digits()
        raise _UnreadableJson(f"an integer of more than {digits} digits") from None


def sniff_format(text: str) -> str:
    """The format of input with no file name (stdin): ``json`` for an array, ``jsonl`` for
    objects, else ``text``."""
    head = text.lstrip("\ufeff \t\r\n")[:1]
    return {"[": "json", "{": "jsonl"}.get(head, "text")


def read_requests(
    path: Path, defaults: dict[str, Any], *, text: str | None = None, kind: str | None = None
) -> list[BulkItem]:
    """Parse and validate every row of ``path`` before anything is sent.

    Args:
        path: the input file (its extension names the format), or how messages name ``text``.
        defaults: request fields of rows that do not say.
        text: the input itself, when it does not come from ``path`` (stdin).
        kind: the format (``text``, ``jsonl``, ``csv``, ``json``), else from the extension,
            or sniffed from ``text``.

    Raises:
        InputFileError: listing each bad row as ``file:line: field: rule`` (``usage`` is True
            when the file's extension is not one we read).
    """
    if text is not None:
        text = text.removeprefix("\ufeff")  # a byte order mark, as a file's is (utf-8-sig)
    if kind is None and text is not None:
        kind = sniff_format(text)
    kind = kind or FORMATS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(FORMATS))
        raise InputFileError(
            [
                f"{path}: unsupported input type {path.suffix or '(none)'!r}; use one of {known} "
                "(or --input-format)"
            ],
            usage=True,
        )
    if text is None:
        try:
            # A pipe is read whole, as stdin is (``bulk <(grep fox prompts.txt)``); a device
            # is not: /dev/zero would fill memory, a terminal would wait for typing.
            mode = path.stat().st_mode
            problem = None if stat.S_ISFIFO(mode) else not_regular(mode)
            if problem is not None:
                raise InputFileError([f"{path}: cannot read: {problem} (use - for stdin)"])
            data = path.read_bytes()
        except OSError as exc:
            raise InputFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        text = decode_input(path, data)
    items: list[BulkItem] = []
    problems: list[str] = []
    seen_ids: dict[str, int] = {}
    for number, raw in _raw_rows(path, kind, text):
        problem = _check_row(raw, defaults, number, seen_ids, items)
        if problem is not None:
            problems.append(f"{path}:{number}: {problem}")
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            problems.append(f"(stopping after {MAX_REPORTED_PROBLEMS} bad rows)")
            break
    if problems:
        raise InputFileError(problems)
    if not items:
        raise InputFileError([f"{path}: no prompts found"])
    return items


def _check_row(
    raw: Any,
    defaults: dict[str, Any],
    number: int,
    seen_ids: dict[str, int],
    items: list[BulkItem],
) -> str | None:
    """Append the row's item to ``items``, or return what is wrong with it."""
    if isinstance(raw, _Bad):
        return raw.reason
    if not isinstance(raw, dict):
        return "must be a JSON object with a prompt (or, in a .json array, a string)"
    repeated = getattr(raw, "repeated", None)
    if repeated:
        # JSON leaves a repeated key to the reader (Python's keeps the last): which prompt or
        # size was meant is not known, and the row would be sent as one of them, unsaid.
        names = ", ".join(dict.fromkeys(repeated))
        return f"{names}: given more than once in the row; give each field once"
    unknown = sorted(name for name in raw if name not in ALLOWED_FIELDS)
    if unknown:
        return f"{', '.join(unknown)}: unknown field; allowed: {', '.join(ALLOWED_FIELDS)}"
    fields = {**defaults, **raw}
    row_id = fields.pop("id", None)
    if row_id is not None:
        if isinstance(row_id, bool) or not isinstance(row_id, str | int) or str(row_id) == "":
            return "id: must be a non-empty string or integer"
        row_id = str(row_id)
        if row_id in seen_ids:
            return f"id: {row_id!r} is also the id of line {seen_ids[row_id]}; ids must be unique"
        seen_ids[row_id] = number
    try:
        request = GenerationRequest.build(fields)
    except InvalidRequestError as exc:
        return "; ".join(f"{name}: {rule}" for name, rule in exc.violations)
    items.append(BulkItem(number, request, row_id))
    return None
