"""A fleet member in its own process, for the fleet tests. One JSON line per event on stdout.

Roles:
  limiter URL NAME RATE SECONDS         print ready, read a unix start time from stdin, acquire
                                        for SECONDS from then; print the times
  leader URL NAME LEASE                 hold shard 0's lease and act (a fenced registry read) in
                                        a loop
  journal URL NAME TIMEOUT N            journal N accepted submits, print ready, then heartbeat
  reports URL NAME N                    register N keys, print ready, read reports until all came
  poller URL NAME LEASE                 as shard 0's leader, answer every new key with a report
  member URL NAME CREDS N RATE LEASE TIMEOUT
                                        a WujieClient in fleet mode (CREDS: the emulator's
                                        --credentials-out file; RATE 0: none); then commands
                                        on stdin: go (submit N, await them, in the
                                        background), stall SECONDS (block the loop),
                                        resume, stats, quit
  single CREDS N RATE                   the same N jobs from one client without a fleet
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from wujie_async.fleet import RedisFleet
from wujie_async.fleet._errors import LeaseLostError
from wujie_async.fleet._exchange import Inbox, KeyInfo, KeyRegistry, Report, post_reports
from wujie_async.fleet._journal import RedisJournal
from wujie_async.fleet._lease import LeaderLease
from wujie_async.fleet._limiter import FleetLimiter
from wujie_async.fleet._membership import Membership, new_member_id


def say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def limiter(url: str, name: str, rate: str, seconds: str) -> None:
    async with RedisFleet(url, name=name) as fleet:
        limit = FleetLimiter(fleet, float(rate))
        say(ready=True)
        start = float(await asyncio.to_thread(sys.stdin.readline))
        await asyncio.sleep(max(0.0, start - time.time()))
        stop = start + float(seconds)
        times = []
        while time.time() < stop:
            await limit.acquire()
            times.append(time.time())
        say(times=times)


async def hold(lease: LeaderLease) -> None:
    """Take the lease whenever it is free, and keep it while it can."""
    while True:
        await lease.acquire()
        await lease.keep()


async def leader(url: str, name: str, lease_seconds: str) -> None:
    async with RedisFleet(url, name=name, lease_seconds=float(lease_seconds)) as fleet:
        lease = LeaderLease(fleet, 0, new_member_id())
        registry = KeyRegistry(fleet)
        holding = asyncio.create_task(hold(lease))
        say(member=lease.member_id)
        acting = False
        while not holding.done():
            await asyncio.sleep(0.01)
            try:
                fence = lease.require(0.1)
                await registry.read(0, fence, None)  # a fenced act
            except LeaseLostError:
                if acting:  # said once per lease lost
                    say(refused=True, t=time.time())
                acting = False
                continue
            acting = True
            say(act=int(fence.rsplit("|", 1)[1]), t=time.time())  # the token it acted with


async def journal(url: str, name: str, timeout: str, n: str) -> None:
    async with RedisFleet(url, name=name, member_timeout=float(timeout)) as fleet:
        me = Membership(fleet, new_member_id())
        await me.join()
        book = RedisJournal(fleet, me.member_id)
        await book.open()
        keys = []
        for i in range(int(n)):
            row = await book.record_intent("/gen", {"prompt": f"p{i}"}, tag=f"t{i}")
            key = f"{me.member_id}-{i}"
            await book.record_accepted(row, key)
            keys.append(key)
        await book.record_intent("/gen", {"prompt": "in flight"})  # dies before the reply
        say(member=me.member_id, keys=keys)
        while True:
            await asyncio.sleep(fleet.config.heartbeat_interval)
            await me.heartbeat()


async def reports(url: str, name: str, n: str) -> None:
    async with RedisFleet(url, name=name) as fleet:
        member = new_member_id()
        keys = [f"{member}-{i}" for i in range(int(n))]
        info = KeyInfo(time.time(), 0.0, time.time() + 60, None)
        await KeyRegistry(fleet).write((member, key, info) for key in keys)
        inbox = Inbox(fleet, member)
        say(member=member)
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(seen) < len(keys) and time.monotonic() < deadline:
            got = await inbox.read(1.0)
            for report in got:
                for key in report.keys:
                    seen[key] = seen.get(key, 0) + 1
            await inbox.ack(got)
        say(seen=seen)


async def poller(url: str, name: str, lease_seconds: str) -> None:
    async with RedisFleet(url, name=name, lease_seconds=float(lease_seconds)) as fleet:
        lease = LeaderLease(fleet, 0, new_member_id())
        registry = KeyRegistry(fleet)
        holding = asyncio.create_task(hold(lease))
        say(member=lease.member_id)
        version: int | None = None
        while not holding.done():
            try:
                version, changes = await registry.read(0, lease.require(0.5), version)
            except LeaseLostError:
                await asyncio.sleep(0.05)
                continue
            answers: dict[str, list[Report]] = {}
            for change in changes:
                if change.info is not None:
                    entry = {"key": change.job_key, "status": 4}
                    answers.setdefault(change.owner, []).append(
                        Report(keys=[change.job_key], data=[entry])
                    )
            await post_reports(fleet, answers)
            await asyncio.sleep(0.05)


def _client(creds: str, rate: str, fleet: Any = None) -> Any:
    from wujie_async import Credentials, Limits, PollPolicy, WujieClient

    with open(creds) as handle:  # read once, at start
        data = json.load(handle)
    poll = PollPolicy(
        first_poll_delay=0.05,
        min_interval=0.05,
        max_interval=0.3,
        max_estimate_wait=0.3,
        batch_fill_horizon=0.05,
        unknown_key_grace=5.0,
    )
    limits = Limits(max_submits_per_second=float(rate) if float(rate) > 0 else None)
    return WujieClient(
        Credentials(app_id=data["app_id"], private_key=data["private_key"]),
        base_url=data["base_url"],
        poll=poll,
        limits=limits,
        fleet=fleet,
    )


async def _ends(jobs: list[Any]) -> dict[str, list[float]]:
    """Each job's unix time of resolution and its number of images (-1: it failed), as
    _submit_all's watchers noted them when each job resolved."""
    await asyncio.gather(*(_ENDS[job.key][1] for job in jobs))
    return {job.key: _ENDS[job.key][0] for job in jobs}


