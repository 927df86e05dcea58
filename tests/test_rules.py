"""The submit path's request check: the fast path gives exactly what pydantic's build gives."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from wujie_async import InvalidRequestError
from wujie_async._models import EditRequest, GenerationRequest
from wujie_async._rules import violations
from wujie_async.emulator._png import render_png


class Text(str):
    """A str subclass: pydantic turns it into a plain str, so the fast path must step aside."""


GENERATIONS: list[dict[str, Any]] = [
    {"prompt": "a cat", "model": "gpt-image-1"},
    {"model": "dall-e-3", "prompt": "a cat", "size": "1024x1024", "quality": "hd", "n": 1},
    {"prompt": "a cat", "model": "dall-e-2", "n": None, "style": None},
    {"prompt": "a cat", "model": "dall-e-2", "n": 11},  # breaks a per-model rule
    {"prompt": "a cat", "model": "dall-e-3", "style": "vivid", "size": "256x256"},
    {"prompt": "a cat", "model": "gpt-image-1", "n": True},  # a bool is no count
    {"prompt": "a cat", "model": "gpt-image-1", "n": 2.0},  # pydantic converts this
    {"prompt": "a cat", "model": "gpt-image-1", "n": "3"},
    {"prompt": Text("a cat"), "model": "gpt-image-1"},
    {"prompt": "a cat", "model": "gpt-image-1", "colour": "red"},  # unknown field
    {"prompt": "a cat"},  # no model
    {"prompt": None, "model": "gpt-image-1"},
    {"prompt": "", "model": "gpt-image-1"},
    {"prompt": "a cat", "model": "a-new-model", "n": 99, "quality": "ultra"},
    {"prompt": "a cat", "model": "gpt-image-1", "output_compression": 101},
    {"prompt": 5, "model": "gpt-image-1"},
    # The common request (prompt, model, n, quality, size), which takes a shorter way: each
    # rule it checks, met and broken.
    {"prompt": "a cat", "model": "gpt-image-1", "n": 10, "quality": "low", "size": "auto"},
    {"prompt": "一只猫", "model": "dall-e-2", "n": 2, "size": "256x256"},
    {"prompt": "a cat \ud800", "model": "gpt-image-1"},  # cannot be sent
    {"prompt": "   ", "model": "gpt-image-1"},
    {"prompt": "\u3000", "model": "gpt-image-1"},  # a blank that is not ASCII
    {"prompt": "a cat", "model": "gpt-image-1", "n": 0},
    {"prompt": "a cat", "model": "gpt-image-1", "n": -1},
    {"prompt": "a cat", "model": "dall-e-3", "n": 2},
    {"prompt": "a cat", "model": "dall-e-3", "n": False},
    {"prompt": "a cat", "model": "dall-e-2", "quality": "hd"},
    {"prompt": "a cat", "model": "dall-e-2", "quality": 1},
    {"prompt": "a cat", "model": "gpt-image-1", "quality": Text("low")},
    {"prompt": "a cat", "model": "gpt-image-1", "size": "256x256"},
    {"prompt": "a cat", "model": "gpt-image-1", "size": None, "quality": None},
    {"prompt": "a cat", "model": Text("gpt-image-1")},
    {"prompt": "a cat", "model": ""},
    {"prompt": "a cat", "model": "gpt-image-1 "},
    {"model": "gpt-image-1"},
    {"size": "auto", "n": 3, "model": "gpt-image-1", "prompt": "a cat"},  # order of the body
    # Prompt lengths: each model's bound, met and broken; an unknown model's.
    {"prompt": "c" * 1_000, "model": "dall-e-2"},
    {"prompt": "c" * 1_001, "model": "dall-e-2"},
    {"prompt": "c" * 4_001, "model": "dall-e-3", "n": 1},
    {"prompt": "c" * 32_000, "model": "gpt-image-1"},
    {"prompt": "c" * 32_001, "model": "gpt-image-1"},
    {"prompt": "c" * 32_001, "model": "a-new-model"},
    {"prompt": "c" * 5_000_000},  # a runaway line, no model
]
EDITS: list[dict[str, Any]] = [
    {"prompt": "a hat", "model": "gpt-image-1", "image": ["https://example.com/a.png"]},
    {"prompt": "a hat", "model": "dall-e-2", "image": ["https://example.com/a.png"], "mask": ""},
    {"prompt": "a hat", "model": "gpt-image-1", "image": ("https://example.com/a.png",)},
    {"prompt": "a hat", "model": "gpt-image-1", "image": [Text("https://example.com/a.png")]},
    {"prompt": "a hat", "model": "gpt-image-1", "image": []},
    {"prompt": "a hat", "model": "gpt-image-1", "image": "https://example.com/a.png"},
    {"prompt": "a hat", "model": "gpt-image-1"},  # no image
]


def _outcome(call: Any) -> Any:
    try:
        return call()
    except InvalidRequestError as exc:
        return ("invalid", exc.violations, str(exc))


@pytest.mark.parametrize(
    ("kind", "fields"),
    [(GenerationRequest, fields) for fields in GENERATIONS]
    + [(EditRequest, fields) for fields in EDITS],
)
def test_the_fast_request_check_matches_pydantic(
    kind: type[GenerationRequest | EditRequest], fields: dict[str, Any]
) -> None:
    def slow() -> Any:
        request = kind.build(dict(fields))
        return request.body(), request.n

    fast = _outcome(lambda: kind.checked_body(dict(fields)))
    assert fast == _outcome(slow)
    if not isinstance(fast[0], str):
        body, _ = fast
        assert list(body) == list(slow()[0])  # the same field order on the wire
        assert all(body[name] is not fields[name] for name in body if type(body[name]) is list)


def test_a_dall_e_2_png_labelled_as_another_type_is_told_so() -> None:
    """The bytes are a square PNG: the rule broken is the label, and the message says so."""
    png = render_png("label", 0, 8, 8)
    inline = base64.b64encode(png).decode()
    body = {"prompt": "a hat", "model": "dall-e-2", "image": [f"data:image/jpeg;base64,{inline}"]}
    assert violations("edit", body) == [
        ("image[0]", "dall-e-2 takes a PNG labelled image/png (this data URL says image/jpeg)")
    ]
    body["image"] = [f"data:image/png;base64,{inline}"]
    assert violations("edit", body) == []
    body["image"] = [inline]
    assert violations("edit", body) == []


@pytest.mark.parametrize(
    ("model", "length", "rule"),
    [
        ("dall-e-2", 1_001, "dall-e-2 takes at most 1,000 characters, got 1,001"),
        ("dall-e-3", 4_001, "dall-e-3 takes at most 4,000 characters, got 4,001"),
        ("gpt-image-1", 50_000_000, "gpt-image-1 takes at most 32,000 characters, got 50,000,000"),
        ("a-new-model", 32_001, "a model takes at most 32,000 characters, got 32,001"),
    ],
)
def test_a_prompt_over_its_models_bound_is_refused_naming_it(
    model: str, length: int, rule: str
) -> None:
    """API.md gives no bound; a bulk input's runaway line (5 MB, 50 MB) was sent and paid for.
    The upstream models' own bounds hold (the largest for a model the client does not know)."""
    with pytest.raises(InvalidRequestError) as refused:
        GenerationRequest.checked_body({"prompt": "c" * length, "model": model})
    assert refused.value.violations == [("prompt", rule)]
