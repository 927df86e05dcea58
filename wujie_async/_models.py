"""Pydantic models of what crosses the wire, and the results handed to users.

Request models check the per-model rules of API.md (see ``_rules``) before anything is sent.
Reply models ignore unknown fields, since the gateway may add fields at any time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from . import _contract, _rules
from ._errors import InvalidRequestError


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
            raise InvalidRequestError(
                [
                    (".".join(str(p) for p in err["loc"]) or "body", err["msg"])
                    for err in exc.errors()
                ]
            ) from None
        # The field values as validated (None for unset): no need to dump the model for this.
        found = _rules.violations(cls.kind, request.__dict__)
        if found:
            raise InvalidRequestError(found)
        return request


class GenerationRequest(_Request):
    """A body for ``POST /ai/wj/images/generations``."""


class EditRequest(_Request):
    """A body for ``POST /ai/wj/images/edits``: a generation plus source images and a mask."""

    image: list[str]
    mask: str | None = None

    kind: ClassVar[_rules.RequestKind] = "edit"


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


class SubmitData(_Reply):
    """``data`` of a submit reply."""

    key: str

    @field_validator("key")
    @classmethod
    def _key_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the job key is empty")
        return value


class ImageInfo(_Reply):
    """One image in a batch-detail entry."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class FailInfo(_Reply):
    """Why a job failed."""

    fail_code: int | str | None = None
    fail_message: str | None = None


class JobInfo(_Reply):
    """One entry of a batch-detail reply's ``list``."""

    key: str
    status: int
    complete_percent: float | None = None
    expected_seconds: float | None = None
    images: list[ImageInfo] | None = None
    fail_message: FailInfo | str | None = None

    @property
    def terminal(self) -> bool:
        """True for the statuses that end a job (3, 4, 5)."""
        return self.status in _contract.TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One finished image.

    Attributes:
        index: its position in the job (0 to n-1).
        url: where to download it (URLs expire: download promptly).
        b64_json: the image inline, when the gateway sent it that way.
        revised_prompt: the prompt the model actually used, when reported.
    """

    index: int
    url: str | None
    b64_json: str | None = None
    revised_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class ImageResult:
    """A job that succeeded: its key, final status and images."""

    key: str
    status: int
    images: tuple[GeneratedImage, ...]
