"""Batch calls the gateway refused for the credentials (HTTP 401 or 403): a run that only
collects stops on them as a run that sends stops on a refused submit.

``resume``, or a re-run whose lines were all sent, sends nothing: it only asks the gateway about
its jobs. With credentials the gateway refuses (another account's key), every batch call
failed, and the jobs waited out their whole deadline (902 s), then ended "timed out", exit 1.
The client counts such calls (``client.stats.credentials_refused``); the run looks at the count
a few times a second and stops at the first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Final

from .. import AuthenticationError, WujieClient

LOOK_EVERY_S: Final = 0.25  # a stop within a second of the first refusal; a stats read each


@contextlib.asynccontextmanager
async def watching_refusals(
    client: WujieClient, refused: Callable[[AuthenticationError], None]
) -> AsyncIterator[None]:
    """Within the block, ``refused`` is called once the gateway has refused a batch call of
    ``client`` for the credentials."""

    async def watch() -> None:
        # Read as the progress display reads the stats: a count, with no event to wait on.
        seen = client.stats.credentials_refused
        while True:
            await asyncio.sleep(LOOK_EVERY_S)
            if client.stats.credentials_refused != seen:
                break
        refused(
            AuthenticationError(
                "the gateway refused the credentials on a batch-detail call (HTTP 401 or "
                "403): check the app id and private key, and the clock"
            )
        )

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
