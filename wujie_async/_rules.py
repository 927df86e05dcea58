"""The per-model request rules of API.md sections 1 and 2, as one table and one checker.

The client runs :func:`violations` before anything is sent (unknown models pass through, so a
new model works without a release, but for the bound on ``n`` that API.md sets for every model);
the emulator runs the same table with ``unknown_models=False``, as a gateway knows its own
models. One table, so the two never drift.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from ._contract import (
    EDIT_IMAGES,
    MAX_IMAGES_PER_JOB,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_CHARS_OTHER,
)
from ._image_formats import HEAD_BYTES, TAIL_BYTES, end_problem, png_size, sniff_format
from ._slices import b64_ends, b64_size

RequestKind = Literal["generation", "edit"]


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What one model accepts."""

    max_n: int
    qualities: frozenset[str]
    sizes: frozenset[str]
    # Fields documented for other models only (e.g. ``style`` is dall-e-3's).
    gpt_image_only: bool = False


MODEL_RULES: Final[dict[str, ModelRules]] = {
    "gpt-image-1": ModelRules(
        max_n=10,
        qualities=frozenset({"auto", "high", "medium", "low"}),
        sizes=frozenset({"1024x1024", "1536x1024", "1024x1536", "auto"}),
        gpt_image_only=True,
    ),
    "dall-e-2": ModelRules(
        max_n=10,
        qualities=frozenset({"auto", "standard"}),
        sizes=frozenset({"256x256", "512x512", "1024x1024"}),
    ),
    "dall-e-3": ModelRules(
        max_n=1,
        qualities=frozenset({"auto", "hd", "standard"}),
        sizes=frozenset({"1024x1024", "1792x1024", "1024x1792"}),
    ),
}
KNOWN_MODELS: Final = tuple(MODEL_RULES)
EDIT_MODELS: Final = tuple(EDIT_IMAGES)

BACKGROUNDS: Final = frozenset({"transparent", "opaque", "auto"})
MODERATIONS: Final = frozenset({"low", "auto"})
OUTPUT_FORMATS: Final = frozenset({"png", "jpeg", "webp"})
STYLES: Final = frozenset({"vivid", "natural"})

# The server-side validators the doc prints, which contradict its prose (API.md section 1).
STRICT_QUALITY_RE: Final = re.compile(r"low|medium|high")
STRICT_SIZE_RE: Final = re.compile(r"1024x1024|1536x1024|1024x1536")

# API.md: "< 25 MB" and "< 4 MB". Read as decimal megabytes, the stricter reading: an image
# the gateway could refuse (26,000,000 bytes is under 25 MiB) is not sent.
GPT_IMAGE_MAX_BYTES: Final = 25_000_000
DALL_E_2_MAX_BYTES: Final = 4_000_000
# The largest inline image each model takes (exclusive), and the rule an error names.
_IMAGE_LIMITS: Final = {
    "gpt-image-1": (GPT_IMAGE_MAX_BYTES, "gpt-image-1 takes images smaller than 25 MB"),
    "dall-e-2": (DALL_E_2_MAX_BYTES, "dall-e-2 takes a PNG smaller than 4 MB"),
}
_GPT_IMAGE_TYPES: Final = frozenset({"image/png", "image/webp", "image/jpeg", "image/jpg"})
# An unknown model passes unchecked (a new model works at once), so a name no model has is
# refused for its form: a space at an end, a control or an invisible character (" dall-e-2", a
# pasted newline, a zero-width space) would skip every rule of the model it was meant to be and
# be sent, and a gateway that trims it would charge for it. Only that: a gateway may name its
# models in any script, with spaces inside ("通义万相-2.1", "Stable Diffusion 3.5"), and such
# names were sent before this rule; the gateway says whether it serves them.
MODEL_NAME_MAX_CHARS: Final = 128
MODEL_NAME_RULE: Final = (
    f"must be a model name: 1 to {MODEL_NAME_MAX_CHARS} printable characters, beginning with a "
    "letter or digit, with no space at its end and no control or invisible character (one of "
    f"{'|'.join(KNOWN_MODELS)}, or another model the gateway serves)"
)
_DATA_URL_RE: Final = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(;[\w=-]+)*;base64,", re.IGNORECASE)

