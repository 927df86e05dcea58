"""Redis Cluster: every script's keys share one hash slot, and a fleet runs on a real cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.crc import key_slot

from wujie_async import WujieClient
from wujie_async.emulator import Emulator
from wujie_async.fleet import RedisFleet

from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory
from .fleet_support import fleet_name, own_cluster

pytestmark = pytest.mark.anyio


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_every_scripts_keys_share_one_slot() -> None:
    fleet = RedisFleet("redis://127.0.0.1:1/0", name="acct-1", shards=8)
    keys = fleet.keys
    journal = keys.journal_prefix
    groups = {
        # What each Lua script touches together (the journal's scripts build row, owner,
        # tag and key names from the prefix; claiming also reads the member list).
        "limiter": [keys.rate_tat, keys.rate_pause],
        "membership": [keys.members, keys.member_info],
        "journal": [
            journal + "seq",
            journal + "row:1",
            journal + "owner:m1",
            journal + "tag:t1",
            journal + "key:k1",
            keys.members,
            keys.member_info,
            keys.stats,
        ],
    }
    for shard in range(8):
        groups[f"shard {shard}"] = [
            keys.lease(shard),
            keys.lease_counter(shard),
            keys.registered(shard),
            keys.changes(shard),
            keys.version(shard),
        ]
    for what, names in groups.items():
        assert len({slot(name) for name in names}) == 1, (what, names)
    # The shards' tags differ, so a cluster spreads them over its nodes.
    assert len({slot(keys.registered(shard)) for shard in range(8)}) == 8
    assert slot(keys.reports("m1")) != slot(keys.reports("m2"))


async def test_cluster_is_a_bool_and_needs_a_tcp_url() -> None:
    from wujie_async import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="url"):
        RedisFleet("unix:///tmp/redis.sock", name="x", cluster=True)
    with pytest.raises(InvalidRequestError, match="cluster"):
        RedisFleet("redis://127.0.0.1:1/0", name="x", cluster="yes")  # type: ignore[arg-type]


def cluster_member(emu: Emulator, url: str, name: str) -> WujieClient:
    return WujieClient(
        emu.credentials,
        base_url=emu.base_url,
        poll=FAST_POLL,
        retry=INSTANT_RETRY,
        fleet=RedisFleet(url, name=name, cluster=True, shards=3, lease_seconds=1.0),
    )


@pytest.mark.slow
async def test_a_fleet_on_a_real_cluster(tmp_path: Path, emulator: EmulatorFactory) -> None:
    name = fleet_name()
    async with (
        own_cluster(tmp_path) as url,
        emulator(time_scale=0.05) as emu,
        cluster_member(emu, url, name) as first,
        cluster_member(emu, url, name) as second,
    ):
        jobs = [
            await client.images.submit(prompt=f"{i}", model="dall-e-2", tag=f"t{i}-{c}")
            for i in range(15)
            for c, client in enumerate((first, second))
        ]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 20)
        assert all(len(result.images) == 1 for result in results)
        found = await second.find_submit("t0-0")
        assert found is not None and found.job_key == jobs[0].key
        members = [client.fleet_member for client in (first, second)]
        assert all(member is not None for member in members)
        assert {who for _, who in emu.stats()["batch_callers"]} <= {
            member.rsplit(":", 1)[1] for member in members if member is not None
        }
        # A member that leaves with jobs open: a survivor claims them (one script, one slot).
        async with cluster_member(emu, url, name) as doomed:
            keys = {
                (await doomed.images.submit(prompt=f"d{i}", model="dall-e-2")).key for i in range(3)
            }
        claimed = await first.resume()
        assert {job.key for job in claimed} == keys
        assert await second.resume() == []
        await asyncio.wait_for(asyncio.gather(*claimed), 20)
        assert emu.stats()["submits_accepted"] == 33  # nothing paid twice
