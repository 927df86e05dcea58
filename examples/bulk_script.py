"""Bulk generation from a prompts file: submit them all, handle results in completion order.

From the clone, in the README's venv (``python3 -m venv .venv && .venv/bin/pip install -q -e .``)::

    .venv/bin/python examples/bulk_script.py examples/prompts-1000.txt --out out/bulk

Without WUJIE_APP_ID and WUJIE_PRIVATE_KEY it runs against an embedded emulator.

The client bounds what is on the wire (Limits); one poller asks about every job in shared
batch calls; `as_completed` hands back jobs as they finish, and `job.save()` saves each job's
images as soon as it is done, through the client's downloader (see docs/guides/saving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from _connect import connect

from wujie_async import ImageJob, Limits, WujieError


def read_prompts(prompts_file: Path, limit: int | None) -> list[str]:
    lines = prompts_file.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")][:limit]


async def main(prompts: list[str], out: Path) -> int:
    started = time.monotonic()
    done = 0
    async with connect(limits=Limits(max_in_flight=500)) as client:
        submits = [
            client.images.submit(prompt=prompt, model="dall-e-2", size="256x256")
            for prompt in prompts
        ]
        outcomes = await asyncio.gather(*submits, return_exceptions=True)
        jobs: list[ImageJob] = []
        for prompt, outcome in zip(prompts, outcomes, strict=True):
            if isinstance(outcome, ImageJob):
                jobs.append(outcome)
            else:
                print(f"submit failed for {prompt!r}: {outcome}")
        async for job in client.as_completed(jobs):
            try:
                # Checked URLs, a size cap, atomic files named {key}-{index}.{ext}.
                await job.save(out)
            except (WujieError, OSError) as exc:
                print(f"job {job.key} failed: {exc}")
                continue
            done += 1
        stats = client.stats
    print(
        f"{done} of {len(prompts)} jobs done in {time.monotonic() - started:.1f}s; "
        f"{stats.batch_calls} batch calls (mean fill {stats.mean_batch_fill:.1f} keys) "
        f"for {stats.submits} submits"
    )
    return 0 if done == len(prompts) else 1


if __name__ == "__main__":
    # The docstring as written: its command lines stay lines a user can copy.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "prompts", type=Path, nargs="?", default=Path(__file__).parent / "prompts-1000.txt"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bulk"))
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(main(read_prompts(args.prompts, args.limit), args.out)))
