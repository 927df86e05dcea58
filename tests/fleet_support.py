"""Shared by the fleet tests: a real redis-server, unique fleet names, child processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from wujie_async import FleetStats, Limits, PollPolicy, WujieClient
from wujie_async.emulator import Emulator

from .conftest import FAST_POLL, INSTANT_RETRY
from .helpers import stop_process

if TYPE_CHECKING:
    from wujie_async.fleet import RedisFleet  # only the fleet tests need redis-py

CHILD = Path(__file__).resolve().parent / "fleet_child.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fleet_name() -> str:
    """A fresh fleet name: tests sharing the CI's redis never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@dataclass
class RedisServer:
    url: str
    port: int
    process: asyncio.subprocess.Process | None


async def listening(port: int) -> bool:
    """True once something accepts connections on 127.0.0.1:``port``."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def own_redis(
    tmp_path: Path,
    *,
    appendonly: bool = False,
    port: int | None = None,
    extra: tuple[str, ...] = (),
) -> AsyncIterator[RedisServer]:
    """A redis-server of our own (needed to configure or restart it); skips without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server here (.ci/run installs one)")
    port = port or free_port()
    process = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
        "--dir", str(tmp_path), *extra, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            if await listening(port):
                break
            assert process.returncode is None, f"redis-server exited ({process.returncode})"
            await asyncio.sleep(0.025)
        else:
            raise AssertionError(f"redis-server is not listening on port {port} after 5 s")
        yield RedisServer(f"redis://127.0.0.1:{port}/0", port, process)
    finally:
        await stop_process(process)


@contextlib.asynccontextmanager
async def any_redis(tmp_path: Path, *, db: int | None = None) -> AsyncIterator[str]:
    """The CI's redis (WUJIE_TEST_REDIS_URL), or a redis-server of our own.

    ``db``: a logical database of its own, for a test whose key names are fixed (the queue
    examples' streams): tests run in parallel on the one shared server.
    """
    url = os.environ.get("WUJIE_TEST_REDIS_URL")
    if url:
        yield url if db is None else url.rsplit("/", 1)[0] + f"/{db}"
        return
    async with own_redis(tmp_path) as server:
        yield server.url if db is None else server.url.rsplit("/", 1)[0] + f"/{db}"


async def start_child(*args: str, images: int = 1) -> asyncio.subprocess.Process:
    """``tests/fleet_child.py`` with ``args``, its stdout piped (one JSON line per event);
    ``images``: how many images each job of a ``member`` asks for."""
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=2**24,
        env={**os.environ, "WUJIE_CHILD_IMAGES": str(images)},
    )  # fmt: skip


async def stop_child(proc: asyncio.subprocess.Process) -> None:
    await stop_process(proc, sig=signal.SIGKILL)


async def next_event(proc: asyncio.subprocess.Process, timeout: float = 30) -> dict[str, Any]:
    """The child's next JSON line."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        assert proc.stderr is not None
        error = await proc.stderr.read()
        raise AssertionError(f"the child exited: {error.decode()[-2000:]}")
    event: dict[str, Any] = json.loads(line)
    return event


@contextlib.asynccontextmanager
async def emulator_process(
    tmp_path: Path, label: str, time_scale: float = 0.01, extra: tuple[str, ...] = ()
) -> AsyncIterator[dict[str, Any]]:
    """``python -m wujie_async.emulator`` in its own process (``extra``: more of its
    options); yields its credentials file."""
    creds = tmp_path / f"{label}.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async.emulator", "--port", "0",
        "--time-scale", str(time_scale), "--seed", "3", "--credentials-out", str(creds),
        *extra, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not creds.exists():
            assert proc.returncode is None, "the emulator exited"
            assert time.monotonic() < deadline, "the emulator did not start"
            await asyncio.sleep(0.05)
        data: dict[str, Any] = json.loads(creds.read_text())
        data["file"] = str(creds)
        data["origin"] = data["base_url"].split("/wj-open")[0]
        yield data
    finally:
        await stop_process(proc)


async def emulator_stats(emu: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(emu["origin"] + "/_emulator/stats") as reply,
    ):
        stats: dict[str, Any] = await reply.json()
        return stats


async def first_batch_callers(emu: dict[str, Any], timeout: float = 10) -> list[Any]:
    """The emulator's ``batch_callers`` once there is at least one batch call."""
    deadline = time.monotonic() + timeout
    while not (callers := (await emulator_stats(emu))["batch_callers"]):
        assert time.monotonic() < deadline, "no batch call yet"
        await asyncio.sleep(0.05)
    return list(callers)


