"""What crosses the wire: pydantic models of requests and of the reply envelope, and the
hand-written reader of batch-detail entries (``JobInfo.read``).

Request models check the per-model rules of API.md (see ``_rules``) before anything is sent.
Replies ignore unknown fields, since the gateway may add fields at any time. A batch-detail
entry is read field by field by plain code rather than a model: it is the hottest path of
polling (see the section below).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
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


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """Server text with each lone surrogate made U+FFFD (the replacement character).

    JSON may escape half of a surrogate pair (``"\\ud800"``), which Python reads as a string
    that no UTF-8 writer takes: an error message quoting it raised UnicodeEncodeError where it
    was printed, logged or written to a manifest (a bulk run's manifest writer died on it).
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


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
        (a str subclass to str, a tuple of images to a list) or names the error. The common
        generation request (prompt, model, n, quality, size; a known model) is first checked
        in one pass (``_common_generation_body``), which only ever accepts: what it does not
        take goes this way.

        Raises:
            InvalidRequestError: naming every field that breaks a rule, and the rule.
        """
        if cls.kind == "generation":
            body = _common_generation_body(fields)
            if body is not None:
                return body, fields.get("n")
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


# The fields of the common generation request, which ``checked_body`` checks in one pass.
_COMMON_FIELDS = frozenset({"prompt", "model", "n", "quality", "size"})


def _common_generation_body(fields: dict[str, Any]) -> dict[str, Any] | None:
    """The body of a common generation request that breaks no rule, else None.

    The submit path's fast path: fields among prompt, model, n, quality and size, each of its
    exact type, a model of ``_rules.MODEL_RULES``. For such a request, this checks what
    ``unencodable`` and ``_rules.violations`` check (prompt not blank, text UTF-8, n from 1 to
    the model's bound, quality and size the model's), in a few tests rather than a few dozen
    calls. It only accepts: a request it does not take, valid or not, goes the full way,
    which names every error as before (tests/test_rules.py holds the two paths together).
    """
    if not fields.keys() <= _COMMON_FIELDS:
        return None
    prompt = fields.get("prompt")
    model = fields.get("model")
    if type(prompt) is not str or type(model) is not str:
        return None
    rules = _rules.MODEL_RULES.get(model)  # a known model's name is ASCII: nothing to encode
    if rules is None or not prompt.strip() or not _utf8(prompt):
        return None
    body: dict[str, Any] = {"prompt": prompt, "model": model}  # model_dump's order
    n = fields.get("n")
    if n is not None:
        if type(n) is not int or not 1 <= n <= min(rules.max_n, _contract.MAX_IMAGES_PER_JOB):
            return None
        body["n"] = n
    quality = fields.get("quality")
    if quality is not None:
        if type(quality) is not str or quality not in rules.qualities:
            return None
        body["quality"] = quality
    size = fields.get("size")
    if size is not None:
        if type(size) is not str or size not in rules.sizes:
            return None
        body["size"] = size
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
        if isinstance(value, str):
            return encodable(value)
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
            return encodable(value)
        try:
            return encodable(json.dumps(value, ensure_ascii=False, default=str)[:1000])
        except RecursionError:
            # Nested about as deep as the reply's reader followed: quoting it, a few frames
            # deeper, ran out of stack (a bare RecursionError where a typed refusal is due).
            return "(a message nested too deep to quote)"


# --- batch-detail entries ---------------------------------------------------------------------
# Not pydantic: a reply lists up to 50 entries per call and a job is reported a few times, so
# reading an entry is the client's hottest path. A model cost about 30,000 instructions and
# left about 4 objects for the garbage collector per entry (3 more per image); this reader,
# a plain slotted object and one reader per field (a type() test takes the common value, the
# field's function the unusual one), about half the instructions and one object (one more per
# image). Its rules are tested in tests/test_poller_hostile.py.

# Beyond a day, an estimate of seconds left says nothing a day would not.
MAX_EXPECTED_SECONDS = 86_400.0
# Fail codes are short numbers; a longer one is noise (and int() of >4,300 digits raises).
_MAX_CODE_DIGITS = 18
_MAX_CODE = 10**_MAX_CODE_DIGITS
_MAX_QUEUE_POSITION = 10**9
_MAX_POINTS = 1e12
_MAX_WHOLE_POINTS = 10**12
_MAX_WHOLE_SECONDS = 86_400
_MAX_TIME_TEXT = 64
# The largest and smallest status a gateway could mean; anything outside is a malformed entry.
_STATUS_BOUND = 2**31
# Numeric text longer than this is not a number a gateway means (and costs a parse to find out).
_MAX_NUMBER_TEXT = 32


_new = object.__new__


class EntryError(ValueError):
    """A batch-detail entry that cannot be read: no object, or its key, status or images.

    The message names the field and the rule (``"status: must be a whole number ..."``) and
    never quotes the value: the entry is hostile input, and the message may be logged.

    Attributes:
        field: the field at fault (``"entry"`` for an entry that is not an object).
        rule: what the field must be.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def _number(value: Any) -> float | None:
    """A finite real number from a JSON number (or numeric text), else None."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int:
        return float(value) if -1e18 < value < 1e18 else None
    if kind is bool:
        return None
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value) if -1e18 < value < 1e18 else None
    # ASCII text without underscores, as the whole numbers read it: float() also takes "1_0"
    # and digits of other scripts ("\u0664"), which no JSON writer makes of a number.
    if isinstance(value, str) and len(value) <= _MAX_NUMBER_TEXT and value.isascii():
        if "_" in value:
            return None
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _whole_text(value: str, digits: int) -> int | None:
    """The whole number of a text (``"4"``, ``" -1 "``, ``"+4"``, ``"4.0"``) of at most
    ``digits`` ASCII digits, else None (``"4.5"``, ``"0x4"``, ``"\u0664"``, ``"4_0"``)."""
    if len(value) > _MAX_NUMBER_TEXT:
        return None
    whole, dot, fraction = value.strip().partition(".")
    if dot and fraction.strip("0"):
        return None
    unsigned = whole[1:] if whole[:1] in ("+", "-") else whole
    # ASCII digits only: "²".isdigit() is True, yet int("²") raises.
    if not (unsigned.isascii() and unsigned.isdigit()) or len(unsigned) > digits:
        return None
    return int(whole)


def _whole(value: Any, bound: int, digits: int) -> int | None:
    """A whole number from -``bound`` to ``bound`` from a JSON number or numeric text (a float
    only with no fraction, never a boolean), else None."""
    kind = type(value)
    if kind is int:
        return value if -bound <= value <= bound else None
    if kind is bool:
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None
        number = int(value)
    elif isinstance(value, int):
        number = int(value)
    elif isinstance(value, str):
        whole = _whole_text(value, digits)
        if whole is None:
            return None
        number = whole
    else:
        return None
    return number if -bound <= number <= bound else None


def _clamped(value: Any, low: float, high: float) -> float | None:
    if type(value) is float and low <= value <= high:
        return value  # the common case: the same object
    number = _number(value)
    if number is None:
        return None
    return min(max(number, low), high)


def _expected_seconds(value: Any) -> float | None:
    """Seconds left: a number, at most a day; a negative one (``-1`` is how gateways often say
    they have no estimate) or anything else is None. (Read as 0, it said "about 0 s left" of
    a job just queued, and told the schedule the job was ending now.)"""
    number = None if value is None else _number(value)
    return None if number is None or number < 0 else min(number, MAX_EXPECTED_SECONDS)


def _percent(value: Any) -> float | None:
    """``complete_percent``: a number, clamped to 0 to 100; anything else is None."""
    return None if value is None else _clamped(value, 0.0, 100.0)


def _queue_position(value: Any) -> int | None:
    """Jobs ahead in the queue: a whole number, 0 to a billion; anything else is None."""
    if value is None:
        return None
    number = _whole(value, _MAX_QUEUE_POSITION, 10)
    return None if number is None or number < 0 else number


def _points(value: Any) -> float | None:
    """Points charged: a number, 0 to 10**12; anything else is None."""
    if value is None:
        return None
    number = _number(value)
    return number if number is not None and 0 <= number <= _MAX_POINTS else None


def _time_stamp(value: Any) -> float | str | None:
    """A time: a finite number, or short text with nothing a terminal would act on (no control
    or format characters such as an escape or a right-to-left override); else None."""
    if type(value) is float:
        return value if -1e18 < value < 1e18 else None
    if value is None:
        return None
    if isinstance(value, str):
        text = str(value)
        return text if len(text) <= _MAX_TIME_TEXT and text.isprintable() else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # a number in text is text: the gateway wrote a time, not a number
    number = _number(value)
    return number if number is not None and -1e18 < number < 1e18 else None


def _fail_code(value: Any) -> int | None:
    """A fail code: a whole number of at most 18 digits (or its text); else None."""
    if value is None:
        return None
    return _whole(value, _MAX_CODE - 1, _MAX_CODE_DIGITS)


def _text(value: Any) -> str | None:
    """Text as it can be printed (see ``encodable``); anything else is None."""
    if value is None:
        return None
    return encodable(str(value)) if isinstance(value, str) else None


class FailInfo:
    """Why a job failed: ``fail_message`` as an object."""

    __slots__ = ("fail_code", "fail_message")

    def __init__(self, fail_code: int | None = None, fail_message: str | None = None) -> None:
        self.fail_code = fail_code
        self.fail_message = fail_message

    def __repr__(self) -> str:
        return f"FailInfo(fail_code={self.fail_code!r}, fail_message={self.fail_message!r})"


def _fail(value: Any) -> FailInfo | str | None:
    """``fail_message``: text, or an object of a code and a text (each dropped when
    unreadable); anything else is None."""
    if value is None:
        return None
    if isinstance(value, dict):
        get = value.get
        fail = _new(FailInfo)
        fail.fail_code = _fail_code(get("fail_code"))
        fail.fail_message = _text(get("fail_message"))
        return fail
    return _text(value)


class ImageInfo:
    """One image in a batch-detail entry (a field that is not text is None)."""

    __slots__ = ("b64_json", "revised_prompt", "url")

    def __init__(
        self,
        url: str | None = None,
        b64_json: str | None = None,
        revised_prompt: str | None = None,
    ) -> None:
        self.url = url
        self.b64_json = b64_json
        self.revised_prompt = revised_prompt

    def __repr__(self) -> str:
        # A b64_json is megabytes: its length says enough.
        inline = None if self.b64_json is None else f"<{len(self.b64_json)} chars>"
        return (
            f"ImageInfo(url={self.url!r}, b64_json={inline}, "
            f"revised_prompt={self.revised_prompt!r})"
        )


_IMAGES_RULE = "must be a list of objects or nulls (or null)"


def _images(value: Any) -> tuple[ImageInfo, ...] | None:
    """``images``: its first MAX_IMAGES_PER_JOB objects, each field that is not text None (a
    number for ``revised_prompt`` must not cost the job an image it paid for); a null item is
    an image not made yet, read as a placeholder (neither ``url`` nor ``b64_json``), and an
    empty object is an empty list.

    No job makes more than MAX_IMAGES_PER_JOB images: the rest of a longer list is not read (a
    reply of a few MB can list millions of empty placeholders).

    Raises:
        EntryError: not a list, or an image in its first MAX_IMAGES_PER_JOB is neither an
            object nor null.
    """
    if value is None:
        return None
    if type(value) is not list and not isinstance(value, list | tuple):
        if isinstance(value, dict) and not value:
            # An empty list as Lua's cjson (an OpenResty gateway) writes an empty table: read
            # as malformed, it hid a running job's status, and the paid job ended with
            # JobProtocolError once that lasted the unknown-key grace.
            return ()
        raise EntryError("images", _IMAGES_RULE)
    images: list[ImageInfo] = []
    new = _new
    for image in value[: _contract.MAX_IMAGES_PER_JOB]:
        if type(image) is not dict and not isinstance(image, dict):
            if image is None:
                # JSON's null for an image not made yet (a job of n > 1 that finished a later
                # image first): no image at this index, as a placeholder says. Read as a
                # malformed entry, it hid the job's status, and the paid job ended with
                # JobProtocolError once that lasted the unknown-key grace.
                images.append(ImageInfo())
                continue
            raise EntryError(f"images[{len(images)}]", "must be an object or null")
        get = image.get
        url, b64, revised = get("url"), get("b64_json"), get("revised_prompt")
        # Built without a call of __init__ (a frame per image), as JobInfo.read builds entries.
        info = new(ImageInfo)
        # ASCII text (the common value) as it is; other text is made encodable (``_text``).
        info.url = url if url is None or (type(url) is str and url.isascii()) else _text(url)
        info.b64_json = b64 if b64 is None or (type(b64) is str and b64.isascii()) else _text(b64)
        info.revised_prompt = (
            revised
            if revised is None or (type(revised) is str and revised.isascii())
            else _text(revised)
        )
        images.append(info)
    return tuple(images)


_MISSING: Any = object()


def _status(value: Any) -> int:
    """``status``: a whole number from -2**31 to 2**31 (or its text).

    Raises:
        EntryError: missing, a boolean (lax reading took JSON true for 1: a status of true
            would be "generating" for ever), or anything else.
    """
    if type(value) is int and -_STATUS_BOUND <= value <= _STATUS_BOUND:
        return value
    if value is _MISSING:
        raise EntryError("status", "required")
    if isinstance(value, bool):
        raise EntryError("status", "must be a number, not a boolean")
    status = _whole(value, _STATUS_BOUND, 10)
    if status is None:
        raise EntryError("status", "must be a whole number from -2**31 to 2**31")
    return status


class JobInfo:
    """One entry of a batch-detail reply's ``list``, as :meth:`read` reads it.

    Every number is finite and within its bounds, so nothing non-finite or absurd reaches the
    poll schedule: ``expected_seconds`` (at most a day; a negative one is no estimate) and
    ``complete_percent`` (0 to 100) are clamped, and any other optional field that is
    unreadable is None. ``images`` holds the first MAX_IMAGES_PER_JOB images listed.
    """

    __slots__ = (
        "complete_percent",
        "complete_time",
        "expected_seconds",
        "fail_message",
        "images",
        "integral_cost",
        "key",
        "queue_before_num",
        "start_gen_time",
        "status",
    )

    def __init__(
        self,
        key: str,
        status: int,
        complete_percent: float | None = None,
        expected_seconds: float | None = None,
        images: tuple[ImageInfo, ...] | None = None,
        fail_message: FailInfo | str | None = None,
        # [platform] optional progress fields (API.md): read when present, never required.
        queue_before_num: int | None = None,
        start_gen_time: float | str | None = None,
        complete_time: float | str | None = None,
        integral_cost: float | None = None,
    ) -> None:
        self.key = key
        self.status = status
        self.complete_percent = complete_percent
        self.expected_seconds = expected_seconds
        self.images = images
        self.fail_message = fail_message
        self.queue_before_num = queue_before_num
        self.start_gen_time = start_gen_time
        self.complete_time = complete_time
        self.integral_cost = integral_cost

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"JobInfo({fields})"

    @classmethod
    def read(cls, raw: Any) -> JobInfo:
        """Read a hostile entry; optional fields that break a rule are dropped or clamped.

        ``expected_seconds`` is clamped to a day (a negative one is None: no estimate) and
        ``complete_percent`` to 0 to 100; any
        other unreadable optional field (NaN, text for a number, a 5,000-digit fail code, a
        boolean for a number, a wrong type, a time text with control characters, an image's
        ``url``, ``b64_json`` or ``revised_prompt`` that is not text) becomes None; a null
        image is a placeholder (an image not made yet). Unknown fields are ignored. Only a bad
        key, status or image list (not a list of objects or nulls) fails the entry.

        Raises:
            EntryError: the entry is not an object, or its key, status or images are
                unreadable (naming the field and the rule, never the value).
        """
        if type(raw) is not dict and not isinstance(raw, dict):
            raise EntryError("entry", "must be an object")
        # The common value of each field is taken here with a type() test; anything else goes
        # to the field's reader. Built without a call of __init__: a frame per entry saved.
        get = raw.get
        entry = _new(cls)
        key = get("key")
        if type(key) is not str:
            if not isinstance(key, str):
                raise EntryError("key", "required, as text")
            key = str(key)
        entry.key = key
        status = get("status", _MISSING)
        if type(status) is not int or not -_STATUS_BOUND <= status <= _STATUS_BOUND:
            status = _status(status)
        entry.status = status
        # A JSON number is a float or an int: each in range is taken here, as a float.
        value = get("complete_percent")
        if value is not None:
            kind = type(value)
            if kind is int and 0 <= value <= 100:
                value = float(value)
            elif kind is not float or not 0.0 <= value <= 100.0:
                value = _percent(value)
        entry.complete_percent = value
        value = get("expected_seconds")
        if value is not None:
            kind = type(value)
            if kind is int and 0 <= value <= _MAX_WHOLE_SECONDS:
                value = float(value)
            elif kind is not float or not 0.0 <= value <= MAX_EXPECTED_SECONDS:
                value = _expected_seconds(value)
        entry.expected_seconds = value
        value = get("images")
        if value is not None:
            value = () if type(value) is list and not value else _images(value)
        entry.images = value
        value = get("fail_message")
        if value is not None and (type(value) is not str or not value.isascii()):
            value = _fail(value)
        entry.fail_message = value
        value = get("queue_before_num")
        if value is not None and (type(value) is not int or not 0 <= value <= _MAX_QUEUE_POSITION):
            value = _queue_position(value)
        entry.queue_before_num = value
        value = get("start_gen_time")
        # -1e18 < x < 1e18 is also false for NaN and the infinities.
        if value is not None and (type(value) is not float or not -1e18 < value < 1e18):
            value = _time_stamp(value)
        entry.start_gen_time = value
        value = get("complete_time")
        if value is not None and (type(value) is not float or not -1e18 < value < 1e18):
            value = _time_stamp(value)
        entry.complete_time = value
        value = get("integral_cost")
        if value is not None:
            kind = type(value)
            if kind is int and 0 <= value <= _MAX_WHOLE_POINTS:
                value = float(value)
            elif kind is not float or not 0.0 <= value <= _MAX_POINTS:
                value = _points(value)
        entry.integral_cost = value
        return entry

    @property
    def terminal(self) -> bool:
        """True for the statuses that end a job (3, 4, 5 and -1)."""
        return self.status in _contract.TERMINAL_STATUSES
