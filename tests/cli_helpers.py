"""Running ``wujie-async`` and a standalone emulator as real processes, as a user would."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import stop_process

CLEAN_ENV = {name: value for name, value in os.environ.items() if not name.startswith("WUJIE_")} | {
    "PYTHONUNBUFFERED": "1"
}
FAST = ("--emulator-time-scale", "0.01")


async def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 50, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run ``python -m wujie_async ARGS``; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async", *args, env=env or CLEAN_ENV,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Served:
    """A standalone emulator process and the environment that points at it."""

    env: dict[str, str]
    base_url: str

    async def stats(self) -> dict[str, Any]:
        origin = self.base_url.removesuffix("/wj-open/v1")
        async with aiohttp.ClientSession() as http, http.get(f"{origin}/_emulator/stats") as r:
            return await r.json()  # type: ignore[no-any-return]


@asynccontextmanager
async def served_emulator(tmp_path: Path, *flags: str) -> AsyncIterator[Served]:
    """``wujie-async emulator --port 0`` with ``flags``; yields its environment."""
    creds_file = tmp_path / "creds.json"
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async", "emulator", "--port", "0",
        "--credentials-out", str(creds_file), "--time-scale", "0.01", *flags,
        stdout=asyncio.subprocess.PIPE, env=CLEAN_ENV,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        await asyncio.wait_for(server.stdout.readline(), 20)
        creds = json.loads(creds_file.read_text())
        env = CLEAN_ENV | {
            "WUJIE_APP_ID": creds["app_id"],
            "WUJIE_PRIVATE_KEY": creds["private_key"],
            "WUJIE_BASE_URL": creds["base_url"],
        }
        yield Served(env, creds["base_url"])
    finally:
        await stop_process(server)


def manifest(out: Path) -> list[dict[str, Any]]:
    """Every record of OUT/manifest.jsonl."""
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_outcomes(out: Path) -> dict[int, str]:
    """Each input line's last recorded status."""
    final: dict[int, str] = {}
    for record in manifest(out):
        final[int(record["line"])] = str(record["status"])
    return final
