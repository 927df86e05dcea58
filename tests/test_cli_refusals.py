"""What ``bulk`` says of a refusal or a failed job the gateway gave no message for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .cli_helpers import (
    CLEAN_ENV,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
)
from .helpers import GENERATIONS
from .hostile import scripted_gateway, serve, throwaway_credentials

pytestmark = pytest.mark.anyio

_CODES = {"race": "20010018", "poor words": "20110001", "odd": "30000001"}


def _env(base_url: str) -> dict[str, str]:
    creds = throwaway_credentials()
    return CLEAN_ENV | {
        "WUJIE_APP_ID": creds.app_id,
        "WUJIE_PRIVATE_KEY": creds.private_key,
        "WUJIE_BASE_URL": base_url,
    }


async def _refuse(request: web.Request) -> web.Response:
    code = _CODES[(await request.json())["prompt"]]
    return web.json_response({"code": code, "message": "", "data": None})


@pytest.mark.long
async def test_a_refusal_without_a_message_says_what_its_code_means(tmp_path: Path) -> None:
    """A refusal whose message was empty read `business error | HTTP 200 | code 20010018`
    in the outcome and the manifest: the code alone, which a user had to look up."""
    app = web.Application()
    app.router.add_post(GENERATIONS, _refuse)
    rows = tmp_path / "rows.txt"
    rows.write_text("".join(f"{prompt}\n" for prompt in _CODES))
    out = tmp_path / "out"
    async with serve(app) as origin:
        code, _, err = await cli("bulk", str(rows), "-o", str(out), env=_env(origin))
    assert code == 1, err
    said = {r["prompt"]: r["error"] for r in manifest(out)}
    assert said["race"].startswith("lock race (safe to resubmit) (the gateway gave no message)")
    assert said["poor words"].startswith("prompt contains sensitive words (the gateway gave no")
    assert said["odd"].startswith("the gateway gave no message |"), said
    assert "line 1: rejected: lock race (safe to resubmit)" in err, err
    assert "business error" not in err, err


@pytest.mark.long
async def test_a_failed_job_without_a_message_says_what_its_code_means(tmp_path: Path) -> None:
    def failed(keys: list[str]) -> list[dict[str, Any]]:
        fail = {"fail_code": 20110001, "fail_message": ""}
        return [{"key": key, "status": 3, "images": [], "fail_message": fail} for key in keys]

    rows = tmp_path / "rows.txt"
    rows.write_text("a fox\n")
    out = tmp_path / "out"
    async with scripted_gateway(failed) as gateway:
        code, _, err = await cli("bulk", str(rows), "-o", str(out), env=_env(gateway.base_url))
    assert code == 1, err
    [record] = manifest(out)
    assert record["status"] == "failed", record
    assert "(fail_code=20110001): prompt contains sensitive words" in record["error"], record
