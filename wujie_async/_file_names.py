"""File names for saved images: a template over the job key, image index, extension, the user's
row id and input line, never over prompts or URLs; every field sanitised, the result checked.
"""

from __future__ import annotations

import re
import string
from typing import Any

from ._errors import InvalidRequestError

_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # used with fullmatch: no trailing newline slips by
_NAME_FIELDS = frozenset({"key", "index", "ext", "id", "line"})
_JOB_FIELDS = frozenset({"key", "id", "line"})  # a name must tell jobs apart
# Path separators, C0 and C1 control characters and DEL never reach a file name.
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")
_MAX_NAME_BYTES = 255
DEFAULT_NAME = "{key}-{index}.{ext}"


def check_template(template: str) -> None:
    problems: list[str] = []
    used: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidRequestError([("name", f"not a valid template: {exc}")]) from None
    for literal, field, _spec, conversion in parsed:
        if _UNSAFE_NAME.search(literal):
            problems.append("no path separators or control characters outside the fields")
        if field is None:
            continue
        if field not in _NAME_FIELDS:
            problems.append(f"unknown field {{{field}}}; fields: {', '.join(sorted(_NAME_FIELDS))}")
        if conversion:
            problems.append(f"no conversions (!{conversion})")
        used.add(field)
    if template.startswith("."):
        problems.append("must not start with a dot (a hidden file)")
    if not used & _JOB_FIELDS:
        problems.append("must use {key}, {id} or {line}, or every job would get the same name")
    if problems:
        raise InvalidRequestError([("name", rule) for rule in problems])


def _clean_field(value: str) -> str:
    cleaned = _UNSAFE_NAME.sub("_", value).lstrip(".")
    return cleaned or "_"


def render_name(
    template: str, *, key: str, index: int, ext: str, id: str | None, line: int | None
) -> str:
    """A file name from ``template``; every field is sanitised, the result checked.

    Raises:
        InvalidRequestError: a field the template uses is missing, or the name is unusable.
    """
    values: dict[str, Any] = {"key": key, "index": index, "ext": ext}
    missing: list[tuple[str, str]] = []
    for name, value in (("id", id), ("line", line)):
        if value is not None:
            values[name] = _clean_field(str(value)) if name == "id" else value
        elif "{" + name in template:
            missing.append(("name", f"the template uses {{{name}}} but this image has none"))
    if missing:
        raise InvalidRequestError(missing)
    try:
        name = template.format_map(values)
    except (ValueError, KeyError, IndexError) as exc:
        raise InvalidRequestError([("name", f"cannot fill the template: {exc}")]) from None
    if (
        _UNSAFE_NAME.search(name)
        or name.startswith(".")
        or name in {"", ".", ".."}
        or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES
    ):
        raise InvalidRequestError([("name", f"{name[:80]!r} is not a usable file name")])
    return name


def check_key(key: str) -> None:
    if not _KEY_RE.fullmatch(key):
        raise InvalidRequestError(
            [("key", "not a plain job key ([A-Za-z0-9_-], 1 to 128); refusing it in a file name")]
        )
