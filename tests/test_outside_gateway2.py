"""The library and the command line against ``tests/outside_gateway2.py``: a gateway written
from API.md alone on raw sockets, varied as real gateways and proxies vary (compression,
chunking, connection handling, HTTP/1.0, number shapes, repeats, faults).

Each variation counts: submits the server accepted against the jobs the client accepted
(nothing lost, nothing paid twice), images saved with the server's sha256, no job unresolved.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from wujie_async import Timeouts, WujieClient

from .cli_helpers import (
    CLEAN_ENV,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
)
from .conftest import INSTANT_RETRY
from .outside_gateway import POLL
from .outside_gateway2 import Gateway2, gateway2

pytestmark = pytest.mark.anyio


async def drive(
    gateway: Gateway2, client: WujieClient, out: Path, jobs: int = 8, spacing: float | None = None
) -> list[Any]:
    """Submit ``jobs`` jobs of 2 images, save each; what each ended as."""

    async def one(index: int) -> Any:
        job = await client.images.submit(prompt=f"fox {index}", model="gpt-image-1", n=2)
        saved = await job.save(out)
        for image in saved:
            assert hashlib.sha256(image.path.read_bytes()).hexdigest() == image.sha256
            assert gateway.sha256_of(job.key, image.index) == image.sha256
        return job.key, len(saved)

    tasks = []
    for index in range(jobs):
        tasks.append(asyncio.ensure_future(one(index)))
        if spacing is not None:
            await asyncio.sleep(spacing)
    async with asyncio.timeout(30):
        return await asyncio.gather(*tasks, return_exceptions=True)


VARIATIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "gzip": {"encoding": "gzip"},
    "gzip-chunked-in-pieces": {"encoding": "gzip", "chunked": True, "pieces": 7},
    "zlib-byte-by-byte": {"encoding": "zlib", "pieces": 1},
    "raw-deflate-chunked": {"encoding": "rawdeflate", "chunked": True, "pieces": 3},
    "connection-close": {"close_each": True},
    "silent-close-spaced": {"silent_close": True, "spacing": 0.01},
    "keep-alive-0.2-spaced": {"keep_alive": 0.2, "spacing": 0.1},
    "keep-alive-0.5-gzip": {"keep_alive": 0.5, "encoding": "gzip"},
    "http10": {"http10": True},
    "http10-no-length-gzip": {"http10": True, "no_length": True, "encoding": "gzip"},
    "estimate-float": {"estimate": "float"},
    "estimate-text": {"estimate": "str"},
    "estimate-missing": {"estimate": "missing"},
    "no-progress-fields": {"progress_fields": False},
    "repeated-entries": {"repeat_entries": True},
    "entries-not-asked": {"stray_entries": True},
    "inline-b64-gzip": {"inline": True, "encoding": "gzip"},
    "429-every-3rd": {"submit_429_every": 3},
    "5xx-burst": {"poll_5xx_burst": 4},
    "429-burst-on-batch-calls": {"poll_429_burst": 2},
    "batch-reply-cut": {"poll_cut_every": 2},
}


@pytest.mark.parametrize("name", list(VARIATIONS))
async def test_every_job_lands_once_with_its_images(name: str, tmp_path: Path) -> None:
    settings = dict(VARIATIONS[name])
    spacing = settings.pop("spacing", None)
    started = time.monotonic()
    async with gateway2(**settings) as (gateway, creds):
        async with WujieClient(
            creds,
            base_url=gateway.base_url,
            poll=POLL,
            retry=INSTANT_RETRY,
            timeouts=Timeouts(job=20, request=5, close=5),
        ) as client:
            ended = await drive(gateway, client, tmp_path, spacing=spacing)
            assert all(job.done() for job in client.jobs())
    assert not [e for e in ended if isinstance(e, BaseException)], ended
    assert sorted(key for key, _ in ended) == sorted(gateway.accepted)  # none lost, none twice
    assert all(count == 2 for _, count in ended)
    assert gateway.auth_failures == 0
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("label", ["gzip", "deflate"])
async def test_a_refusal_labelled_compressed_but_sent_plain_is_a_refusal(
    label: str, tmp_path: Path
) -> None:
    # A proxy's "429 Too Many Requests" in plain text, labelled gzip (or deflate) as the
    # proxy labels everything. The body did not inflate, and the 429 was lost to it: a
    # ProtocolError, which a submit takes for "may have been accepted" (SubmitUncertainError,
    # never resent), though the gateway refused it outright.
    async with gateway2(submit_429_every=2, refusal_text_mislabelled=True, label=label) as (
        gateway,
        creds,
    ):
        async with WujieClient(
            creds,
            base_url=gateway.base_url,
            poll=POLL,
            retry=INSTANT_RETRY,
            timeouts=Timeouts(job=20, request=5, close=5),
        ) as client:
            ended = await drive(gateway, client, tmp_path, jobs=4, spacing=0.0)
    assert not [e for e in ended if isinstance(e, BaseException)], ended
    assert sorted(key for key, _ in ended) == sorted(gateway.accepted)
    assert gateway.submits_seen > len(gateway.accepted) == 4


@pytest.mark.parametrize(
    "settings",
    [
        {"encoding": "gzip", "chunked": True, "pieces": 5, "submit_429_every": 4},
        {"keep_alive": 0.2, "encoding": "rawdeflate", "estimate": "str", "poll_5xx_burst": 2},
        {"http10": True, "no_length": True, "repeat_entries": True, "stray_entries": True},
    ],
)
async def test_bulk_saves_every_line_once(settings: dict[str, Any], tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    lines = 6
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"fox {index}", "model": "gpt-image-1", "n": 2}) + "\n"
            for index in range(lines)
        )
    )
    out = tmp_path / "out"
    async with gateway2(**settings) as (gateway, creds):
        env = CLEAN_ENV | {
            "WUJIE_APP_ID": creds.app_id,
            "WUJIE_PRIVATE_KEY": creds.private_key,
            "WUJIE_BASE_URL": gateway.base_url,
        }
        journal = tmp_path / "journal.sqlite"
        args = ("bulk", str(rows), "-o", str(out), "--journal", str(journal), "--json")
        code, stdout, err = await cli(*args, env=env, process=True)
        assert code == 0, err
        again, _, err_again = await cli(*args, env=env, process=True)
        assert again == 0, err_again
    assert len(gateway.accepted) == lines  # the rerun sent nothing again
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    saved = [row for row in manifest if row["status"] == "saved"]
    assert len(saved) == 2 * lines
    assert {row["key"] for row in saved} == set(gateway.accepted)
    for row in saved:
        data = (out / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert gateway.sha256_of(row["key"], row["index"]) == row["sha256"]
    assert json.loads(stdout)["outcomes"]["saved"] == lines
