"""A worker that takes generation requests from a Redis Stream and puts results on another.

From the clone, in the README's venv with the fleet extra
(``python3 -m venv .venv && .venv/bin/pip install -q -e '.[fleet]'``), with a redis-server
running::

    .venv/bin/python examples/queue_consumer.py --redis redis://127.0.0.1:6379/0 \
        --journal worker.sqlite

Many workers, one fleet (any number of processes and machines, one Redis)::

    .venv/bin/python examples/queue_consumer.py --redis redis://127.0.0.1:6379/0 --fleet acct-1

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

In fleet mode (``--fleet NAME``) the workers share one rate limit, one poller and one journal
in Redis, and a worker's message is acknowledged only once its result is published. A worker
killed mid-job leaves its message pending: another worker reclaims it (XAUTOCLAIM, once it
has been idle longer than the fleet's member timeout, so its owner is dead), claims the dead
worker's journaled jobs (``client.resume()``: each goes to exactly one worker), and finds the
message's submit with ``find_submit(message id)``: it follows the key already paid for and
never submits again. Whoever owns a job's journal row publishes its result, so it is
published once (a worker killed between publishing and acknowledging is the one case that
can publish twice: at least once, never lost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from _connect import connect

from wujie_async import ImageJob, InvalidRequestError, SubmitUncertainError, WujieClient, WujieError

REQUESTS, RESULTS, GROUP = "wujie:requests", "wujie:results", "wujie-workers"


class Worker:
    """Moves requests from one stream to results on another through one WujieClient."""

    def __init__(
        self,
        redis: aioredis.Redis,
        client: WujieClient,
        name: str,
        *,
        reclaim_idle_ms: int | None = None,
    ) -> None:
        self.redis = redis
        self.client = client
        self.name = name
        # Fleet mode: messages idle this long are taken over from (dead) workers.
        self.reclaim_idle_ms = reclaim_idle_ms
        self._waiters: set[asyncio.Task[None]] = set()
        self._followed: set[str] = set()

    @property
    def fleet(self) -> bool:
        """True when the client is a member of a fleet."""
        return self.client.fleet_member is not None

    async def run(self, stop: asyncio.Event, *, block_ms: int = 200) -> None:
        """Consume until ``stop`` is set, then wait for the jobs already taken on."""
        try:
            await self.redis.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._consume("0", block_ms=None)  # messages handed to us before, unacknowledged
        await self._resume()  # jobs a previous run (or, in a fleet, a dead worker) left
        next_reclaim = 0.0
        while not stop.is_set():
            await self._consume(">", block_ms=block_ms)
            if self.reclaim_idle_ms is not None and time.monotonic() >= next_reclaim:
                next_reclaim = time.monotonic() + self.reclaim_idle_ms / 2000
                await self._reclaim(self.reclaim_idle_ms)
        await asyncio.gather(*self._waiters)

    async def _resume(self) -> None:
        jobs = await self.client.resume()
        if not jobs:
            return
        # Which message each job came from: its submit's tag.
        tags = {e.job_key: e.tag for e in await self.client.journal_entries("accepted")}
        for job in jobs:
            self._follow(job, tags.get(job.key))

    async def _reclaim(self, idle_ms: int) -> None:
        """Take over messages idle for ``idle_ms`` (their worker died): XAUTOCLAIM."""
        await self._resume()  # first claim the dead workers' jobs (each to one worker)
        start = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                REQUESTS, GROUP, self.name, min_idle_time=idle_ms, start_id=start, count=64
            )
            start, messages = reply[0], reply[1]
            for message_id, fields in messages:
                await self._handle(message_id.decode(), fields or {})
            if not messages or start in (b"0-0", "0-0"):
                return

    async def _consume(self, start: str, *, block_ms: int | None) -> None:
        replies = await self.redis.xreadgroup(
            GROUP, self.name, {REQUESTS: start}, count=64, block=block_ms
        )
        for _stream, messages in replies or []:
            for message_id, fields in messages:
                await self._handle(message_id.decode(), fields)

    async def _handle(self, message_id: str, fields: dict[bytes, bytes]) -> None:
        previous = await self.client.find_submit(message_id)
        if self.fleet and previous is not None and previous.job_key:
            if previous.job_key in self._followed:
                return  # ours (claimed from a dead worker): its result acknowledges it
            if previous.state == "accepted":
                return  # a live worker owns the job and acknowledges it with its result
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
        # The key is journaled (submit() returned): now the message may go (in a fleet, once
        # its result is out: until then a dead worker's message can be reclaimed).
        await self._publish(message_id, "submitted", key=job.key)
        if not self.fleet:
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
        if self.fleet and message_id is not None:
            await self.redis.xack(REQUESTS, GROUP, message_id)

    async def _publish(self, message_id: str | None, state: str, **details: Any) -> None:
        entry = {"message_id": message_id or "", "state": state, **details}
        await self.redis.xadd(RESULTS, {"result": json.dumps(entry)})


async def main(args: argparse.Namespace) -> None:
    redis = aioredis.from_url(args.redis)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # finish what was taken on, then exit
        loop.add_signal_handler(signum, stop.set)
    try:
        if args.fleet:
            from wujie_async.fleet import RedisFleet

            fleet = RedisFleet(args.redis, name=args.fleet, member_timeout=args.member_timeout)
            name = args.name or f"{socket.gethostname()}-{os.getpid()}"
            # A message is reclaimed only after its worker is surely dead (heartbeat expired).
            idle_ms = round(args.member_timeout * 1000) + 1000
            async with connect(fleet=fleet) as client:
                await Worker(redis, client, name, reclaim_idle_ms=idle_ms).run(stop)
        else:
            async with connect(journal=args.journal) as client:
                await Worker(redis, client, args.name or "worker-1").run(stop)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--journal", default="worker.sqlite")
    parser.add_argument("--name", help="consumer name (default worker-1, or host-pid)")
    parser.add_argument("--fleet", default=None, help="fleet name: share one Redis-backed fleet")
    parser.add_argument("--member-timeout", type=float, default=30.0)
    asyncio.run(main(parser.parse_args()))
