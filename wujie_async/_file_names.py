"""File names for saved images: a template over the job key, image index, extension, the user's
row id and input line, never over prompts or URLs; every field sanitised, the result checked.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidRequestError

_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # used with fullmatch: no trailing newline slips by
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9_-]")
_NAME_FIELDS = frozenset({"key", "index", "ext", "id", "line"})
_JOB_FIELDS = frozenset({"key", "id", "line"})  # a name must tell jobs apart
# A format spec may pad a number ({index:03d}), nothing more: "{key:.4}" would cut keys short
# and let two jobs share a name (one job's files overwritten by another's).
_NUMBER_FIELDS = frozenset({"index", "line"})
_PADDING_SPEC = re.compile(r"0?[1-9][0-9]?d?|d")
# Path separators, C0 and C1 control characters and DEL never reach a file name.
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")
_MAX_NAME_BYTES = 255
DEFAULT_NAME = "{key}-{index}.{ext}"
EXT_FIELD = "{ext}"  # in a download's file name: the image's format, once its bytes are seen
# Device names that Windows (and so a share or a synced folder) refuses as a file's stem.
_RESERVED_STEMS = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{kind}{n}" for kind in ("com", "lpt") for n in range(1, 10)}
)
# What checks stand in for before a job exists: a key as long as the gateway's (32 hex digits)
# and the longest extension an image can get.
_KEY_STAND_IN_LENGTH = 32
_LONGEST_EXT = "webp"


def check_template(template: str) -> None:
    problems: list[str] = []
    used: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidRequestError([("name", f"not a valid template: {exc}")]) from None
    for literal, field, spec, conversion in parsed:
        if _UNSAFE_NAME.search(literal):
            problems.append("no path separators or control characters outside the fields")
        if field is None:
            continue
        if field not in _NAME_FIELDS:
            problems.append(f"unknown field {{{field}}}; fields: {', '.join(sorted(_NAME_FIELDS))}")
        if conversion:
            problems.append(f"no conversions (!{conversion})")
        if spec and not (field in _NUMBER_FIELDS and _PADDING_SPEC.fullmatch(spec)):
            problems.append(
                f"no format spec {{{field}:{spec}}}: only a width on {{index}} or {{line}} "
                "(such as {index:03d}); a spec that cuts a key could give two jobs one name"
            )
        used.add(field)
    if template.startswith("."):
        problems.append("must not start with a dot (a hidden file)")
    if not used & _JOB_FIELDS:
        problems.append("must use {key}, {id} or {line}, or every job would get the same name")
    if problems:
        raise InvalidRequestError([("name", rule) for rule in problems])


def _clean_field(value: str) -> str:
    # No leading dot (a hidden file) and no leading dash (``rm *`` would read the name as
    # an option: made ``_``, so that ids ``-a`` and ``a`` keep names of their own).
    cleaned = _UNSAFE_NAME.sub("_", value).lstrip(".")
    if cleaned.startswith("-"):
        cleaned = "_" + cleaned[1:]
    return cleaned or "_"


def render_name(
    template: str, *, key: str, index: int, ext: str, id: str | None, line: int | None
) -> str:
    """A file name from ``template``; every field is sanitised, the result checked.

    Raises:
        InvalidRequestError: a field the template uses is missing, or the name is unusable.
    """
    values: dict[str, Any] = {"key": key_in_name(key), "index": index, "ext": ext}
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
    problem = unusable(name)
    if problem is not None:
        raise InvalidRequestError([("name", f"{name[:80]!r} is not a usable file name: {problem}")])
    return name


def unusable(name: str) -> str | None:
    """Why ``name`` cannot be a file name here (or on a share), or None if it can."""
    if name in {"", ".", ".."} or name.startswith("."):
        return "empty, a dot name or hidden"
    if _UNSAFE_NAME.search(name):
        return "a path separator or a control character"
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        return f"longer than {_MAX_NAME_BYTES} bytes"
    if name.split(".", 1)[0].rstrip(" ").casefold() in _RESERVED_STEMS:
        return "a reserved device name (CON, NUL, COM1, ...)"
    if name.endswith((" ", ".")):
        return "ends in a space or a dot"
    return None


@dataclass(frozen=True, slots=True)
class PlannedJob:
    """One job whose file names are checked before it is sent.

    Attributes:
        label: how messages name it (``line 3 (id a/b)``).
        images: how many images it makes.
        id: the row's id, for ``{id}``.
        line: the input line, for ``{line}``.
    """

    label: str
    images: int
    id: str | None = None
    line: int | None = None


def check_planned_names(
    template: str, jobs: Iterable[PlannedJob], *, taken: Iterable[str] = ()
) -> None:
    """Refuse, before anything is sent (and paid for), names that could not be saved.

    Every image of every job gets its name with a stand-in key: each must be usable, no two
    may be the same (compared without case: many file systems ignore it), and none may be one
    of ``taken`` (e.g. the manifest's own name). Jobs tell apart by their key, so a template
    with ``{key}`` never collides across jobs.

    Raises:
        InvalidRequestError: one violation per problem (at most 20), each naming the jobs.
    """
    check_template(template)
    uses_key = "{key" in template
    owners: dict[str, tuple[str, int]] = {name.casefold(): ("the run's own", -1) for name in taken}
    problems: list[tuple[str, str]] = []
    for number, job in enumerate(jobs):
        # A stand-in as long as a real key, and different per job: real keys differ.
        key = f"{number:0{_KEY_STAND_IN_LENGTH}d}" if uses_key else "K" * _KEY_STAND_IN_LENGTH
        for index in range(job.images):
            values = {"key": key, "index": index, "ext": _LONGEST_EXT, "line": job.line}
            values["id"] = None if job.id is None else _clean_field(job.id)
            try:
                name = template.format_map(values)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                problems.append(("name", f"{job.label}: cannot fill the template: {exc}"))
                break
            problem = unusable(name)
            if problem is not None:
                problems.append(("name", f"{job.label}: {name[:60]!r} is not usable: {problem}"))
                break
            other, other_index = owners.setdefault(name.casefold(), (job.label, index))
            if (other, other_index) != (job.label, index):
                what = (
                    f"its images {other_index} and {index}"
                    if other == job.label
                    else f"it and {other}{' file' if other_index < 0 else ''}"
                )
                shown = template.format_map({**values, "ext": "{ext}"})
                problems.append(("name", f"{job.label}: {what} would both be saved as {shown!r}"))
                break
        if len(problems) >= 20:
            break
    if problems:
        raise InvalidRequestError(problems)


def key_in_name(key: str) -> str:
    """A job key as a file name holds it: the key itself when plain ([A-Za-z0-9_-], 1 to 128
    characters), as the gateway's keys are. The contract does not promise that, and a paid
    job must be saved whatever its key: any other key (a ``/``, a ``%``, CJK, a path like
    ``../x``) gives its first 64 characters with every other character made ``_``, then ``~``
    and a digest of the whole key, so that two keys never share a name (the ``~``, which no
    plain key holds, keeps a plain key from spelling another key's safe name). A key
    starting with ``-`` is not plain either: a file name starting with a dash is read as an
    option by a shell command given a glob (``rm *``)."""
    if _KEY_RE.fullmatch(key) and key[0] != "-":
        return key
    plain = _NOT_PLAIN.sub("_", key[:64])
    if plain.startswith("-"):
        plain = "_" + plain[1:]
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{plain}~{digest}"