Violation = tuple[str, str]


def _choices(values: frozenset[str]) -> str:
    return "|".join(sorted(values))


def is_model_name(text: str) -> bool:
    """Whether ``text`` has the form of a model name (see :data:`MODEL_NAME_RULE`)."""
    # isprintable() is False for controls, format characters (zero-width ones), surrogates
    # and every separator but the ASCII space: tabs, newlines, no-break spaces.
    return (
        0 < len(text) <= MODEL_NAME_MAX_CHARS
        and text[0].isalnum()
        and not text[-1].isspace()
        and text.isprintable()
    )


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= char <= "\udfff" for char in text)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def size_pixels(size: str | None) -> tuple[int, int]:
    """Width and height of a size string; ``auto`` and absent mean 1024x1024."""
    if not size or size == "auto":
        return 1024, 1024
    width, _, height = size.partition("x")
    return int(width), int(height)


def _edit_violations(model: str, present: Mapping[str, Any]) -> list[Violation]:
    """What an edit's ``image`` and ``mask`` break, told without decoding their bytes: the
    model (a known one), how many images, each one's form, and an inline one's size by its
    length."""
    most = EDIT_IMAGES.get(model, 0)
    if not most:
        return [("model", f"{model} does not edit images (edits take {'|'.join(EDIT_MODELS)})")]
    images = present.get("image")
    if not isinstance(images, list) or not images:
        return [("image", "required: a non-empty array of URL or base64 strings")]
    if len(images) > most:
        if most == 1:
            return [("image", f"{model} takes exactly one image")]
        return [("image", f"{model} takes 1 to {most} images, got {len(images)}")]
    found: list[Violation] = []
    for index, item in enumerate(images):
        found.extend(_item_violations(model, f"image[{index}]", item))
    found.extend(_mask_violations(model, present.get("mask"), images))
    return found


def _item_violations(model: str, field: str, item: object) -> list[Violation]:
    """One image given to an edit (an ``image`` item or the ``mask``): a URL, which the
    gateway fetches and checks, or an inline image, whose form and size are checked here
    (its bytes by :func:`image_byte_violations`)."""
    if not isinstance(item, str) or not item:
        return [(field, "must be a non-empty string (URL, base64 or data URL)")]
    if item.startswith(("http://", "https://")):
        return []
    mime, start = _inline(item)
    size = b64_size(item, start)
    if size is None:
        return [(field, _not_base64(item, start))]
    # By its length, before a byte is decoded: a 200 MB text is refused at once.
    limit, too_large = _IMAGE_LIMITS.get(model, (None, ""))
    if limit is not None and size >= limit:
        return [(field, too_large)]
    if model == "dall-e-2" and mime and mime != "image/png":
        # The label travels with the image: a PNG sent as another type may be refused.
        return [(field, f"dall-e-2 takes a PNG labelled image/png (this data URL says {mime})")]
    if model == "gpt-image-1" and mime and mime not in _GPT_IMAGE_TYPES:
        return [(field, "gpt-image-1 takes png, webp or jpg images")]
    return []


def _not_base64(item: str, start: int) -> str:
    rule = "must be an http(s) URL, base64, or a base64 data URL"
    head = item[start : start + 256]
    if "\n" in head or "\r" in head:  # `base64` wraps at 76 columns by default
        rule += " (base64 on one line: `base64 -w0`, no line breaks)"
    return rule


def _mask_violations(model: str, mask: object, images: list[Any]) -> list[Violation]:
    """The mask is an image too: the same forms, formats and bounds as ``image`` items, and
    of the size of the image it masks (the first), when both are inline PNGs."""
    if mask is None:
        return []
    found = _item_violations(model, "mask", mask)
    if found or not isinstance(mask, str) or not isinstance(images[0], str):
        return found
    mask_size, image_size = _inline_png_size(mask), _inline_png_size(images[0])
    if mask_size and image_size and mask_size != image_size:
        # It marks where to edit the image: of another size, it marks nothing the gateway
        # can use, and the job would be refused or paid for nothing.
        return [
            (
                "mask",
                "must be the size of the image it masks (image[0] is "
                f"{image_size[0]}x{image_size[1]}, the mask {mask_size[0]}x{mask_size[1]})",
            )
        ]
    return []


