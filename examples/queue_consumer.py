"""A worker that takes generation requests from a Redis Stream and puts results on another.

From the clone, in the README's venv with the fleet extra
(``python3 -m venv .venv && .venv/bin/pip install -q -e '.[fleet]'``), with a redis-server
running::

    .venv/bin/python examples/queue_consumer.py --redis redis://127.0.0.1:6379/0 \
        --journal worker.sqlite

Without ``--fleet``, a worker is ONE process per journal: its consumer name is tied to its
journal (host name and a hash of the journal's absolute path), so a restart with the same
journal takes over its own unacknowledged messages, and a process with another journal never
touches them. Two processes must not share a journal (the second is refused) or a ``--name``.
To scale out over processes and machines, use fleet mode::

    eval "$(.venv/bin/wujie-async emulator --background --print-env)"  # or the gateway's WUJIE_*
    .venv/bin/python examples/queue_consumer.py --redis redis://127.0.0.1:6379/0 --fleet acct-1

(Every member of a fleet talks to one gateway: without WUJIE_APP_ID/WUJIE_PRIVATE_KEY set, fleet
mode refuses to start, since each worker's own emulator would not know the others' jobs.)

Producers add entries to the stream ``wujie:requests`` with one field, ``request``: a JSON
generation request ({"prompt": ..., "model": ..., "n": ...}). Workers read them through the
consumer group ``wujie-workers`` and write to ``wujie:results`` one entry per job event
(``submitted``, then ``succeeded`` or ``failed``), each naming the request's message id.

Nothing is paid twice and nothing is lost:
* a message is acknowledged only once its final result (``succeeded``, ``failed``,
  ``invalid`` or ``uncertain``) is published; until then it stays in the worker's pending
  list;
* a message handed out again (the worker died, or publishing its result failed) is looked up
  in the journal by its message id first: if it was already sent, the worker attaches to that
  key (a poll, never a charge) instead of submitting again; if it got no reply, it is
  reported ``uncertain``, not resent;
* one process handles a message once at a time: a message it is already handling (handed to
  it twice, or found again in its pending list) is left to that handler;
* Redis going away (a restart, a failover) does not end a worker: it logs a WARNING and tries
  again every second, its jobs running on meanwhile;
* on start, the worker reads its whole pending list, then resumes every journaled job that had
  not finished; while it runs it reads its pending list again every ``--sweep-seconds``, so a
  submit the gateway refused (or could not be reached for) is tried again, and a result whose
  publishing failed is published.

A ``submitted`` or ``succeeded`` entry can be published twice for one message (a worker that
died after publishing and before acknowledging): results are at least once, never lost.

In fleet mode (``--fleet NAME``) the workers share one rate limit, one poller and one journal
in Redis. A worker killed mid-job leaves its message pending: another worker reclaims it
(XAUTOCLAIM, once it has been idle longer than the fleet's member timeout, so its owner is
dead), claims the dead worker's journaled jobs (``client.resume()``: each goes to exactly one
worker), and finds the message's submit with ``find_submit(message id)``: it follows the key
already paid for and never submits again. Whoever owns a job's journal row publishes its
result, so it is published once (a worker killed between publishing and acknowledging is the
one case that can publish twice: at least once, never lost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from _connect import connect

from wujie_async import ImageJob, InvalidRequestError, SubmitUncertainError, WujieClient, WujieError
from wujie_async.fleet import FleetUnavailableError

REQUESTS, RESULTS, GROUP = "wujie:requests", "wujie:results", "wujie-workers"
PAGE = 64  # messages per read
REDIS_RETRY_S = 1.0  # while Redis is away, the worker tries it again this often
log = logging.getLogger("queue_consumer")

# The message ids some Worker of this process is handling: from its first look in the journal
# until its result is published and the message acknowledged (or left pending). A second
# handler of one of them leaves it alone, so one process never submits a message twice at
# once (both would find no journal row) nor publishes its result twice. So a journal row in
# state ``intent`` seen by a handler is never a live submit of this process: a dead run's.
_handling: set[str] = set()


def default_name(journal: str) -> str:
    """A non-fleet worker's consumer name: its host and a short hash of its journal's path.

    A restart with the same journal reads the same pending list (the messages it took and did
    not finish); a process with another journal, which could not find their submits, never
    does.
    """
    digest = hashlib.sha256(os.path.abspath(journal).encode()).hexdigest()[:12]
    return f"{socket.gethostname()}-{digest}"


class Worker:
    """Moves requests from one stream to results on another through one WujieClient."""

    def __init__(
        self,
        redis: aioredis.Redis,
        client: WujieClient,
        name: str,
        *,
        reclaim_idle_ms: int | None = None,
        sweep_seconds: float = 5.0,
    ) -> None:
        self.redis = redis
        self.client = client
        self.name = name
        # Fleet mode: messages idle this long are taken over from (dead) workers.
        self.reclaim_idle_ms = reclaim_idle_ms
        # Not in a fleet: how often this consumer's own pending list is read again.
        self.sweep_seconds = sweep_seconds
        self._waiters: set[asyncio.Task[None]] = set()
        self._followed: set[str] = set()  # job keys whose results this worker will publish

    @property
    def fleet(self) -> bool:
        """True when the client is a member of a fleet."""
        return self.client.fleet_member is not None

    async def run(self, stop: asyncio.Event, *, block_ms: int = 200) -> None:
        """Consume until ``stop`` is set, then wait for the jobs already taken on.

        Redis going away (a restart, a failover) does not end the run: the worker logs a
        WARNING, tries again every ``REDIS_RETRY_S`` and carries on when Redis answers; its
        jobs meanwhile run on, and their results are published by the next sweep.
        """
        await self._create_group()
        await self._sweep()  # messages handed to us before, unacknowledged
        await self._resume()  # jobs a previous run (or, in a fleet, a dead worker) left
        next_reclaim = next_sweep = time.monotonic() + self.sweep_seconds
        while not stop.is_set():
            try:
                await self._consume(">", block_ms=block_ms)
                if self.reclaim_idle_ms is not None:
                    if time.monotonic() >= next_reclaim:
                        next_reclaim = time.monotonic() + self.reclaim_idle_ms / 2000
                        await self._reclaim(self.reclaim_idle_ms)
                elif time.monotonic() >= next_sweep:
                    await self._sweep()
                    next_sweep = time.monotonic() + self.sweep_seconds
            except (aioredis.RedisError, FleetUnavailableError) as exc:
                log.warning("Redis unavailable (%s); trying again in %gs", exc, REDIS_RETRY_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), REDIS_RETRY_S)
                if "NOGROUP" in str(exc):  # a Redis that lost the stream (no persistence)
                    with contextlib.suppress(aioredis.RedisError):
                        await self._create_group()
        await asyncio.gather(*self._waiters)

    async def _create_group(self) -> None:
        try:
            await self.redis.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _resume(self) -> None:
        jobs = await self.client.resume()
        if not jobs:
            return
        # Which message each job came from: its submit's tag.
        tags = {e.job_key: e.tag for e in await self.client.journal_entries("accepted")}
        for job in jobs:
            tag = tags.get(job.key)
            if tag is None:
                self._follow(job, None)
            elif tag not in _handling:  # else its handler attaches to this job and reports it
                _handling.add(tag)
                self._follow(job, tag)

    async def _reclaim(self, idle_ms: int) -> None:
        """Take over messages idle for ``idle_ms`` (their worker died): XAUTOCLAIM."""
        await self._resume()  # first claim the dead workers' jobs (each to one worker)
        start = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                REQUESTS, GROUP, self.name, min_idle_time=idle_ms, start_id=start, count=PAGE
            )
            start, messages = reply[0], reply[1]
            for message_id, fields in messages:
                await self._handle(message_id.decode(), fields or {})
            if not messages or start in (b"0-0", "0-0"):
                return

    async def _sweep(self) -> None:
        """Handle this consumer's whole pending list, page by page (those already being
        handled in this process are left to their handlers)."""
        after = "0"
        while (last := await self._consume(after, block_ms=None)) is not None:
            after = last

    async def _consume(self, start: str, *, block_ms: int | None) -> str | None:
        """Handle one read of up to PAGE messages after ``start``; the last id read, if any."""
        replies = await self.redis.xreadgroup(
            GROUP, self.name, {REQUESTS: start}, count=PAGE, block=block_ms
        )
        last = None
        for _stream, messages in replies or []:
            for message_id, fields in messages:
                last = message_id.decode()
                await self._handle(last, fields or {})  # a deleted entry has no fields
        return last

    async def _handle(self, message_id: str, fields: dict[bytes, bytes]) -> None:
        if message_id in _handling:
            return  # being handled in this process: its handler publishes and acknowledges
        _handling.add(message_id)
        job = None
        try:
            job = await self._job_for(message_id, fields)
        except (aioredis.RedisError, FleetUnavailableError) as exc:
            log.warning("message %s left pending (Redis: %s)", message_id, exc)
        finally:
            if job is None:
                _handling.discard(message_id)
        if job is not None:
            self._follow(job, message_id)

    async def _job_for(self, message_id: str, fields: dict[bytes, bytes]) -> ImageJob | None:
        """The message's job (submitted now, or attached to its journaled key), or None once
        the message is dealt with otherwise (a final result published, or left pending)."""
        previous = await self.client.find_submit(message_id)
        if self.fleet and previous is not None and previous.job_key:
            if previous.state == "accepted":
                return None  # a live worker owns the job and acknowledges it with its result
        if previous is not None and previous.job_key:
            # Paid for already (by an earlier run, or before a publish failed): a poll only.
            return self.client.images.attach(previous.job_key, n=previous.request.get("n") or 1)
        if previous is not None and previous.state in ("intent", "uncertain"):
            # No handler in this process has it (see _handling): a dead run's submit.
            error = previous.error or "no reply recorded"
            await self._finish(message_id, "uncertain", error=error)
            return None
        try:
            request = json.loads(fields.get(b"request", b""))
            job = await self.client.images.submit(**request, tag=message_id)
        except (ValueError, TypeError, InvalidRequestError) as exc:
            await self._finish(message_id, "invalid", error=str(exc))
            return None
        except SubmitUncertainError as exc:
            await self._finish(message_id, "uncertain", error=str(exc))
            return None
        except WujieError:
            return None  # refused or unreachable: left pending, tried again by the sweep
        # The key is journaled (submit() returned); the message stays pending until the
        # job's result is out, so a crash before that finds the key again.
        await self._publish(message_id, "submitted", key=job.key)
        return job

    def _follow(self, job: ImageJob, message_id: str | None) -> None:
        if job.key in self._followed:
            if message_id is not None:
                _handling.discard(message_id)
            return
        self._followed.add(job.key)
        task = asyncio.create_task(self._report(job, message_id))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    async def _report(self, job: ImageJob, message_id: str | None) -> None:
        try:
            try:
                result = await job
            except WujieError as exc:
                await self._finish(message_id, "failed", key=job.key, error=str(exc))
            else:
                urls = [image.url for image in result.images]
                await self._finish(message_id, "succeeded", key=job.key, images=urls)
        except aioredis.RedisError as exc:
            # Never lost: the message stays pending; the next sweep (or a restart) attaches
            # to the journaled key and publishes again.
            log.warning(
                "the result of message %s is not published yet (Redis: %s)", message_id, exc
            )
        finally:
            self._followed.discard(job.key)
            if message_id is not None:
                _handling.discard(message_id)

    async def _finish(self, message_id: str | None, state: str, **details: Any) -> None:
        """Publish a message's final result, then acknowledge the message."""
        await self._publish(message_id, state, **details)
        if message_id is not None:
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
            name = args.name or default_name(args.journal)
            async with connect(journal=args.journal) as client:
                await Worker(redis, client, name, sweep_seconds=args.sweep_seconds).run(stop)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    # The docstring as written: its command lines stay lines a user can copy.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--journal", default="worker.sqlite")
    parser.add_argument(
        "--name", help="consumer name (default: host and a hash of the journal's path; host-pid)"
    )
    parser.add_argument("--fleet", default=None, help="fleet name: share one Redis-backed fleet")
    parser.add_argument("--member-timeout", type=float, default=30.0)
    parser.add_argument(
        "--sweep-seconds",
        type=float,
        default=5.0,
        help="without --fleet: how often pending messages are retried",
    )
    asyncio.run(main(parser.parse_args()))
