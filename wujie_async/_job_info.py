"""One entry of a batch-detail reply (``JobInfo``), read field by field from hostile input
(``JobInfo.read``): its images (``ImageInfo``), its failure (``FailInfo``), and the error an
unreadable entry raises (``EntryError``).

Not pydantic: a reply lists up to 50 entries per call and a job is reported a few times, so
reading an entry is the client's hottest path. A model cost about 30,000 instructions and
left about 4 objects for the garbage collector per entry (3 more per image); this reader,
a plain slotted object and one reader per field (a type() test takes the common value, the
field's function the unusual one), about half the instructions and one object (one more per
image). Its rules are tested in tests/test_poller_hostile.py. Apart from the request models
(``_models``) because it shares nothing with them but the rule that text is encodable.
"""

from __future__ import annotations

import math
from typing import Any

from . import _contract
from ._models import encodable

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


def _unreadable_points(value: Any) -> str:
    """What an ``integral_cost`` that :func:`_points` could not read was, in words (never the
    value itself: the entry is hostile input, and the words go into a log line)."""
    if isinstance(value, bool):
        return "a boolean"
    number = _number(value)
    if isinstance(value, str) and number is None:
        return "text that is no number"
    if number is None:
        if isinstance(value, int | float):
            return "a number that is not finite or too large"
        if isinstance(value, dict):
            return "an object"
        return "a list" if isinstance(value, list) else type(value).__name__
    numeric = "numeric text" if isinstance(value, str) else "a number"
    return f"{numeric} below 0" if number < 0 else f"{numeric} over {_MAX_POINTS:.0e}"


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
        "cost_unreadable",
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
        cost_unreadable: str | None = None,
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
        # ``integral_cost`` was there but unreadable: what it was, in words (None otherwise).
        self.cost_unreadable = cost_unreadable

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
        unreadable = None
        if value is not None:
            kind = type(value)
            if kind is int and 0 <= value <= _MAX_WHOLE_POINTS:
                value = float(value)
            elif kind is not float or not 0.0 <= value <= _MAX_POINTS:
                raw, value = value, _points(value)
                if value is None:
                    # Dropped, but said: a cost reported unreadably is not a cost not reported
                    # (the budget's refusal says which, and the poller warns).
                    unreadable = _unreadable_points(raw)
        entry.integral_cost = value
        entry.cost_unreadable = unreadable
        return entry

    @property
    def terminal(self) -> bool:
        """True for the statuses that end a job (3, 4, 5 and -1)."""
        return self.status in _contract.TERMINAL_STATUSES
