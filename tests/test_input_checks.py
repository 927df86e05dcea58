"""Bad input is refused with InvalidRequestError naming the field, before anything is sent.

Request fields are strict (a count is an int, never ``"3"``, ``2.0`` or ``True``; text is a str
encodable as UTF-8), the ``tag`` of a submit is a str, and every policy refuses, at
construction, a float for a count, a bool for a number, NaN, and infinity for a bound.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any

import pytest

from wujie_async import (
    DownloadPolicy,
    InvalidRequestError,
    Limits,
    ParameterError,
    PollPolicy,
    RetryPolicy,
    Timeouts,
)
from wujie_async._image_formats import PNG_SIGNATURE
from wujie_async._models import EditRequest, GenerationRequest
from wujie_async.emulator._png import render_png

from .conftest import EmulatorFactory, make_client

pytestmark = pytest.mark.anyio

CAT: dict[str, Any] = {"prompt": "a cat", "model": "gpt-image-1"}
JPEG: dict[str, Any] = {**CAT, "output_format": "jpeg"}
HAT: dict[str, Any] = {
    "prompt": "a hat",
    "model": "gpt-image-1",
    "image": ["https://example.com/a.png"],
}

# (fields of images.submit, the field the error must name)
BAD_GENERATIONS: list[tuple[dict[str, Any], str]] = [
    ({**CAT, "n": "3"}, "n"),
    ({**CAT, "n": 2.0}, "n"),
    ({**CAT, "n": True}, "n"),
    # API.md bounds n for every model: a model this client does not know is no way around it.
    ({**CAT, "model": "gpt-image-2", "n": 0}, "n"),
    ({**CAT, "model": "gpt-image-2", "n": -3}, "n"),
    ({**CAT, "model": "gpt-image-2", "n": -100}, "n"),
    ({**CAT, "model": "gpt-image-2", "n": 11}, "n"),
    ({**CAT, "model": "gpt-image-2", "n": True}, "n"),
    ({**JPEG, "output_compression": "50"}, "output_compression"),
    ({**JPEG, "output_compression": 50.0}, "output_compression"),
    ({**JPEG, "output_compression": True}, "output_compression"),
    ({**CAT, "prompt": b"a cat"}, "prompt"),
    ({**CAT, "quality": b"high"}, "quality"),
    ({**CAT, "prompt": "\ud800"}, "prompt"),
    ({**CAT, "prompt": "a cat \udfff"}, "prompt"),
    ({**CAT, "model": "gpt-image-\ud800"}, "model"),  # an unknown model is still text
    # A name no model has passed as an unknown model: every rule of the model it was meant to
    # be skipped, and it was sent (and paid for, if the gateway trims it).
    ({**CAT, "model": " dall-e-2"}, "model"),
    ({**CAT, "model": "dall-e-2 "}, "model"),
    ({**CAT, "model": "dall-e-2\n"}, "model"),
    ({**CAT, "model": "dall-e-2\u3000"}, "model"),  # an ideographic space at its end
    ({**CAT, "model": "dall-e-2\u200b"}, "model"),  # a zero-width space
    ({**CAT, "model": "-dall-e-2"}, "model"),
    ({**CAT, "model": "a-new-model", "size": "1024x1024\ud800"}, "size"),
    ({**CAT, "tag": 123}, "tag"),
    ({**CAT, "tag": b"x"}, "tag"),
    ({**CAT, "tag": object()}, "tag"),
    ({**CAT, "tag": "\ud800"}, "tag"),
    # json.dumps passes a lone surrogate as "\udc80": it raised UnicodeEncodeError when sent.
    ({**CAT, "extra_body": {"note": "a cat \udc80"}}, "extra_body"),
    ({**CAT, "extra_body": {"note\ud800": 1}}, "extra_body"),
]
TEXT = base64.b64encode(b"hello, this is not an image").decode()
SQUARE = base64.b64encode(render_png("k", 0, 8, 8)).decode()
SMALLER = base64.b64encode(render_png("k", 0, 4, 4)).decode()
CUT_SHORT = base64.b64encode(render_png("k", 0, 8, 8)[:40]).decode()
GIF = base64.b64encode(b"GIF89a" + bytes(50)).decode()
JPEG_BYTES = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(100) + b"\xff\xd9").decode()
BAD_EDITS: list[tuple[dict[str, Any], str]] = [
    ({**HAT, "image": [TEXT]}, "image[0]"),  # base64, but of text: sent, it would be paid
    ({**HAT, "image": [SQUARE, "data:image/png;base64," + TEXT]}, "image[1]"),  # says png
    ({**HAT, "model": "dall-e-2", "image": [base64.b64encode(PNG_SIGNATURE).decode()]}, "image[0]"),
    ({**HAT, "image": ["https://example.com/\ud800.png"]}, "image[0]"),
    ({**HAT, "image": ["https://example.com/a.png", b"https://example.com/b.png"]}, "image[1]"),
    ({**HAT, "mask": "https://example.com/m\ud800.png"}, "mask"),
    ({**HAT, "image": [CUT_SHORT]}, "image[0]"),  # a PNG's first bytes, and no end
    # A mask is an image, checked as one: its form, its bytes, its label, its model's rules.
    ({**HAT, "mask": "!!!!notbase64"}, "mask"),
    ({**HAT, "mask": "data:text/html;base64,PHNjcmlwdD4="}, "mask"),
    ({**HAT, "mask": GIF}, "mask"),
    ({**HAT, "mask": CUT_SHORT}, "mask"),
    ({**HAT, "model": "dall-e-2", "image": [SQUARE], "mask": JPEG_BYTES}, "mask"),
    ({**HAT, "image": [SQUARE], "mask": SMALLER}, "mask"),  # 4x4 cannot mask 8x8
    ({**HAT, "n": "2"}, "n"),
    ({**HAT, "tag": 7}, "tag"),
    ({**HAT, "model": "gpt-image-1\t"}, "model"),
    # Sent unchecked before: dall-e-3 edits nothing; gpt-image-1 takes 1 to 16 images; a tuple
    # is not converted to the list the field is (values are sent as given, or refused).
    ({**HAT, "model": "dall-e-3"}, "model"),
    ({**HAT, "image": [SQUARE] * 17}, "image"),
    ({**HAT, "image": ["https://example.com/a.png"] * 1000}, "image"),
    ({**HAT, "image": ("https://example.com/a.png",)}, "image"),
]


def _ids(cases: list[tuple[dict[str, Any], str]]) -> list[str]:
    """``field=value`` ids, the same in every xdist worker (no ``object at 0x...``)."""
    ids = []
    for fields, field in cases:
        value = fields[field.split("[")[0]]
        shown = repr(value) if isinstance(value, str | bytes | int | float | list) else "object"
        ids.append(f"{field}={shown[:40]}")
    return ids


def _names(exc: InvalidRequestError) -> list[str]:
    return [field for field, _ in exc.violations]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_rule(exc: InvalidRequestError, fields: dict[str, Any], field: str) -> None:
    """The field is named; text that is no UTF-8 is refused for that reason, not another."""
    assert field in _names(exc)
    assert field in str(exc)
    value = fields[field.split("[")[0]]
    texts = value if isinstance(value, list) else [value]
    if isinstance(value, dict):  # extra_body: its keys and values
        texts = [*value, *value.values()]
    if any(isinstance(text, str) and _SURROGATE.search(text) for text in texts):
        assert "UTF-8" in dict(exc.violations)[field]


def _nothing_sent(stats: dict[str, Any]) -> None:
    assert stats["submits_accepted"] == 0
    assert stats["requests"].get("generations", 0) == 0
    assert stats["requests"].get("edits", 0) == 0


@pytest.mark.parametrize(("fields", "field"), BAD_GENERATIONS, ids=_ids(BAD_GENERATIONS))
async def test_a_bad_generation_field_is_refused_before_sending(
    emulator: EmulatorFactory, tmp_path: Path, fields: dict[str, Any], field: str
) -> None:
    async with emulator() as emu:
        # With a journal: a bad tag must not surface as a journal error, nor leave a row.
        async with make_client(emu, journal=tmp_path / "jobs.sqlite") as client:
            with pytest.raises(InvalidRequestError) as caught:
                await client.images.submit(**fields)
            _check_rule(caught.value, fields, field)
            assert await client.journal_entries() == []
        _nothing_sent(emu.stats())


@pytest.mark.parametrize(("fields", "field"), BAD_EDITS, ids=_ids(BAD_EDITS))
async def test_a_bad_edit_field_is_refused_before_sending(
    emulator: EmulatorFactory, fields: dict[str, Any], field: str
) -> None:
    async with emulator() as emu:
        async with make_client(emu) as client:
            with pytest.raises(InvalidRequestError) as caught:
                await client.images.submit_edit(**fields)
            _check_rule(caught.value, fields, field)
        _nothing_sent(emu.stats())


async def test_every_bad_field_is_named_at_once(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        async with make_client(emu) as client:
            with pytest.raises(InvalidRequestError) as caught:
                bad: dict[str, Any] = {**CAT, "n": "3", "prompt": "\ud800", "tag": 5}
                await client.images.submit(**bad)
            assert set(_names(caught.value)) == {"n", "prompt", "tag"}
        _nothing_sent(emu.stats())


def test_a_misspelt_field_is_the_one_named() -> None:
    # "promt" leaves "prompt" missing: the error's field is the misspelt one, the user's fix.
    with pytest.raises(InvalidRequestError) as caught:
        GenerationRequest.build({"promt": "x", "model": "dall-e-2"})
    assert caught.value.field == "promt" and "not permitted" in (caught.value.rule or "")
    assert set(_names(caught.value)) == {"promt", "prompt"}


async def test_a_request_refused_by_a_cheap_rule_is_not_decoded(emulator: EmulatorFactory) -> None:
    """n, the model and the image count are checked before an image's bytes are decoded: a
    request they refuse is refused for them alone (megabytes were decoded to name both)."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({**HAT, "image": [TEXT], "n": 11}, "n"),
        ({**HAT, "image": [TEXT], "size": "256x256"}, "size"),
        ({**HAT, "image": [TEXT] * 17}, "image"),
        ({**HAT, "image": [TEXT], "model": "dall-e-3"}, "model"),
    ]
    async with emulator() as emu:
        async with make_client(emu) as client:
            for fields, field in cases:
                with pytest.raises(InvalidRequestError) as caught:
                    await client.images.submit_edit(**fields)
                assert _names(caught.value) == [field]
        _nothing_sent(emu.stats())