_ENDS: dict[str, tuple[list[float], asyncio.Task[None]]] = {}


def _watch(job: Any) -> None:
    """Note when ``job`` resolves, from its submit on (jobs are awaited only once all are in)."""
    noted: list[float] = []

    async def note() -> None:
        try:
            result = await job
        except Exception:  # its outcome is _outcomes' to tell
            noted.extend([time.time(), -1])
        else:
            noted.extend([time.time(), len(result.images)])

    _ENDS[job.key] = (noted, asyncio.create_task(note()))


async def _outcomes(jobs: list[Any]) -> dict[str, str]:
    results = await asyncio.gather(*jobs, return_exceptions=True)
    return {
        job.key: "ok" if not isinstance(r, BaseException) else type(r).__name__
        for job, r in zip(jobs, results, strict=True)
    }


def _images() -> int:
    """Images per job: WUJIE_CHILD_IMAGES (default 1), for jobs of several images."""
    return int(os.environ.get("WUJIE_CHILD_IMAGES", "1"))


async def _submit_all(client: Any, n: int, tag: str) -> list[Any]:
    images = _images()

    async def one(i: int) -> Any:
        job = await client.images.submit(
            prompt=f"{tag} {i}", model="dall-e-2", tag=f"{tag}-{i}", n=images
        )
        _watch(job)
        return job

    sent = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    refused = [type(error).__name__ for error in sent if isinstance(error, Exception)]
    if refused:  # (a Redis away for longer than unavailable_wait): said, not raised
        say(submit_errors=refused)
    return [job for job in sent if not isinstance(job, BaseException)]


def _stats(client: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(client.stats)


async def member(
    url: str, name: str, creds: str, n: str, rate: str, lease: str, timeout: str
) -> None:
    fleet = RedisFleet(url, name=name, lease_seconds=float(lease), member_timeout=float(timeout))
    async with _client(creds, rate, fleet) as client:
        token = client.fleet_member.rsplit(":", 1)[1]
        say(member=client.fleet_member, token=token)
        running: set[asyncio.Task[None]] = set()

        async def go() -> None:
            jobs = await _submit_all(client, int(n), token)
            say(submitted=[job.key for job in jobs])
            ends = await _ends(jobs)
            say(resolved=await _outcomes(jobs), ends=ends, stats=_stats(client))

        while line := (await asyncio.to_thread(sys.stdin.readline)).strip():
            if line == "go":  # in the background: commands are read meanwhile
                task = asyncio.create_task(go())
                running.add(task)
                task.add_done_callback(running.discard)
            elif line.startswith("stall "):  # a GC pause: the whole loop frozen
                say(stall_from=time.time())
                time.sleep(float(line.split()[1]))  # noqa: ASYNC251 (the point)
                say(stall_until=time.time())
            elif line == "resume":
                claimed = await client.resume()
                say(claimed=[job.key for job in claimed])
                for job in claimed:
                    _watch(job)
                uncertain = len(await client.uncertain_submits())
                say(
                    claimed_resolved=await _outcomes(claimed),
                    claimed_ends=await _ends(claimed),
                    uncertain=uncertain,
                    stats=_stats(client),
                )
            elif line == "stats":
                say(stats=_stats(client))
            elif line == "quit":
                break


async def single(creds: str, n: str, rate: str) -> None:
    async with _client(creds, rate) as client:
        jobs = await _submit_all(client, int(n), "single")
        say(resolved=await _outcomes(jobs), stats=_stats(client))


ROLES: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
    "member": member,
    "single": single,
    "limiter": limiter,
    "leader": leader,
    "journal": journal,
    "reports": reports,
    "poller": poller,
}

if __name__ == "__main__":
    asyncio.run(ROLES[sys.argv[1]](*sys.argv[2:]))
