"""The request surface, typed once: the keyword arguments of submit, submit_edit, generate, edit.

``Images.submit(**fields: Unpack[GenerationFields])`` keeps one list of fields for the four
methods, and mypy still catches ``generate(promt=...)`` or ``generate(n="three")``. The values
are checked again at run time (``_models``), since not every caller runs a type checker, and as
strictly: a value of another type is refused, never converted (``n="3"``, ``n=2.0``, ``n=True``
raise InvalidRequestError), and text must be encodable as UTF-8.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Required, TypedDict

Quality = Literal["auto", "high", "medium", "low", "hd", "standard"]
Background = Literal["transparent", "opaque", "auto"]
Moderation = Literal["low", "auto"]
OutputFormat = Literal["png", "jpeg", "webp"]
Style = Literal["vivid", "natural"]


class GenerationFields(TypedDict, total=False):
    """Keyword arguments of ``images.submit`` and ``images.generate`` (API.md section 1).

    Leaving a field out (or passing None) lets the gateway use its default. ``model`` is any
    string (a model the gateway adds works before this client knows it); the closed sets of
    API.md are ``Literal`` types, so a typo is caught by the type checker before the run-time
    check.

    Keys:
        prompt: the text of the image (required).
        model: ``gpt-image-1``, ``dall-e-2`` or ``dall-e-3`` (required).
        n: images in the job, 1 to 10 (dall-e-3: 1).
        quality, size, background, moderation, output_format, output_compression, style:
            as API.md section 1, per model.
        job_timeout: the job's deadline in seconds (default ``Timeouts.job``).
        extra_body: fields this client does not know yet, sent as given.
        tag: your own id for the submit (a queue message id), a str kept in the journal only.
    """

    prompt: Required[str]
    model: Required[str]
    n: int | None
    quality: Quality | None
    size: str | None
    background: Background | None
    moderation: Moderation | None
    output_format: OutputFormat | None
    output_compression: int | None
    style: Style | None
    job_timeout: float | None
    extra_body: Mapping[str, Any] | None
    tag: str | None


class EditFields(GenerationFields, total=False):
    """Keyword arguments of ``images.submit_edit`` and ``images.edit`` (API.md section 2).

    Keys:
        image: source images: URLs, base64 or data URLs (required).
        mask: an optional mask image, in the same forms.
    """

    image: Required[list[str]]
    mask: str | None


# Fields that shape the job and the journal, not the request body.
CLIENT_ONLY_FIELDS = frozenset({"job_timeout", "extra_body", "tag"})
