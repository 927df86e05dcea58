"""Child process of the crash test: submits jobs with a journal until it is killed."""

from __future__ import annotations

import asyncio
import json
import sys

from wujie_async import Credentials, Limits, WujieClient


async def main(creds_path: str, journal: str, count: int) -> None:
    creds = json.loads(open(creds_path).read())
    credentials = Credentials(creds["app_id"], creds["private_key"])
    limits = Limits(max_concurrent_submits=4)
    async with WujieClient(
        credentials, base_url=creds["base_url"], journal=journal, limits=limits
    ) as client:
        jobs = await asyncio.gather(
            *(client.images.submit(prompt=f"crash {i}", model="dall-e-2") for i in range(count))
        )
        await asyncio.gather(*jobs)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