def _inline(item: str) -> tuple[str | None, int]:
    """The media type a data URL gives ("" when it gives none; None for bare base64), and
    where the base64 it carries begins (an offset: the text, megabytes, is not copied)."""
    match = _DATA_URL_RE.match(item)
    if match is None:
        return None, 0
    return (match.group("mime") or "").lower(), match.end()


def _inline_png_size(item: str) -> tuple[int, int] | None:
    """Width and height of an inline PNG, from its first bytes only; None for a URL, another
    format, or base64 that does not decode."""
    if item.startswith(("http://", "https://")):
        return None
    _, start = _inline(item)
    try:
        head = base64.b64decode(item[start : start + 32], validate=True)  # 32 characters: 24 bytes
    except (binascii.Error, ValueError):
        return None
    return png_size(head)


def image_byte_violations(body: Mapping[str, Any]) -> list[Violation]:
    """What the bytes of an edit's inline images (and mask) break: each must decode as
    base64, be a whole png, webp or jpg image, and for dall-e-2 a square PNG.

    The costly half of the edit rules (megabytes decoded): :func:`violations` runs it only for
    a request that breaks no other rule, and the client on a worker thread for a large one
    (it decodes a slice at a time, so the event loop runs meanwhile). A model without rules
    here (an unknown one) is not checked.
    """
    model = body.get("model")
    if not isinstance(model, str) or model not in MODEL_RULES or not EDIT_IMAGES.get(model):
        return []
    images = body.get("image")
    items = list(enumerate(images)) if isinstance(images, list) else []
    named = [(f"image[{index}]", item) for index, item in items]
    mask = body.get("mask")
    if mask is not None:
        named.append(("mask", mask))
    found: list[Violation] = []
    for field, item in named:
        if isinstance(item, str) and item and not item.startswith(("http://", "https://")):
            found.extend(_bytes_violations(model, field, item))
    return found


def _bytes_violations(model: str, field: str, item: str) -> list[Violation]:
    _, start = _inline(item)
    ends = b64_ends(item, start, HEAD_BYTES, TAIL_BYTES)
    if ends is None:
        return [(field, _not_base64(item, start))]
    head, tail, size = ends
    if model == "dall-e-2":
        pixels = png_size(head)
        if pixels is None or not all(pixels):
            return [(field, "dall-e-2 takes a PNG image")]
        width, height = pixels
        if width != height:
            return [(field, f"dall-e-2 takes a square image, got {width}x{height}")]
    image_format = sniff_format(head[:16])
    if image_format is None:  # whatever its data URL says: the bytes are what is paid
        return [(field, "must be a png, webp or jpg image (its bytes are neither)")]
    # A file cut short (a partial copy, a truncated paste) has the right first bytes too.
    cut = end_problem(image_format, head, tail, size)
    if cut is not None:
        return [(field, f"must be a whole image: {cut}")]
    return []


