"""A typed-API check (stamina's pattern): mypy --strict reads this file, pytest never runs it.

Every line marked ``type: ignore[...]`` MUST stay an error: mypy runs with
``warn_unused_ignores`` (part of --strict), so if the public API stops catching one of these
mistakes, the ignore becomes unused and the check fails.
"""

from __future__ import annotations

from pathlib import Path

from wujie_async import (
    ClientStats,
    DownloadPolicy,
    FleetStats,
    GeneratedImage,
    ImageJob,
    ImageResult,
    JobStatus,
    JournalEntry,
    JournalFile,
    Limits,
    PollPolicy,
    SavedImage,
    WujieClient,
)


async def right_uses(client: WujieClient) -> None:
    job: ImageJob = await client.images.submit(prompt="a cat", model="gpt-image-1", n=2)
    result: ImageResult = await job
    first: GeneratedImage = result.images[0]
    _url: str | None = first.url
    _status: JobStatus | int | None = job.status
    _also: ImageResult = await client.images.generate(
        prompt="a dog", model="dall-e-3", quality="hd", size="1024x1792", style="vivid", tag="m1"
    )
    _edit: ImageJob = await client.images.submit_edit(
        prompt="add a hat", model="gpt-image-1", image=["https://example.com/a.png"], mask=None
    )
    _attached: ImageJob = client.images.attach("KEY", job_timeout=60.0, n=1)
    _stats: ClientStats = client.stats
    _fleet: FleetStats | None = client.stats.fleet
    _rows: list[JournalEntry] = await client.journal_entries("uncertain")
    _kept: list[str] = client.uncommitted_journal_keys()
    _done: bool = JobStatus.SUCCEEDED.terminal
    _policy = PollPolicy(min_interval=0.25, max_estimate_wait=30.0)
    _limits = Limits(max_submits_per_second=5.0)
    _saved: list[SavedImage] = await job.save("out", name="{key}-{index}.{ext}")
    _one: SavedImage = await client.download(first, Path("out") / "cat.{ext}", key=job.key)
    _facts: tuple[int, Path, int, str] = (_one.index, _one.path, _one.bytes, _one.sha256)
    _downloads = DownloadPolicy(deadline=60.0, min_rate=None, max_bytes=8 << 20)
    async with JournalFile("jobs.sqlite") as journal:
        _listed: list[JournalEntry] = await journal.entries("uncertain", tag="m1")
        _forgotten: int = await journal.forget(row.id for row in _listed)


async def wrong_uses(client: WujieClient, job: ImageJob) -> None:
    await client.images.generate(promt="a cat", model="gpt-image-1")  # type: ignore[call-arg]
    await client.images.generate(prompt="a cat", model="gpt-image-1", n="three")  # type: ignore[arg-type]
    await client.images.submit(prompt="a cat", model="gpt-image-1", quality="ultra")  # type: ignore[arg-type]
    await client.images.submit(model="gpt-image-1")  # type: ignore[call-arg]
    await client.images.submit_edit(prompt="x", model="dall-e-2")  # type: ignore[call-arg]
    job.status = JobStatus.SUCCEEDED  # type: ignore[misc]
    _role: str = client.stats.fleet.role  # type: ignore[union-attr]
    client.stats.fleet_role  # type: ignore[attr-defined]  # noqa: B018
    job.succeed(4)  # type: ignore[attr-defined]
    PollPolicy(min_interval="fast")  # type: ignore[arg-type]
    await job.save("out", "{key}.{ext}")  # type: ignore[call-arg]
    await client.download("https://cdn.example/a.png", "a.png")  # type: ignore[arg-type]
    DownloadPolicy(deadline="soon")  # type: ignore[arg-type]
    WujieClient(allow_private_addresses="yes")  # type: ignore[arg-type]
    async with JournalFile("jobs.sqlite") as journal:
        await journal.forget(["1"])  # type: ignore[list-item]
        await journal.record_intent("/x", {})  # type: ignore[attr-defined]
