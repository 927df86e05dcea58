"""Child process of the cut-off save test: submits a job with a journal, then saves it until it
is killed (its image server holds the images)."""

from __future__ import annotations

import asyncio
import sys

from wujie_async import WujieClient
from wujie_async.testing import poll_for

from .hostile import throwaway_credentials


async def main(base_url: str, journal: str, folder: str) -> None:
    async with WujieClient(
        throwaway_credentials(), base_url=base_url, journal=journal, poll=poll_for(0.01)
    ) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2", n=2)
        sys.stdout.write(f"saving {job.key}\n")
        sys.stdout.flush()
        await job.save(folder)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
