"""Pydantic models of what crosses the wire, and the results handed to users.

Request models check the per-model rules of API.md (see ``_rules``) before anything is sent.
Reply models ignore unknown fields, since the gateway may add fields at any time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from . import _contract, _rules
from ._errors import InvalidRequestError


def unencodable(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field, rule)`` for each text in ``fields`` (or item of a list of texts) that is not
    encodable as UTF-8 (a lone surrogate such as ``"\\ud800"``): it could not be sent."""
    found: list[tuple[str, str]] = []
    for name, value in fields.items():
        if isinstance(value, str):
            if not _utf8(value):
                found.append((name, _NOT_UTF8))
        elif isinstance(value, list | tuple):
            found.extend(
                (f"{name}[{index}]", _NOT_UTF8)
                for index, item in enumerate(value)
                if isinstance(item, str) and not _utf8(item)
            )
    return found


_NOT_UTF8 = "must be text encodable as UTF-8 (no lone surrogates such as '\\ud800')"


def _utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _location(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the rules name fields: ``image[1]``, not ``image.1``."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return text.removeprefix(".") or "body"


class _Request(BaseModel):
    # strict: a value of the wrong type is refused, never converted ("3", 2.0 or True for an
    # int; bytes for a str), so what is sent is what the caller wrote.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str
    model: str
    n: int | None = None
    output_compression: int | None = None
    quality: str | None = None
    size: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    style: str | None = None

    kind: ClassVar[_rules.RequestKind] = "generation"
    # Each field's exact type, for the fast path of ``checked_body`` (list: a list of str).
    _plain_types: ClassVar[dict[str, type]] = {
        "prompt": str,
        "model": str,
        "n": int,
        "output_compression": int,
        "quality": str,
        "size": str,
        "background": str,
        "moderation": str,
        "output_format": str,
        "style": str,
    }
    _required: ClassVar[tuple[str, ...]] = ("prompt", "model")

    def body(self) -> dict[str, Any]:
        """The JSON body: only the fields the user set."""
        return self.model_dump(exclude_none=True)

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Self:
        """Validate ``fields`` (types, then the per-model rules) and build the request.

        Raises:
            InvalidRequestError: naming every field that breaks a rule, and the rule.
        """
        try:
            request = cls.model_validate(fields)
        except ValidationError as exc:
            # A field this client does not know comes first: a misspelt one ("promt") is what
            # the user must fix, and the required field it leaves missing follows from it.
            errors = sorted(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")
            found = [(_location(err["loc"]), err["msg"]) for err in errors]
            named = {field for field, _ in found}
            # Text that could not be sent is named too, so one error lists every bad field.
            found += [(f, rule) for f, rule in unencodable(fields) if f not in named]
            raise InvalidRequestError(found) from None
        # The field values as validated (None for unset): no need to dump the model for this.
        found = unencodable(request.__dict__) + _rules.violations(cls.kind, request.__dict__)
        if found:
            raise InvalidRequestError(found)
        return request

    @classmethod
    def checked_body(cls, fields: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """``(body, n)`` of ``build(fields)``: the JSON body and the image count.

        The hot path of every submit. When every value already has its field's exact type
        (``str``, ``int``, a list of ``str``; None for an optional field), validating with
        pydantic would hand the same values back, so it is skipped: the UTF-8 check and the
        per-model rules still run, as in :meth:`build`. Anything else (a str subclass, a bool
        for an int, an unknown field, a missing one) goes through :meth:`build`, which converts
        (a str subclass to str, a tuple of images to a list) or names the error.

        Raises:
            InvalidRequestError: naming every field that breaks a rule, and the rule.
        """
        body = cls._plain_body(fields)
        if body is None:
            request = cls.build(fields)
            return request.body(), request.n
        found = unencodable(fields) + _rules.violations(cls.kind, fields)
        if found:
            raise InvalidRequestError(found)
        return body, fields.get("n")

    @classmethod
    def _plain_body(cls, fields: dict[str, Any]) -> dict[str, Any] | None:
        """The body ``model_dump`` would give when pydantic would accept ``fields`` unchanged
        (see ``checked_body``), else None. One pass that checks each type as it builds the
        body: field order and copies as ``model_dump`` gives them (declared order, fresh
        lists, no None)."""
        types = cls._plain_types
        for name in fields:
            if name not in types:
                return None  # unknown field: build() names it
        body: dict[str, Any] = {}
        for name, wanted in types.items():
            value = fields.get(name)
            if value is None:
                continue
            if wanted is list:
                if type(value) is not list or any(type(item) is not str for item in value):
                    return None
                value = list(value)
            elif type(value) is not wanted:
                return None
            body[name] = value
        for name in cls._required:
            if name not in body:
                return None  # missing (or None): build() names it
        return body


class GenerationRequest(_Request):
    """A body for ``POST /ai/wj/images/generations``."""


class EditRequest(_Request):
    """A body for ``POST /ai/wj/images/edits``: a generation plus source images and a mask."""

    image: list[str]
    mask: str | None = None

    @field_validator("image", mode="before")
    @classmethod
    def _images_as_list(cls, value: Any) -> Any:
        # A tuple of texts is the same images: taken as a list (its items are still strict).
        return list(value) if isinstance(value, tuple) else value

    kind: ClassVar[_rules.RequestKind] = "edit"
    _plain_types: ClassVar[dict[str, type]] = {
        **_Request._plain_types,
        "image": list,
        "mask": str,
    }
    _required: ClassVar[tuple[str, ...]] = ("prompt", "model", "image")


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Envelope(_Reply):
    """Every JSON reply: ``{"code", "message", "data"}``."""

    code: str
    message: str = ""
    data: Any = None

    @field_validator("code", mode="before")
    @classmethod
    def _code_as_text(cls, value: Any) -> Any:
        # A gateway that sends the code as a number still means the same code.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("message", mode="before")
    @classmethod
    def _message_as_text(cls, value: Any) -> str:
        # The message only words the code: a null one (a serializer that writes every unset
        # field), or a number or an object, must not make a refusal "not an envelope", which
        # a submit reads as "may have been accepted" (uncertain, never resent).
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        try:
            return json.dumps(value, ensure_ascii=False, default=str)[:1000]
        except RecursionError:
            # Nested about as deep as the reply's reader followed: quoting it, a few frames
            # deeper, ran out of stack (a bare RecursionError where a typed refusal is due).
            return "(a message nested too deep to quote)"


class ImageInfo(_Reply):
    """One image in a batch-detail entry."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


# Beyond a day, an estimate of seconds left says nothing a day would not.
MAX_EXPECTED_SECONDS = 86_400.0
# Fail codes are short numbers; a longer one is noise (and int() of >4,300 digits raises).
_MAX_CODE_DIGITS = 18
_MAX_QUEUE_POSITION = 10**9
_MAX_POINTS = 1e12
_MAX_TIME_TEXT = 64


def _number(value: Any) -> float | None:
    """A finite real number from a JSON number (or numeric text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return float(value) if -1e18 < value < 1e18 else None
    if isinstance(value, str) and len(value) <= 32:
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _clamped(value: Any, low: float, high: float) -> Any:
    number = _number(value)
    if number is None:
        return None
    if low <= number <= high:
        return value if isinstance(value, float) else number  # the same object when fine
    return min(max(number, low), high)


def _expected_seconds(value: Any) -> Any:
    return _clamped(value, 0.0, MAX_EXPECTED_SECONDS)


def _percent(value: Any) -> Any:
    return _clamped(value, 0.0, 100.0)


def _queue_position(value: Any) -> Any:
    number = _number(value)
    if number is None or not 0 <= number <= _MAX_QUEUE_POSITION or number != int(number):
        return None
    return value if type(value) is int else int(number)


def _points(value: Any) -> Any:
    number = _number(value)
    if number is None or not 0 <= number <= _MAX_POINTS:
        return None
    return value if isinstance(value, float) else number


def _time_stamp(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _MAX_TIME_TEXT and value.isprintable() else None
    number = _number(value)
    return None if number is None else value if isinstance(value, int | float) else number


def _fail_code(value: Any) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if abs(value) < 10**_MAX_CODE_DIGITS else None
    if isinstance(value, str):
        # ASCII digits only: "²".isdigit() is True, yet int("²") raises.
        text = value.strip()
        digits = text.removeprefix("-")
        if digits.isascii() and digits.isdigit() and len(digits) <= _MAX_CODE_DIGITS:
            return int(text)
    return None


def _text(value: Any) -> Any:
    return value if isinstance(value, str) else None


def _fail(value: Any) -> Any:
    if isinstance(value, dict):
        return _with_fields_cleaned(value, _FAIL_CLEANERS)
    return value if isinstance(value, str) else None


def _with_fields_cleaned(data: Any, cleaners: dict[str, Any]) -> Any:
    """``data`` with each optional field that is unreadable replaced by None (or clamped).

    The input is copied only when something changes (and returned as is otherwise).
    """
    if not isinstance(data, dict):
        return data
    fixed: dict[str, Any] | None = None
    for name, clean in cleaners.items():
        if name in data:
            value = data[name]
            cleaned = clean(value)
            if cleaned is not value:
                if fixed is None:
                    fixed = dict(data)
                fixed[name] = cleaned
    return data if fixed is None else fixed


_FAIL_CLEANERS = {"fail_code": _fail_code, "fail_message": _text}
# The largest and smallest status a gateway could mean; anything outside is a malformed entry.
_STATUS_BOUND = 2**31


def _no_bool(value: Any) -> Any:
    # Lax pydantic reads JSON true as 1: a status of true would be "generating" for ever.
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


_NotBool = BeforeValidator(_no_bool)


def _at_most_a_jobs_images(value: Any) -> Any:
    # No job makes more than MAX_IMAGES_PER_JOB images: the rest of a longer list is not read
    # (a reply of a few MB can list millions of empty placeholders, each a model to build).
    if isinstance(value, list) and len(value) > _contract.MAX_IMAGES_PER_JOB:
        return value[: _contract.MAX_IMAGES_PER_JOB]
    return value


_ImageList = Annotated[list[ImageInfo] | None, BeforeValidator(_at_most_a_jobs_images)]
# allow_inf_nan on the float member only: on a union it would also run on text, and raise.
_FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# Short text with no control characters (C0, DEL, C1): it may end up in a log or a terminal.
_TimeText = Annotated[str, Field(max_length=_MAX_TIME_TEXT, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")]


class FailInfo(_Reply):
    """Why a job failed."""

    fail_code: Annotated[int | None, _NotBool] = Field(
        default=None, gt=-(10**_MAX_CODE_DIGITS), lt=10**_MAX_CODE_DIGITS
    )
    fail_message: str | None = None


class JobInfo(_Reply):
    """One entry of a batch-detail reply's ``list``.

    The model is strict about every number: NaN, Infinity and out-of-range values are rejected
    (``allow_inf_nan=False``, bounds), so nothing non-finite can reach the poll schedule. Use
    :meth:`read` for a hostile entry: it keeps an entry whose key and status are sound even when
    an optional field is not, dropping that field (None) or clamping it.
    """

    key: str
    status: Annotated[int, _NotBool] = Field(ge=-_STATUS_BOUND, le=_STATUS_BOUND)
    complete_percent: Annotated[float | None, _NotBool] = Field(
        default=None, ge=0, le=100, allow_inf_nan=False
    )
    expected_seconds: Annotated[float | None, _NotBool] = Field(
        default=None, ge=0, le=MAX_EXPECTED_SECONDS, allow_inf_nan=False
    )
    images: _ImageList = None  # the first MAX_IMAGES_PER_JOB only
    fail_message: FailInfo | str | None = None
    # [platform] optional progress fields (API.md): read when present, never required.
    queue_before_num: Annotated[int | None, _NotBool] = Field(
        default=None, ge=0, le=_MAX_QUEUE_POSITION
    )
    start_gen_time: Annotated[_FiniteFloat | _TimeText | None, _NotBool] = None
    complete_time: Annotated[_FiniteFloat | _TimeText | None, _NotBool] = None
    integral_cost: Annotated[float | None, _NotBool] = Field(
        default=None, ge=0, le=_MAX_POINTS, allow_inf_nan=False
    )

    @classmethod
    def read(cls, raw: Any) -> JobInfo:
        """Validate a hostile entry; optional fields that break a rule are dropped or clamped.

        ``expected_seconds`` is clamped to 0 to a day and ``complete_percent`` to 0 to 100; any
        other unreadable optional field (NaN, text for a number, a 5,000-digit fail code, a
        wrong type, an image's ``url``, ``b64_json`` or ``revised_prompt`` that is not text)
        becomes None. Only a bad key, status or image list (not a list of objects) fails the
        entry.

        Raises:
            ValidationError: the key, status or images are unreadable.
        """
        try:
            return cls.model_validate(raw)
        except ValidationError:
            cleaned = _with_fields_cleaned(raw, _ENTRY_CLEANERS)
            if cleaned is raw:
                raise
            return cls.model_validate(cleaned)

    @property
    def terminal(self) -> bool:
        """True for the statuses that end a job (3, 4, 5 and -1)."""
        return self.status in _contract.TERMINAL_STATUSES


_IMAGE_CLEANERS = {"url": _text, "b64_json": _text, "revised_prompt": _text}


def _images(value: Any) -> Any:
    """An image list whose images' unreadable fields (not text) are None: a number for
    ``revised_prompt`` must not cost the job an image it paid for. An image that is not an
    object still fails the entry (the model says so)."""
    if not isinstance(value, list):
        return value
    cleaned = [_with_fields_cleaned(image, _IMAGE_CLEANERS) for image in value]
    return value if all(new is old for new, old in zip(cleaned, value, strict=True)) else cleaned


_ENTRY_CLEANERS = {
    "images": _images,
    "complete_percent": _percent,
    "expected_seconds": _expected_seconds,
    "fail_message": _fail,
    "queue_before_num": _queue_position,
    "start_gen_time": _time_stamp,
    "complete_time": _time_stamp,
    "integral_cost": _points,
}
