"""The main job: many prompts in, images and a manifest out, with a live progress display."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ._client import WujieClient
from ._download import Downloader
from ._errors import InvalidRequestError, SubmitUncertainError, WujieError
from ._jobs import ImageJob
from ._models import GenerationRequest

_MAX_REPORTED_INPUT_ERRORS = 20


class InputFileError(Exception):
    """The prompts file has bad lines; each message names its line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One request from the input file, with the line it came from."""

    line: int
    request: GenerationRequest


def read_requests(path: Path, defaults: dict[str, Any]) -> list[BulkItem]:
    """Parse a prompts file: a prompt per line (``.txt``) or a JSON request per line (``.jsonl``).

    Every line is checked against the per-model rules before anything is sent; blank lines and
    lines starting with ``#`` are skipped.

    Raises:
        InputFileError: listing each bad line as ``file:line: field: rule``.
    """
    as_json = path.suffix.lower() in {".jsonl", ".ndjson"}
    items: list[BulkItem] = []
    problems: list[str] = []
    try:
        lines: Iterator[str] = iter(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError([f"{path}: cannot read: {exc}"]) from None
    for number, text in enumerate(lines, start=1):
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields: dict[str, Any] = dict(defaults)
        if as_json:
            try:
                loaded = json.loads(stripped)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(loaded, dict):
                problems.append(f"{path}:{number}: must be a JSON object with a prompt")
                continue
            fields.update(loaded)
        else:
            fields["prompt"] = stripped
        try:
            items.append(BulkItem(number, GenerationRequest.build(fields)))
        except InvalidRequestError as exc:
            rules = "; ".join(f"{name}: {rule}" for name, rule in exc.violations)
            problems.append(f"{path}:{number}: {rules}")
        if len(problems) >= _MAX_REPORTED_INPUT_ERRORS:
            problems.append("(stopping after 20 bad lines)")
            break
    if problems:
        raise InputFileError(problems)
    if not items:
        raise InputFileError([f"{path}: no prompts found"])
    return items


@dataclass(slots=True)
class BulkTally:
    """What a bulk run has done so far."""

    total: int
    submitted: int = 0
    done: int = 0
    failed: int = 0
    images: int = 0
    uncertain: int = 0
    started: float = field(default_factory=time.monotonic)
    failures: list[str] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)

    @property
    def running(self) -> int:
        """Jobs submitted and not yet ended."""
        return self.submitted - self.done - self.failed

    def line(self) -> str:
        """The live status line."""
        rate = self.images / max(time.monotonic() - self.started, 1e-9)
        return (
            f"submitted {self.submitted} · generating {self.running} · done {self.done} · "
            f"failed {self.failed} · {rate:.1f} img/s"
        )


class BulkRun:
    """Submits every item, saves each image as its own future resolves, writes the manifest."""

    def __init__(
        self,
        client: WujieClient,
        items: list[BulkItem],
        out: Path,
        *,
        console: Console,
        allow_http: bool = False,
    ) -> None:
        self._client = client
        self._items = items
        self._out = out
        self._console = console
        self._allow_http = allow_http
        self.tally = BulkTally(total=len(items))
        self.jobs: list[ImageJob] = []

    async def run(self) -> BulkTally:
        """Run to the end; the tally says how it went."""
        self._out.mkdir(parents=True, exist_ok=True)
        downloader = Downloader(
            self._client._transport.session, self._out, allow_http=self._allow_http
        )
        manifest_path = self._out / "manifest.jsonl"
        with (
            manifest_path.open("a", encoding="utf-8") as manifest,
            Progress(
                SpinnerColumn(),
                TextColumn("[bold]jobs"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self._console,
                refresh_per_second=8,
            ) as progress,
        ):
            task = progress.add_task("jobs", total=len(self._items), detail=self.tally.line())

            def refresh() -> None:
                progress.update(
                    task, completed=self.tally.done + self.tally.failed, detail=self.tally.line()
                )

            queue: asyncio.Queue[BulkItem] = asyncio.Queue()
            for item in self._items:
                queue.put_nowait(item)
            async with anyio.create_task_group() as group:
                for _ in range(self._client.limits.max_concurrent_submits):
                    group.start_soon(self._submitter, queue, group, downloader, manifest, refresh)
            refresh()
        return self.tally

    async def _submitter(
        self,
        queue: asyncio.Queue[BulkItem],
        group: anyio.abc.TaskGroup,
        downloader: Downloader,
        manifest: TextIO,
        refresh: Any,
    ) -> None:
        while not queue.empty():
            item = queue.get_nowait()
            body = item.request.body()
            started = time.monotonic()
            try:
                job = await self._client.images.submit(**body)
            except WujieError as exc:
                if isinstance(exc, SubmitUncertainError):
                    self.tally.uncertain += 1
                self._fail(f"line {item.line}: submit failed: {exc}")
                refresh()
                continue
            self.jobs.append(job)
            self.tally.submitted += 1
            refresh()
            group.start_soon(self._collect, item, job, started, downloader, manifest, refresh)

    async def _collect(
        self,
        item: BulkItem,
        job: ImageJob,
        started: float,
        downloader: Downloader,
        manifest: TextIO,
        refresh: Any,
    ) -> None:
        count = item.request.n or 1

        async def save(index: int) -> None:
            image = await job.image(index)
            if image.url is None:
                raise WujieError(f"image {index} has no URL")
            saved = await downloader.save(image.url, job.key, index)
            record = {
                "prompt": item.request.prompt,
                "key": job.key,
                "index": index,
                "path": saved.path.name,
                "sha256": saved.sha256,
                "bytes": saved.bytes,
                "seconds": round(time.monotonic() - started, 3),
            }
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
            manifest.flush()
            self.tally.images += 1
            self.tally.saved.append(saved.path)
            refresh()

        try:
            results = await asyncio.gather(*(save(i) for i in range(count)), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            await job
        except (WujieError, OSError) as exc:
            self._fail(f"line {item.line}: {exc}")
        else:
            self.tally.done += 1
        refresh()

    def _fail(self, message: str) -> None:
        self.tally.failed += 1
        self.tally.failures.append(message)
        self._console.print(f"[red]✗[/red] {message}", markup=True, highlight=False)
