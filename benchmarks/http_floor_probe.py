"""How much of the CPU floor is aiohttp's ClientSession: the floor's POSTs, and the same POSTs
as a minimal HTTP/1.1 exchange over asyncio streams, in turns against one emulator.

    .venv/bin/python benchmarks/http_floor_probe.py [--jobs 10000] [--rounds 2]

The floor of run.py (``common.run_floor``) is ``session.post(url, json=body)`` and
``json.loads(await reply.read())`` per submit, through 32 workers and pooled connections. The
probe sends the same bodies through the same 32 workers over kept-alive connections, writing the
request line and headers itself and reading a Content-Length reply (what the emulator sends):
no redirects, cookies, tracing, timeouts or chunked bodies. It is not a client (a gateway may
send any reply HTTP allows); it measures what a request costs below aiohttp's session layer, so
that the floor's ratio targets can be read against it. Prints one line per run: client CPU per
request (this process) and requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from common import GENERATIONS, Gateway, emulator, requests_for, run_floor, submit_all


async def run_streams(gateway: Gateway, count: int) -> dict[str, Any]:
    """The floor's POSTs as bare HTTP/1.1 over asyncio streams (kept-alive connections)."""
    requests = requests_for(count)
    header = gateway.credentials.header_at(int(time.time()))
    url = urlsplit(gateway.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = (
        f"POST {url.path.rstrip('/')}{GENERATIONS} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: {header}\r\nContent-Type: application/json\r\n"
    ).encode()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    cpu0, wall0 = time.process_time(), time.monotonic()

    async def post(request: dict[str, Any]) -> None:
        reader, writer = idle.pop() if idle else await asyncio.open_connection(host, port)
        body = json.dumps(request).encode()
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await reader.readline()  # the status line
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        json.loads(await reader.readexactly(length))
        idle.append((reader, writer))

    await submit_all(post, requests)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    for _, writer in idle:
        writer.close()
    return {"jobs": count, "cpu_per_job_us": cpu / count * 1e6, "requests_per_s": count / wall}


async def main(jobs: int, rounds: int) -> None:
    async with emulator(0.1, 11) as gateway:
        for _ in range(rounds):
            floor = await run_floor(gateway, jobs)
            streams = await run_streams(gateway, jobs)
            print(
                f"aiohttp session {floor['cpu_per_job_us']:.0f} µs/request, "
                f"{floor['requests_per_s']:.0f}/s; bare streams "
                f"{streams['cpu_per_job_us']:.0f} µs/request, {streams['requests_per_s']:.0f}/s "
                f"({streams['cpu_per_job_us'] / floor['cpu_per_job_us']:.2f}x the floor's CPU)",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.rounds))
