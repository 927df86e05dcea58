"""Server text quoting a URL shows it as an image's repr shows its URL: no query, no password.

A signed image URL (``?X-Amz-Signature=...``) fetches the image for anyone holding it; a
gateway's ``fail_message`` or error message that quotes one went verbatim into the error's
text, its attributes, the job's span status and the reprs that show the error, while an
image's own repr hid the query. Every server text goes through ``snippet``, which hides them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from wujie_async import (
    BusinessError,
    JobFailedError,
    RetryPolicy,
    WujieClient,
    WujieError,
    snippet,
)

from .conftest import FAST_POLL, INSTANT_RETRY
from .hostile import _serve, scripted_gateway, throwaway_credentials
from .otel_support import Otel, otel

__all__ = ["otel"]  # the fixture, imported for its use here
pytestmark = pytest.mark.anyio

TOKEN = "X-Amz-Signature=5d41402abc4b2a76b9719d911017c592&X-Amz-Credential=AKIAEXAMPLE"
PASSWORD = "s3cr3t-pw"
SIGNED = f"https://cdn.example.com/img/K00000/0.png?{TOKEN}"
WITH_PASSWORD = f"https://user:{PASSWORD}@cdn.example.com/img/0.png#frag"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            f"bad at {SIGNED} (retry)",
            "bad at https://cdn.example.com/img/K00000/0.png?<hidden> (retry)",
        ),
        (f"see {WITH_PASSWORD}", "see https://<hidden>@cdn.example.com/img/0.png#<hidden>"),
        (
            '{"url":"https:\\/\\/cdn\\/a.png?Signature=abc&Expires=1"}',
            '{"url":"https:\\/\\/cdn\\/a.png?<hidden>"}',
        ),
        (
            f"<p>moved to <a href='{SIGNED}'>{SIGNED}</a></p>",
            "moved to https://cdn.example.com/img/K00000/0.png?<hidden>",
        ),
        (
            # A password holding an unescaped '@': the host follows the last '@', as for
            # urllib and yarl (it showed "<hidden>@ss@cdn...", the password's tail).
            "see https://user:p@ss@cdn.example.com/a.png",
            "see https://<hidden>@cdn.example.com/a.png",
        ),
        ("no url here? fine", "no url here? fine"),
        ("https://cdn.example.com/plain.png", "https://cdn.example.com/plain.png"),
        ("mail me at someone@example.com?", "mail me at someone@example.com?"),
    ],
)
def test_snippet_hides_the_query_and_password_of_quoted_urls(text: str, shown: str) -> None:
    assert snippet(text) == shown
    assert snippet(snippet(text)) == shown  # shown again (a message of a message): the same


def _no_secret(texts: Iterator[str] | list[str]) -> None:
    for text in texts:
        assert "X-Amz-Signature" not in text and "5d41402abc" not in text, text
        assert PASSWORD not in text, text


def _reachable(error: BaseException) -> Iterator[str]:
    yield str(error)
    yield repr(error)
    yield from (repr(value) for value in vars(error).values())
    yield from getattr(error, "__notes__", ())


async def test_a_fail_message_quoting_a_signed_url_is_shown_without_its_query(
    otel: Otel,
) -> None:
    def script(keys: list[str]) -> list[dict[str, Any]]:
        fail = {"fail_code": 20110001, "fail_message": f"bad at {SIGNED} and {WITH_PASSWORD}"}
        return [{"key": key, "status": 3, "images": [], "fail_message": fail} for key in keys]

    async with scripted_gateway(script) as gateway:
        client = WujieClient(
            throwaway_credentials(),
            base_url=gateway.base_url,
            poll=FAST_POLL,
            retry=INSTANT_RETRY,
        )
        async with client:
            job = await client.images.submit(prompt="x", model="dall-e-2")
            with pytest.raises(JobFailedError) as info:
                await job
            reprs = [repr(job), repr(job.snapshot())]
    error = info.value
    assert error.fail_message is not None
    assert "https://cdn.example.com/img/K00000/0.png?<hidden>" in error.fail_message
    assert "https://<hidden>@cdn.example.com/img/0.png#<hidden>" in str(error)
    _no_secret([*_reachable(error), *reprs])
    spans = otel.spans("wujie.job")
    assert spans
    for span in spans:
        assert span.status.description and "<hidden>" in span.status.description
        _no_secret([str(span.status.description), json.dumps(dict(span.attributes or {}))])
        for event in span.events:
            _no_secret([json.dumps(dict(event.attributes or {}))])


@asynccontextmanager
async def _refusing_gateway(status: int, body: dict[str, Any]) -> AsyncIterator[str]:
    async def reply(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/{tail:.*}", reply)
    async with _serve(app) as origin:
        yield origin


@pytest.mark.parametrize("status", [200, 400, 503])
async def test_an_error_message_quoting_a_signed_url_is_shown_without_its_query(
    status: int,
) -> None:
    said = f"image {SIGNED} refused; fetched from {WITH_PASSWORD}"
    body = {"code": "20010001", "message": said, "data": {"url": SIGNED}}
    async with _refusing_gateway(status, body) as origin:
        client = WujieClient(
            throwaway_credentials(),
            base_url=origin,
            retry=RetryPolicy(max_attempts=1, initial_wait=0),
        )
        async with client:
            with pytest.raises(WujieError) as info:
                await client.images.submit(prompt="x", model="dall-e-2")
    error = info.value
    if status == 200:
        assert isinstance(error, BusinessError)
    chain = [error, error.__cause__, error.__context__]
    texts = [text for item in chain if item is not None for text in _reachable(item)]
    assert any("cdn.example.com/img/K00000/0.png?<hidden>" in text for text in texts), texts
    _no_secret(texts)
