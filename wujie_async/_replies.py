"""Reading a batch-detail reply: which entries count, how they are validated, what they mean.

Every reply is hostile until checked. Only entries for keys the call asked about are looked at
(at most ``ENTRIES_PER_KEY`` per key, one dict lookup each before any validation, and a report
that ends the job is always among them), a repeated key keeps its most advanced entry, and an
entry that cannot be read marks only its own key as malformed. The poller (``_poller``)
decides what to do with a reading; this module only reads.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any

from . import _contract
from ._contract import JobStatus
from ._errors import JobFailedError, ModerationRejectedError, ProtocolError, snippet
from ._job_info import EntryError, JobInfo
from ._results import GeneratedImage

# A reply may repeat a key; at most this many entries of one key are validated. Past it, a
# later entry takes the last place (unless only it would drop a report that ends the job), so
# neither the newest report nor the terminal one is lost to a run of stale copies.
ENTRIES_PER_KEY = 4
# Statuses that end a job as a raw entry may carry them, before validation reads them as ints.
_TERMINAL_RAW: frozenset[object] = frozenset(
    {*map(int, _contract.TERMINAL_STATUSES), *(str(int(s)) for s in _contract.TERMINAL_STATUSES)}
)


@dataclass(slots=True)
class Reading:
    """What one batch reply said about the keys asked."""

    entries: dict[str, JobInfo]
    # Keys that were listed only in malformed entries, with why (a short, clean excerpt).
    malformed: dict[str, str]
    # Entries that could not be read, entries for keys not asked about, and repeats of a key
    # past ENTRIES_PER_KEY that were not read.
    bad_entries: int = 0
    ignored_entries: int = 0
    surplus_entries: int = 0
    # Why the first unreadable entry could not be read (a short, clean excerpt), or "".
    first_problem: str = ""


def images_of(entry: JobInfo, count: int | None = None) -> list[GeneratedImage]:
    """The images an entry lists that have landed, by position in its list (``index``).

    An image with neither a URL nor ``b64_json`` (null or empty) is a placeholder for one not
    finished: it is left out, and its position stays free (a later image keeps its index).
    With ``count`` (the job's ``n``), positions from ``count`` on are not the job's images
    and are left out too (see :func:`lists_extra_images`).
    """
    return [
        GeneratedImage(index, image.url, image.b64_json, image.revised_prompt)
        for index, image in enumerate((entry.images or ())[:count])
        if image.url or image.b64_json
    ]


def lists_extra_images(entry: JobInfo, count: int) -> bool:
    """True when ``entry`` lists a landed image at a position from ``count`` on."""
    return any(image.url or image.b64_json for image in (entry.images or ())[count:])


def _landed(entry: JobInfo) -> int:
    """How many images of an entry have landed (placeholders do not count)."""
    return sum(1 for image in entry.images or () if image.url or image.b64_json)


def _advance(entry: JobInfo) -> tuple[bool, int, bool, float]:
    """How far a report has got: ended, images landed, generating, percent (higher: further)."""
    percent = entry.complete_percent
    return (
        entry.terminal,
        _landed(entry),
        entry.status == JobStatus.GENERATING,
        -1.0 if percent is None else percent,
    )


def _most_advanced(entries: Iterable[JobInfo]) -> dict[str, JobInfo]:
    """One entry per key: a repeated key keeps its most advanced report (first of equals).

    The list's order says nothing of age (the contract allows any order), so the report that
    has got furthest stands for the job: a stale "queued" copy does not hide "generating".
    Ranks are worked out only for a key listed more than once (most keys are listed once).
    """
    best: dict[str, JobInfo] = {}
    ranks: dict[str, tuple[bool, int, bool, float]] = {}
    for entry in entries:
        key = entry.key
        held = best.get(key)
        if held is None:
            best[key] = entry
            continue
        seen = ranks.get(key)
        if seen is None:
            seen = ranks[key] = _advance(held)
        rank = _advance(entry)
        if rank > seen:
            best[key] = entry
            ranks[key] = rank
    return best


def _looks_terminal(raw: dict[str, Any]) -> bool:
    """True when a raw entry's status reads as one that ends a job (one lookup, no validation)."""
    status = raw.get("status")
    return type(status) in (int, float, str) and status in _TERMINAL_RAW


def _listed(data: Any) -> list[Any]:
    """The list of entries of a batch reply's ``data``.

    The reply's shape is [assumed] (see _contract). A bare array, or a null or empty-object
    list (nothing found), are read the same way rather than failing every job. A null
    ``data`` is not: the envelope's ``data`` is null on errors, and a reply that says nothing,
    read as "none of these keys is known", would fail every job of the call as unknown once
    it lasted the grace (paid jobs whose results were never seen); it is a malformed reply,
    asked again.

    Raises:
        ProtocolError: ``data`` is null, or holds no list of entries.
    """
    if data is None:
        raise ProtocolError(
            "batch reply data is null (no list of entries, not even an empty one): "
            "read as a failed call, its keys asked again"
        )
    listed = data.get(_contract.BATCH_LIST_FIELD, ...) if isinstance(data, dict) else data
    if listed is None or (isinstance(listed, dict) and not listed):
        # {} is an empty list as Lua's cjson (an OpenResty gateway) writes one: read as a
        # failed call, a key never listed waited out its deadline instead of the grace.
        return []
    if not isinstance(listed, list):
        raise ProtocolError(f"batch reply data has no list: {snippet(str(data)[:400])}")
    return listed


def _relevant(listed: list[Any], asked: Container[str]) -> tuple[list[dict[str, Any]], int]:
    """The entries of ``listed`` for keys in ``asked``, at most ENTRIES_PER_KEY per key.

    Returns them with how many repeats were passed over. Past the bound, a later entry of a key
    replaces its last kept one, unless that one looks terminal and the later one does not: a
    run of stale copies can hide neither the report that ends the job nor the newest one.
    One dict lookup per entry before any validation: a reply flooded with junk costs one pass.
    """
    # A key's one entry, or the list of its entries once it is listed again: most keys are
    # listed once, and a list per key was an object (for the garbage collector) per entry.
    kept: dict[str, dict[str, Any] | list[dict[str, Any]]] = {}
    surplus = 0
    for raw in listed:
        if type(raw) is dict:
            key = raw.get("key")
            # Exact match only: a key with a newline or control character is not ours.
            if type(key) is str and key in asked:
                held = kept.get(key)
                if held is None:
                    kept[key] = raw
                    continue
                if isinstance(held, dict):
                    kept[key] = [held, raw]  # ENTRIES_PER_KEY is at least 2
                    continue
                entries = held
                if len(entries) < ENTRIES_PER_KEY:
                    entries.append(raw)
                    continue
                surplus += 1
                if _looks_terminal(raw) or not _looks_terminal(entries[-1]):
                    entries[-1] = raw
    relevant: list[dict[str, Any]] = []
    for held in kept.values():
        if isinstance(held, dict):
            relevant.append(held)
        else:
            relevant.extend(held)
    return relevant, surplus


def raw_entries_by_key(data: Any, asked: Container[str]) -> dict[str, list[dict[str, Any]]]:
    """A batch reply's raw entries for the keys asked, grouped by key (not validated).

    For a fleet's leader, who passes each key's entries to its owner unread: the owner
    validates them with :meth:`BatchPoller.apply_report`, exactly as its own replies.
    At most ENTRIES_PER_KEY entries per key; entries for keys not asked are dropped.

    Raises:
        ProtocolError: ``data`` holds no list of entries.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for raw in _relevant(_listed(data), asked)[0]:
        grouped.setdefault(raw["key"], []).append(raw)
    return grouped


def _why(exc: Exception) -> str:
    """A short account of why an entry could not be read that never echoes the hostile input:
    the field and the rule it breaks (an ``EntryError`` names no value), else the error's type."""
    return snippet(str(exc)) if isinstance(exc, EntryError) else type(exc).__name__


def read(data: Any, asked: Container[str] | None) -> Reading:
    """The entries of a reply for the keys in ``asked`` (every entry when None).

    Work is bounded by the keys asked: an entry for another key is skipped with one dict
    lookup, before any validation, and at most ENTRIES_PER_KEY entries of one key are read.
    Problems are counted in the reading (the poller words them, at most once per reply).
    """
    listed = _listed(data)
    relevant, surplus = (listed, 0) if asked is None else _relevant(listed, asked)
    ignored = len(listed) - len(relevant) - surplus
    malformed: dict[str, str] = {}
    first_problem = ""
    # Reading hostile input may only ever mean "malformed": anything it raises (an EntryError,
    # or anything unforeseen from a value no JSON reader makes) marks the entry bad.
    entries = []
    read_entry = JobInfo.read
    for raw in relevant:
        try:
            entries.append(read_entry(raw))
        except Exception as exc:
            why = _why(exc)
            first_problem = first_problem or why
            key = raw.get("key") if isinstance(raw, dict) else None
            if isinstance(key, str):
                malformed.setdefault(key, why)
    bad = len(relevant) - len(entries)
    best = _most_advanced(entries)
    for key in best:
        malformed.pop(key, None)  # one readable entry is enough
    return Reading(best, malformed, bad, ignored, surplus, first_problem)


def failure(key: str, entry: JobInfo) -> JobFailedError:
    """The error of a job the gateway reports as failed, rejected or ended without a result."""
    fail = entry.fail_message
    if fail is None or isinstance(fail, str):
        code, text = None, fail
    else:
        code, text = fail.fail_code, fail.fail_message
    message = snippet(text) if text else None  # server text: one clean, short line
    if entry.status == JobStatus.ENDED_WITHOUT_RESULT:
        said = f": {message}" if message else ""
        message = f"the gateway ended the job without a result (status -1){said}"
    if entry.status == JobStatus.MODERATION_REJECTED:
        return ModerationRejectedError(job_key=key, fail_code=code, fail_message=message)
    return JobFailedError(job_key=key, fail_code=code, fail_message=message)
