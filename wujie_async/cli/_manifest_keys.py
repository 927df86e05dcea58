"""What the manifest's rows of earlier runs hold that a run must honour: the file names they
saved (and whose job each is), the keys whose cost they record, and the keys only the manifest
kept (a full disk kept them out of the journal), given to the journal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from .. import InvalidRequestError, JournalEntry, WujieClient


def names_taken(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Saved file names, their extension as ``{ext}``, and the job key each belongs to."""
    taken: dict[str, str] = {}
    for record in records:
        path, key = record.get("path"), record.get("key")
        if record.get("status") == "saved" and isinstance(path, str) and isinstance(key, str):
            stem, dot, _ = path.rpartition(".")
            taken[f"{stem}.{{ext}}" if dot else path] = key
    return taken


def charged_keys(records: Iterable[dict[str, Any]]) -> frozenset[str]:
    """Keys whose cost a manifest row records (``points``)."""
    return frozenset(
        key
        for record in records
        if isinstance(key := record.get("key"), str) and record.get("points") is not None
    )


async def record_manifest_keys(
    client: WujieClient,
    records: Iterable[dict[str, Any]],
    entries: list[JournalEntry] | None = None,
) -> int:
    """Give the journal the keys only the manifest kept; returns how many rows got one.
    ``entries``: every journal row, when the caller has read them (else they are read here).

    A full disk can keep a submit's key out of the journal (its row then reads ``uncertain``:
    the reply was never recorded) while a manifest row, written when the disk had room again,
    holds it. Such a key, on a manifest row with the row's tag and held by no journal row, is
    that submit's: it is recorded, so the job is collected rather than left "uncertain" (and
    resent, and paid for twice, by someone settling it). A tag with more than one uncertain row
    is left alone: which submit the key was cannot be told.
    """
    if entries is None:
        entries = await client.journal_entries()
    held = {entry.job_key for entry in entries if entry.job_key}
    uncertain: dict[str, list[int]] = {}
    for entry in entries:
        if entry.state == "uncertain" and not entry.job_key and entry.tag:
            uncertain.setdefault(entry.tag, []).append(entry.id)
    found: dict[str, set[str]] = {}
    for record in records:
        key, tag = record.get("key"), record.get("tag")
        if isinstance(key, str) and isinstance(tag, str) and tag in uncertain and key not in held:
            found.setdefault(tag, set()).add(key)
    recorded = 0
    for tag, keys in found.items():
        if len(keys) == 1 and len(uncertain[tag]) == 1:
            with contextlib.suppress(InvalidRequestError):  # a damaged manifest's key
                recorded += await client.record_submit_key(uncertain[tag][0], keys.pop())
    return recorded
