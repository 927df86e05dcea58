"""Child process of the fleet's cut-off save test: a fleet member (the test's fleet options)
submits a job, says ``saving KEY``, then saves it until it is killed (the test's image server
holds the images)."""

from __future__ import annotations

import asyncio
import sys

from wujie_async import WujieClient
from wujie_async.fleet import RedisFleet
from wujie_async.testing import poll_for

from .hostile import throwaway_credentials


async def main(base_url: str, redis_url: str, name: str, folder: str) -> None:
    fleet = RedisFleet(redis_url, name=name, member_timeout=1.0, lease_seconds=0.5)
    async with WujieClient(
        throwaway_credentials(), base_url=base_url, fleet=fleet, poll=poll_for(0.01)
    ) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2", n=2)
        sys.stdout.write(f"saving {job.key}\n")
        sys.stdout.flush()
        await job.save(folder)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
