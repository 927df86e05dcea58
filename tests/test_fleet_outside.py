"""Fleet mode under Redis trouble, checked from outside: real member processes, a real
redis-server of the test's own, the package's emulator in its own process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from .fleet_support import (
    emulator_process,
    emulator_stats,
    first_batch_callers,
    fleet_name,
    own_redis,
)
from .test_fleet_processes import (
    assert_each_job_once_one_leader,
    busiest_second,
    go_until_running,
    members,
    wait_event,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_connections_cut_again_and_again_leave_one_poller(tmp_path: Path) -> None:
    # Every client connection is cut (CLIENT KILL TYPE normal) every 0.1 s for 3 s while
    # jobs run. Redis itself answers all along: no member may take it for away, go local and
    # poll its own keys (each member's one-second blocking read of its reports was cut at
    # the second kill, after its one re-ask, and every member became a poller for a moment).
    import redis.asyncio as aioredis

    n, rate, lease, timeout, kills, every = 30, 15.0, 2.0, 6.0, 30, 0.1
    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu", time_scale=2.0) as emu,  # jobs of 3-10 s
        aioredis.Redis(port=server.port) as admin,
    ):
        async with members(
            server.url, emu, fleet_name(), 3, n, rate, lease=lease, timeout=timeout
        ) as procs:
            await go_until_running(procs, emu, 30)
            leader = (await first_batch_callers(emu))[-1][1]
            storm_from = time.time()
            for _ in range(kills):
                await admin.client_kill_filter(_type="normal", skipme=True)
                await asyncio.sleep(every)
            done = [await wait_event(proc, "resolved", 60) for proc in procs]
        stats = await emulator_stats(emu)
    assert_each_job_once_one_leader(done, stats)
    assert stats["submits_accepted"] == 3 * n
    callers = {who for t, who in stats["batch_callers"] if t > storm_from}
    assert callers == {leader}, callers  # one poller all along
    created = [t["created"] for t in stats["timelines"].values()]
    assert busiest_second(created) <= rate  # the cap, in every second
