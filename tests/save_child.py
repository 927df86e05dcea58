"""Child process of the cut-off save tests: submits a job with a journal (a SQLite file, or a
fleet's on Redis), then saves it until it is killed (its image server holds the images).

    python -m tests.save_child BASE_URL FOLDER journal PATH
    python -m tests.save_child BASE_URL FOLDER fleet REDIS_URL FLEET_NAME
"""

from __future__ import annotations

import asyncio
import sys

from wujie_async import WujieClient
from wujie_async.fleet import RedisFleet
from wujie_async.testing import poll_for

from .hostile import throwaway_credentials


async def main(base_url: str, folder: str, kind: str, *where: str) -> None:
    if kind == "fleet":
        redis_url, name = where
        fleet = RedisFleet(redis_url, name=name, member_timeout=1.0, lease_seconds=0.5)
        client = WujieClient(
            throwaway_credentials(), base_url=base_url, fleet=fleet, poll=poll_for(0.01)
        )
    else:
        client = WujieClient(
            throwaway_credentials(), base_url=base_url, journal=where[0], poll=poll_for(0.01)
        )
    async with client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2", n=2)
        sys.stdout.write(f"saving {job.key}\n")
        sys.stdout.flush()
        await job.save(folder)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