def violations(
    kind: RequestKind,
    body: Mapping[str, Any],
    *,
    unknown_models: bool = True,
    strict_regexps: bool = False,
    image_bytes: bool = True,
) -> list[Violation]:
    """Every ``(field, rule)`` that ``body`` breaks; empty when it is valid.

    Args:
        kind: ``"generation"`` or ``"edit"``.
        body: the JSON body as it would be sent (absent fields omitted or None).
        unknown_models: let models outside :data:`MODEL_RULES` through unchecked (client
            side), when their name has the form of one (:func:`is_model_name`).
        strict_regexps: also apply the validators printed on the doc page (emulator knob).
        image_bytes: also check an edit's inline image bytes (:func:`image_byte_violations`),
            when nothing else is wrong; False leaves that to the caller (the client, which
            decodes megabytes on a worker thread).
    """
    found: list[Violation] = []
    present = {name: value for name, value in body.items() if value is not None}

    prompt = present.get("prompt")
    model = present.get("model")
    if not isinstance(prompt, str) or not prompt.strip():
        found.append(("prompt", "required: a non-empty string"))
    elif len(prompt) > (limit := prompt_limit(model)):
        whose = model if isinstance(model, str) and model in MAX_PROMPT_CHARS else "a model"
        found.append(("prompt", f"{whose} takes at most {limit:,} characters, got {len(prompt):,}"))
    if not isinstance(model, str) or not model:
        found.append(("model", f"required: one of {'|'.join(KNOWN_MODELS)}"))
        return found
    rules = MODEL_RULES.get(model)
    if rules is None:
        if not unknown_models:
            found.append(("model", f"must be one of {'|'.join(KNOWN_MODELS)}"))
            return found
        if not is_model_name(model):
            # A lone surrogate is said once, by the UTF-8 rule (``_models.unencodable``).
            if not _has_surrogate(model):
                found.append(("model", MODEL_NAME_RULE))
            return found
        # API.md bounds n for every model, not only the ones listed: an unknown model's n of 0
        # or -100 would be sent, and the points budget and the job's image count rest on it.
        found.extend(_count_violations(model, MAX_IMAGES_PER_JOB, present))
        return found

    found.extend(_field_violations(model, rules, present))
    if strict_regexps:
        quality, size = present.get("quality"), present.get("size")
        if isinstance(quality, str) and not STRICT_QUALITY_RE.fullmatch(quality):
            found.append(("quality", "Validate[regexp: low|medium|high]"))
        if isinstance(size, str) and not STRICT_SIZE_RE.fullmatch(size):
            found.append(("size", "Validate[regexp: 1024x1024|1536x1024|1024x1536]"))
    if kind == "edit":
        # The cheap rules first: a request they refuse is refused before megabytes of its
        # images are decoded.
        found.extend(_edit_violations(model, present))
        if image_bytes and not found:
            found.extend(image_byte_violations(present))
    return found


def _count_violations(model: str, max_n: int, present: Mapping[str, Any]) -> list[Violation]:
    """``n``: an int (never a bool) from 1 to 10 for every model, and to ``max_n`` for ``model``."""
    n = present.get("n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_IMAGES_PER_JOB:
        return [("n", f"must be an integer from 1 to {MAX_IMAGES_PER_JOB}")]
    if n > max_n:
        return [("n", f"{model} allows n from 1 to {max_n}")]
    return []


def _field_violations(model: str, rules: ModelRules, present: Mapping[str, Any]) -> list[Violation]:
    found = _count_violations(model, rules.max_n, present)

    for name, choices in (("quality", rules.qualities), ("size", rules.sizes)):
        value = present.get(name)
        if value is not None and (not isinstance(value, str) or value not in choices):
            found.append((name, f"{model} allows {_choices(choices)}"))

    output_format = present.get("output_format")
    gpt_image_fields: tuple[tuple[str, frozenset[str] | None], ...] = (
        ("background", BACKGROUNDS),
        ("moderation", MODERATIONS),
        ("output_format", OUTPUT_FORMATS),
        ("output_compression", None),
    )
    for name, allowed in gpt_image_fields:
        if name not in present:
            continue
        if not rules.gpt_image_only:
            found.append((name, "only gpt-image-1 takes this field"))
        elif allowed is not None and (
            not isinstance(present[name], str) or present[name] not in allowed
        ):
            found.append((name, f"must be one of {_choices(allowed)}"))

    compression = present.get("output_compression")
    if compression is not None and rules.gpt_image_only:
        if not _is_int(compression) or not 0 <= compression <= 100:
            found.append(("output_compression", "must be an integer from 0 to 100"))
        elif output_format not in {"jpeg", "webp"}:
            found.append(("output_compression", "applies only with output_format jpeg or webp"))
    if present.get("background") == "transparent" and output_format not in {None, "png", "webp"}:
        found.append(("background", "transparent needs output_format png or webp"))

    style = present.get("style")
    if style is not None:
        if model != "dall-e-3":
            found.append(("style", "only dall-e-3 takes this field"))
        elif not isinstance(style, str) or style not in STYLES:
            found.append(("style", f"must be one of {_choices(STYLES)}"))
    return found


__all__ = ["KNOWN_MODELS", "MODEL_RULES", "image_byte_violations", "size_pixels", "violations"]


def prompt_limit(model: object) -> int:
    """The most characters a prompt for ``model`` may hold (see ``_contract``)."""
    if isinstance(model, str):
        return MAX_PROMPT_CHARS.get(model, MAX_PROMPT_CHARS_OTHER)
    return MAX_PROMPT_CHARS_OTHER