def test_an_oversized_inline_image_is_refused_by_its_length() -> None:
    """Over the cap by its length alone: refused as too large, not decoded (a 200 MB text took
    two seconds of a stalled loop to refuse), whatever its characters."""
    for text in ["A" * 40_000_000, "!" * 40_000_000]:
        with pytest.raises(InvalidRequestError) as caught:
            EditRequest.build({**HAT, "image": [text]})
        assert caught.value.violations == [
            ("image[0]", "gpt-image-1 takes images smaller than 25 MB")
        ]


async def test_an_inline_image_or_mask_of_25_mb_is_refused_before_sending(
    emulator: EmulatorFactory,
) -> None:
    """API.md: "< 25 MB". 26,000,000 bytes is under 25 MiB, and was sent: the bound is read
    as decimal megabytes, the stricter reading, for the image and the mask alike."""
    png = render_png("k", 0, 8, 8)
    big = base64.b64encode(png + bytes(25_000_000 - len(png))).decode()
    cases: list[tuple[dict[str, Any], str]] = [
        ({**HAT, "image": [big]}, "image[0]"),
        ({**HAT, "image": [SQUARE], "mask": f"data:image/png;base64,{big}"}, "mask"),
    ]
    async with emulator() as emu:
        async with make_client(emu) as client:
            for fields, field in cases:
                with pytest.raises(InvalidRequestError) as caught:
                    await client.images.submit_edit(**fields)
                rule = "gpt-image-1 takes images smaller than 25 MB"
                assert caught.value.violations == [(field, rule)]
        _nothing_sent(emu.stats())