def cluster_ports(nodes: int) -> list[int]:
    """``nodes`` free ports whose cluster bus ports (port + 10000) are free too, all 2 x
    ``nodes`` numbers distinct: a node's bus port must not be another node's client port, or
    that node fails to start while the bus answers on its port as if it had."""
    chosen: set[int] = set()
    ports: list[int] = []
    for _ in range(400):
        port = free_port()
        if port + 10000 > 65535 or {port, port + 10000} & chosen:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
        chosen |= {port, port + 10000}
        if len(ports) == nodes:
            return ports
    raise AssertionError("no free port pairs for the cluster's nodes")


@contextlib.asynccontextmanager
async def own_cluster(tmp_path: Path, nodes: int = 3) -> AsyncIterator[str]:
    """A Redis Cluster of ``nodes`` primaries of our own; yields one node's URL.

    The slots are assigned and every pair of nodes introduced directly (CLUSTER ADDSLOTSRANGE,
    MEET), which takes a few seconds where ``redis-cli --cluster create`` waits longer. Forming
    is Redis's own work, not ours: it gets Redis's own test suite's patience (tens of seconds on
    a loaded machine), and a cluster that does not form says what each node saw.
    """
    import redis.asyncio as aioredis

    ports = cluster_ports(nodes)
    async with contextlib.AsyncExitStack() as stack:
        for port in ports:
            folder = tmp_path / f"cluster-{port}"
            folder.mkdir()
            extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            server = await stack.enter_async_context(own_redis(folder, port=port, extra=extra))
            assert server.process is not None and server.process.returncode is None, port
        step = 16384 // nodes
        for i, port in enumerate(ports):
            last = 16383 if i == nodes - 1 else (i + 1) * step - 1
            async with aioredis.Redis(port=port) as node:
                await _command(node, "CLUSTER", "ADDSLOTSRANGE", i * step, last)
                for other in ports[:i]:
                    await _command(node, "CLUSTER", "MEET", "127.0.0.1", other)
        deadline = time.monotonic() + 45
        for port in ports:
            async with aioredis.Redis(port=port, decode_responses=True) as node:
                while not _cluster_ok(await _command(node, "CLUSTER", "INFO")):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the cluster did not form: {await _views(ports)}")
                    await asyncio.sleep(0.05)
        yield f"redis://127.0.0.1:{ports[0]}/0"


async def _views(ports: list[int]) -> dict[int, str]:
    """What each node says of the cluster (CLUSTER NODES), for a cluster that did not form."""
    import redis.asyncio as aioredis

    views: dict[int, str] = {}
    for port in ports:
        async with aioredis.Redis(port=port, decode_responses=True) as node:
            try:
                views[port] = str(await _command(node, "CLUSTER", "NODES"))
            except Exception as error:  # a diagnosis, whatever the node says
                views[port] = repr(error)
    return views


async def _command(node: Any, *args: Any) -> Any:
    """A raw command on a ``redis.asyncio.Redis`` (redis-py leaves ``execute_command`` untyped)."""
    return await node.execute_command(*args)


def _cluster_ok(info: Any) -> bool:
    """CLUSTER INFO's reply (text, or parsed into a dict by redis-py) says the state is ok."""
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    return "cluster_state:ok" in str(info)


async def forget_fleet(fleet: RedisFleet) -> int:
    """Delete every key of ``fleet``'s name, as a Redis restart without AOF (or a FLUSHALL)
    loses them, without touching the other tests' fleets on a shared Redis. Returns how many."""

    async def drop(redis: Any) -> int:
        keys = [key async for key in redis.scan_iter(match=f"{fleet.keys.tag}*", count=1000)]
        return int(await redis.delete(*keys)) if keys else 0

    return await fleet.call(drop)


def member(
    emu: Emulator,
    url: str,
    name: str,
    *,
    limits: Limits | None = None,
    poll: PollPolicy = FAST_POLL,
    **fleet_options: float,
) -> WujieClient:
    """A client of fleet ``name`` on ``url``, against ``emu`` (fast polls, instant retries)."""
    fleet_options.setdefault("lease_seconds", 1.0)
    from wujie_async.fleet import RedisFleet

    return WujieClient(
        emu.credentials,
        base_url=emu.base_url,
        poll=poll,
        retry=INSTANT_RETRY,
        limits=limits,
        fleet=RedisFleet(url, name=name, **fleet_options),  # type: ignore[arg-type]
    )


def fleet_of(client: WujieClient) -> FleetStats:
    """The fleet's stats as ``client`` sees them (a member's: never None)."""
    stats = client.stats.fleet
    assert stats is not None
    return stats
