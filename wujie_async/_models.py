"""What crosses the wire: pydantic models of requests and of the reply envelope, and the
rule that text sent or shown is encodable (``unencodable``, ``encodable``).

Request models check the per-model rules of API.md (see ``_rules``) before anything is sent.
Replies ignore unknown fields, since the gateway may add fields at any time. A batch-detail
entry is not a model: ``_job_info`` reads it field by field, on the hottest path of polling.
"""

from __future__ import annotations

import json
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
    def build(cls, fields: dict[str, Any], *, image_bytes: bool = True) -> Self:
        """Validate ``fields`` (types, then the per-model rules) and build the request;
        ``image_bytes=False`` leaves an edit's inline image bytes unchecked (see
        ``_rules.violations``).

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
        found = unencodable(request.__dict__) + _rules.violations(
            cls.kind, request.__dict__, image_bytes=image_bytes
        )
        if found:
            raise InvalidRequestError(found)
        return request

    @classmethod
    def checked_body(
        cls, fields: dict[str, Any], *, image_bytes: bool = True
    ) -> tuple[dict[str, Any], int | None]:
        """``(body, n)`` of ``build(fields)``: the JSON body and the image count
        (``image_bytes``: as for :meth:`build`).

        The hot path of every submit. When every value already has its field's exact type
        (``str``, ``int``, a list of ``str``; None for an optional field), validating with
        pydantic would hand the same values back, so it is skipped: the UTF-8 check and the
        per-model rules still run, as in :meth:`build`. Anything else (a str subclass, a bool
        for an int, an unknown field, a missing one, a tuple of images) goes through
        :meth:`build`, which converts a str subclass to str, or names the error. The common
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
            request = cls.build(fields, image_bytes=image_bytes)
            return request.body(), request.n
        found = unencodable(fields) + _rules.violations(cls.kind, fields, image_bytes=image_bytes)
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
    ``unencodable`` and ``_rules.violations`` check (prompt not blank nor too long, text
    UTF-8, n from 1 to the model's bound, quality and size the model's), in a few tests rather
    than a few dozen
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
    if len(prompt) > _rules.prompt_limit(model):
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