@pytest.mark.parametrize(
    ("kind", "fields", "field"),
    [
        (GenerationRequest, fields, field)
        for fields, field in BAD_GENERATIONS
        if "tag" not in fields and "extra_body" not in fields  # the client's, not the body's
    ]
    + [(EditRequest, fields, field) for fields, field in BAD_EDITS if "tag" not in fields],
)
def test_build_is_as_strict_as_submit(
    kind: type[GenerationRequest | EditRequest], fields: dict[str, Any], field: str
) -> None:
    """``build`` (what the CLI checks each input row with) refuses what submit refuses."""
    with pytest.raises(InvalidRequestError) as caught:
        kind.build(dict(fields))
    _check_rule(caught.value, fields, field)


def test_a_model_name_is_refused_for_its_form_only() -> None:
    """A model this client does not know goes through unchecked (a new model works without a
    release), unless its name has characters no model name has."""
    for model in ["gpt-image-1.5", "flux.1-schnell", "vendor/model:v2", "SDXL_turbo", "m@2025"]:
        GenerationRequest.build({**CAT, "model": model})
    for model in [" gpt-image-1", "gpt-image-1 ", "-gpt-image-1", "gpt\u00a0image", "x" * 129]:
        with pytest.raises(InvalidRequestError) as caught:
            GenerationRequest.build({**CAT, "model": model})
        assert caught.value.field == "model" and "model name" in caught.value.rule, model


