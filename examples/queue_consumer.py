"""A worker that takes generation requests from a Redis Stream and puts results on another.

    python examples/queue_consumer.py --redis redis://127.0.0.1:6379/0 --journal worker.sqlite

Producers add entries to the stream ``wujie:requests`` with one field, ``request``: a JSON
generation request ({"prompt": ..., "model": ..., "n": ...}). Workers read them through the
consumer group ``wujie-workers`` and write to ``wujie:results`` one entry per job event
(``submitted``, then ``succeeded`` or ``failed``), each naming the request's message id.

Nothing is paid twice and nothing is lost:
* a message is acknowledged only after its job key is in the client's journal;
* a message handed out again (the worker died before acknowledging) is looked up in the
  journal by its message id first: if it was already sent, the worker attaches to that key
  instead of submitting again; if it got no reply, it is reported, not resent;
* on start, the worker resumes every journaled job that had not finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

import redis.asyncio as aioredis
from _connect import connect

from wujie_async import ImageJob, InvalidRequestError, SubmitUncertainError, WujieClient, WujieError

REQUESTS, RESULTS, GROUP = "wujie:requests", "wujie:results", "wujie-workers"


class Worker:
    """Moves requests from one stream to results on another through one WujieClient."""

    def __init__(self, redis: aioredis.Redis, client: WujieClient, name: str) -> None:
        self.redis = redis
        self.client = client
        self.name = name
        self._waiters: set[asyncio.Task[None]] = set()
        self._followed: set[str] = set()

    async def run(self, stop: asyncio.Event, *, block_ms: int = 200) -> None:
        """Consume until ``stop`` is set, then wait for the jobs already taken on."""
        try:
            await self.redis.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._consume("0", block_ms=None)  # messages handed to us before, unacknowledged
        for job in await self.client.resume():  # jobs a previous run had not finished
            self._follow(job, message_id=None)
        while not stop.is_set():
            await self._consume(">", block_ms=block_ms)
        await asyncio.gather(*self._waiters)

    async def _consume(self, start: str, *, block_ms: int | None) -> None:
        replies = await self.redis.xreadgroup(
            GROUP, self.name, {REQUESTS: start}, count=64, block=block_ms
        )
        for _stream, messages in replies or []:
            for message_id, fields in messages:
                await self._handle(message_id.decode(), fields)

    async def _handle(self, message_id: str, fields: dict[bytes, bytes]) -> None:
        previous = await self.client.find_submit(message_id)
        if previous is not None and previous.job_key:
            job = self.client.images.attach(previous.job_key, n=previous.request.get("n") or 1)
        elif previous is not None and previous.state in ("intent", "uncertain"):
            await self._publish(
                message_id, "uncertain", error=previous.error or "no reply recorded"
            )
            await self.redis.xack(REQUESTS, GROUP, message_id)
            return
        else:
            try:
                request = json.loads(fields.get(b"request", b""))
                job = await self.client.images.submit(**request, tag=message_id)
            except (ValueError, TypeError, InvalidRequestError) as exc:
                await self._publish(message_id, "invalid", error=str(exc))
                await self.redis.xack(REQUESTS, GROUP, message_id)
                return
            except SubmitUncertainError as exc:
                await self._publish(message_id, "uncertain", error=str(exc))
                await self.redis.xack(REQUESTS, GROUP, message_id)
                return
            except WujieError:
                return  # refused or unreachable: left unacknowledged, handed out again later
        # The key is journaled (submit() returned): now the message may go.
        await self._publish(message_id, "submitted", key=job.key)
        await self.redis.xack(REQUESTS, GROUP, message_id)
        self._follow(job, message_id)

    def _follow(self, job: ImageJob, message_id: str | None) -> None:
        if job.key in self._followed:
            return
        self._followed.add(job.key)
        task = asyncio.create_task(self._report(job, message_id))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    async def _report(self, job: ImageJob, message_id: str | None) -> None:
        try:
            result = await job
        except WujieError as exc:
            await self._publish(message_id, "failed", key=job.key, error=str(exc))
        else:
            urls = [image.url for image in result.images]
            await self._publish(message_id, "succeeded", key=job.key, images=urls)

    async def _publish(self, message_id: str | None, state: str, **details: Any) -> None:
        entry = {"message_id": message_id or "", "state": state, **details}
        await self.redis.xadd(RESULTS, {"result": json.dumps(entry)})


async def main(redis_url: str, journal: str, name: str) -> None:
    redis = aioredis.from_url(redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # finish what was taken on, then exit
        loop.add_signal_handler(signum, stop.set)
    try:
        async with connect(journal=journal) as client:
            await Worker(redis, client, name).run(stop)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--journal", default="worker.sqlite")
    parser.add_argument("--name", default="worker-1")
    args = parser.parse_args()
    asyncio.run(main(args.redis, args.journal, args.name))
