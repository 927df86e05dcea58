"""The main job: many prompts in, images and a manifest out, with a live progress display."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
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
    interrupted: bool = False

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
    """Submits every item, saves each image as its own future resolves, writes the manifest.

    ``resumed`` jobs (from a journal) are collected the same way, without being submitted.
    Setting ``stop`` ends the run gently: no new submits, the ones on the wire get their
    keys (so none is left uncertain), then image collection is abandoned (the jobs stay in
    the journal for ``resume``); ``tally.interrupted`` says so.
    """

    def __init__(
        self,
        client: WujieClient,
        items: list[BulkItem],
        out: Path,
        *,
        console: Console,
        resumed: list[ImageJob] | None = None,
        allow_http: bool = False,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._client = client
        self._stop = stop or asyncio.Event()
        self._submitters_idle = asyncio.Event()
        self._items = items
        self._resumed = resumed or []
        self._out = out
        self._console = console
        self._allow_http = allow_http
        self.tally = BulkTally(total=len(items) + len(self._resumed))
        self.tally.submitted = len(self._resumed)

    async def run(self) -> BulkTally:
        """Run to the end; the tally says how it went."""
        self._out.mkdir(parents=True, exist_ok=True)
        downloader = Downloader(
            self._client._transport.session, self._out, allow_http=self._allow_http
        )
        with (
            (self._out / "manifest.jsonl").open("a", encoding="utf-8") as manifest,
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
            task = progress.add_task("jobs", total=self.tally.total, detail=self.tally.line())

            def refresh() -> None:
                progress.update(
                    task, completed=self.tally.done + self.tally.failed, detail=self.tally.line()
                )

            collect = _Collector(downloader, manifest, refresh, self.tally, self._fail)
            queue: asyncio.Queue[BulkItem] = asyncio.Queue()
            for item in self._items:
                queue.put_nowait(item)
            with anyio.CancelScope() as scope:
                watcher = asyncio.get_running_loop().create_task(self._cancel_on_stop(scope))
                try:
                    async with anyio.create_task_group() as group:
                        for job in self._resumed:
                            prompt = str((job.request or {}).get("prompt", ""))
                            start = time.monotonic()
                            group.start_soon(collect, f"key {job.key}", prompt, job, start)
                        await self._submit_all(queue, group, collect, refresh)
                finally:
                    watcher.cancel()
            self.tally.interrupted = self._stop.is_set()
            refresh()
        return self.tally

    async def _cancel_on_stop(self, scope: anyio.CancelScope) -> None:
        await self._stop.wait()
        await self._submitters_idle.wait()
        scope.cancel()

    async def _submit_all(
        self,
        queue: asyncio.Queue[BulkItem],
        collectors: anyio.abc.TaskGroup,
        collect: _Collector,
        refresh: Callable[[], None],
    ) -> None:
        try:
            async with anyio.create_task_group() as submitters:
                for _ in range(self._client.limits.max_concurrent_submits):
                    submitters.start_soon(self._submitter, queue, collectors, collect, refresh)
        finally:
            self._submitters_idle.set()

    async def _submitter(
        self,
        queue: asyncio.Queue[BulkItem],
        group: anyio.abc.TaskGroup,
        collect: _Collector,
        refresh: Callable[[], None],
    ) -> None:
        while not queue.empty() and not self._stop.is_set():
            item = queue.get_nowait()
            started = time.monotonic()
            try:
                job = await self._client.images.submit(**item.request.body())
            except WujieError as exc:
                if isinstance(exc, SubmitUncertainError):
                    self.tally.uncertain += 1
                self._fail(f"line {item.line}: submit failed: {exc}")
                refresh()
                continue
            self.tally.submitted += 1
            refresh()
            group.start_soon(collect, f"line {item.line}", item.request.prompt, job, started)

    def _fail(self, message: str) -> None:
        self.tally.failed += 1
        self.tally.failures.append(message)
        self._console.print(f"[red]✗[/red] {message}", markup=True, highlight=False)


class _Collector:
    """Saves a job's images as each lands, one manifest line per image."""

    def __init__(
        self,
        downloader: Downloader,
        manifest: TextIO,
        refresh: Callable[[], None],
        tally: BulkTally,
        fail: Callable[[str], None],
    ) -> None:
        self._downloader = downloader
        self._manifest = manifest
        self._refresh = refresh
        self._tally = tally
        self._fail = fail

    async def __call__(self, label: str, prompt: str, job: ImageJob, started: float) -> None:
        count = job.n or 1
        results = await asyncio.gather(
            *(self._save(prompt, job, index, started) for index in range(count)),
            return_exceptions=True,
        )
        try:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            await job
        except (WujieError, OSError) as exc:
            self._fail(f"{label}: {exc}")
        else:
            self._tally.done += 1
        self._refresh()

    async def _save(self, prompt: str, job: ImageJob, index: int, started: float) -> None:
        image = await job.image(index)
        if image.url is None:
            raise WujieError(f"job {job.key}: image {index} has no URL")
        saved = await self._downloader.save(image.url, job.key, index)
        record = {
            "prompt": prompt,
            "key": job.key,
            "index": index,
            "path": saved.path.name,
            "sha256": saved.sha256,
            "bytes": saved.bytes,
            "seconds": round(time.monotonic() - started, 3),
        }
        self._manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._manifest.flush()
        self._tally.images += 1
        self._tally.saved.append(saved.path)
        self._refresh()