async def test_unknown_model_names_of_any_script_are_still_sent(emulator: EmulatorFactory) -> None:
    """A model this client does not know, named in another script or with spaces inside (as a
    gateway may name its own models), is sent for the gateway to judge, as it was before
    model names were checked for their form: only what no name has (a space at an end, a
    control or invisible character) is refused here."""
    names = ["通义万相-2.1", "Stable Diffusion 3.5", "modèle-é", "a;b"]
    async with emulator() as emu, make_client(emu) as client:
        for model in names:
            with pytest.raises(ParameterError) as info:  # the gateway's word on it
                await client.images.submit(prompt="a cat", model=model)
            assert "model" in info.value.message, model
        assert emu.stats()["requests"] == {"generations": len(names)}


async def test_valid_requests_still_go_through(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        async with make_client(emu) as client:
            jobs = [
                await client.images.submit(**CAT, n=2, tag="message-1"),
                await client.images.submit(**JPEG, output_compression=50, n=None),
                await client.images.submit(prompt="一只猫 🐱, é", model="dall-e-3", style="vivid"),
                await client.images.submit_edit(**{**HAT, "image": [SQUARE]}),
                await client.images.submit_edit(
                    **{**HAT, "model": "dall-e-2", "image": ["data:image/png;base64," + SQUARE]}
                ),
                await client.images.submit_edit(**{**HAT, "image": [SQUARE], "mask": SQUARE}),
                await client.images.submit_edit(
                    **{**HAT, "model": "dall-e-2", "image": [SQUARE], "mask": SQUARE}
                ),
                await client.images.submit_edit(**{**HAT, "mask": SMALLER}),  # image a URL
            ]
            for job in jobs:
                await job
        assert emu.stats()["submits_accepted"] == len(jobs)


# --- policies ------------------------------------------------------------------------------------
Policy = type[Limits | PollPolicy | Timeouts | RetryPolicy | DownloadPolicy]

BAD_POLICIES: list[tuple[Policy, dict[str, Any], list[str]]] = [
    # counts are ints: a float (even a whole one) or a bool is refused
    (
        Limits,
        {
            "max_connections": 2.5,
            "max_concurrent_submits": 1.5,
            "max_concurrent_polls": 1.5,
            "max_in_flight": 2.5,
            "max_response_bytes": 1.5,
        },
        [
            "max_connections",
            "max_concurrent_submits",
            "max_concurrent_polls",
            "max_in_flight",
            "max_response_bytes",
        ],
    ),
    (Limits, {"max_connections": 8.0}, ["max_connections"]),
    (Limits, {"max_connections": True}, ["max_connections"]),
    (Limits, {"max_in_flight": True}, ["max_in_flight"]),
    (Limits, {"max_concurrent_polls": 0}, ["max_concurrent_polls"]),
    # a bound that is None when there is none: infinity is refused in favour of None
    (Limits, {"max_submits_per_second": math.inf}, ["max_submits_per_second"]),
    (Limits, {"max_submits_per_second": True}, ["max_submits_per_second"]),
    (Limits, {"max_points": math.inf}, ["max_points"]),
    (Limits, {"max_points": math.nan}, ["max_points"]),
    (Limits, {"point_prices": {"gpt-image-1": math.inf}}, ["point_prices"]),
    (Limits, {"point_prices": {"gpt-image-1": math.nan}}, ["point_prices"]),
    (Limits, {"point_prices": {"gpt-image-1": True}}, ["point_prices"]),
    (PollPolicy, {"max_interval": math.inf}, ["max_interval"]),
    (PollPolicy, {"first_poll_delay": math.inf}, ["first_poll_delay"]),
    (PollPolicy, {"age_fraction": math.inf}, ["age_fraction"]),
    (PollPolicy, {"batch_fill_horizon": math.inf}, ["batch_fill_horizon"]),
    (PollPolicy, {"unknown_key_grace": math.inf}, ["unknown_key_grace"]),
    (PollPolicy, {"max_estimate_wait": math.inf}, ["max_estimate_wait"]),
    (PollPolicy, {"queue_position_seconds": math.inf}, ["queue_position_seconds"]),
    (PollPolicy, {"min_interval": True}, ["min_interval"]),
    (PollPolicy, {"age_fraction": False}, ["age_fraction"]),
    (PollPolicy, {"min_interval": "0.5"}, ["min_interval"]),
    (Timeouts, {"request": math.inf}, ["request"]),
    (Timeouts, {"close": math.inf}, ["close"]),
    (Timeouts, {"connect": math.inf}, ["connect"]),
    (Timeouts, {"job": math.inf}, ["job"]),
    (Timeouts, {"job": 10**400}, ["job"]),  # no float holds it: a deadline could not be reckoned
    (Timeouts, {"request": True}, ["request"]),
    (RetryPolicy, {"initial_wait": math.nan}, ["initial_wait"]),
    (RetryPolicy, {"max_wait": math.nan}, ["max_wait"]),
    (RetryPolicy, {"max_wait": math.inf}, ["max_wait"]),
    (RetryPolicy, {"max_attempts": 2.5}, ["max_attempts"]),
    (RetryPolicy, {"max_attempts": math.inf}, ["max_attempts"]),
    (RetryPolicy, {"max_attempts": True}, ["max_attempts"]),
    (RetryPolicy, {"initial_wait": "x"}, ["initial_wait"]),
    (RetryPolicy, {"max_wait": None}, ["max_wait"]),
    (RetryPolicy, {"max_wait": -1}, ["max_wait"]),
    (RetryPolicy, {"max_elapsed": math.inf}, ["max_elapsed"]),
    (DownloadPolicy, {"deadline": math.inf}, ["deadline"]),
    (DownloadPolicy, {"min_rate": math.inf}, ["min_rate"]),
    (DownloadPolicy, {"connect_timeout": True}, ["connect_timeout"]),
    (DownloadPolicy, {"rate_window": math.inf}, ["rate_window"]),
    (DownloadPolicy, {"max_redirects": 2.0}, ["max_redirects"]),
]


@pytest.mark.parametrize(
    ("policy", "kwargs", "fields"),
    BAD_POLICIES,
    ids=[f"{policy.__name__}-{kwargs!r}" for policy, kwargs, _ in BAD_POLICIES],
)
def test_a_bad_policy_value_is_refused_at_construction(
    policy: Policy, kwargs: dict[str, Any], fields: list[str]
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        policy(**kwargs)
    named = [f"{policy.__name__}.{field}" for field in fields]
    assert _names(caught.value) == named  # each bad field, and only those
    assert all(name in str(caught.value) for name in named)


GOOD_POLICIES: list[tuple[Policy, dict[str, Any]]] = [
    (Limits, {}),
    (
        Limits,
        {
            "max_connections": 1,
            "max_submits_per_second": 8,
            "max_in_flight": None,
            "max_points": 0,
            "point_prices": {"gpt-image-1": 8, "dall-e-3/1024x1024": 0.5},
        },
    ),
    (Limits, {"max_submits_per_second": 0.5, "max_in_flight": 2000, "max_points": 12.5}),
    (PollPolicy, {}),
    (PollPolicy, {"age_fraction": 0, "queue_position_seconds": 0, "batch_fill_horizon": 0}),
    (
        PollPolicy,
        {
            "first_poll_delay": 3600,
            "min_interval": 3600,
            "max_interval": 3600,
            "max_estimate_wait": 3600,
        },
    ),
    (Timeouts, {}),
    (Timeouts, {"job": 7 * 86_400, "request": 1, "connect": 0.5, "close": 600}),
    (RetryPolicy, {}),
    (RetryPolicy, {"initial_wait": 0, "max_wait": 0, "max_attempts": 1}),
    (DownloadPolicy, {}),
    (DownloadPolicy, {"deadline": None, "min_rate": None, "max_redirects": 0}),
]


@pytest.mark.parametrize(
    ("policy", "kwargs"),
    GOOD_POLICIES,
    ids=[f"{policy.__name__}-{kwargs!r}" for policy, kwargs in GOOD_POLICIES],
)
def test_documented_policy_values_still_work(policy: Policy, kwargs: dict[str, Any]) -> None:
    made = policy(**kwargs)
    assert all(getattr(made, name) == value for name, value in kwargs.items())


def test_wrapped_base64_is_refused_with_the_reason() -> None:
    # The `base64` tool's default output (76 columns): the rule read as if it were not base64.
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(200)).decode()
    wrapped = "\n".join(png[start : start + 76] for start in range(0, len(png), 76))
    with pytest.raises(InvalidRequestError) as info:
        EditRequest.build({"prompt": "x", "model": "gpt-image-1", "image": [wrapped]})
    assert info.value.field == "image[0]" and "no line breaks" in info.value.rule


async def test_an_image_index_or_a_download_of_another_type_is_named(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """``job.image("0")`` raised a bare TypeError, ``job.image(True)`` took True for 1, and
    ``client.download(None, ...)`` an AttributeError: each is now named, as fields are."""
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(**CAT, n=2)
        for index in ("0", 1.0, True, None):
            with pytest.raises(InvalidRequestError) as caught:
                await job.image(index)  # type: ignore[arg-type]
            assert _names(caught.value) == ["index"]
        for image in (None, "https://example.com/a.png", {"url": "https://example.com/a.png"}):
            with pytest.raises(InvalidRequestError) as caught:
                await client.download(image, tmp_path / "a.{ext}")  # type: ignore[arg-type]
            assert _names(caught.value) == ["image"]
        assert list(tmp_path.iterdir()) == []
        assert (await job.image(1)).index == 1
        job.cancel()
