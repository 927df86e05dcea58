"""What a re-run, ``resume`` and ``status`` do with each line, read from manifest and journal.

A re-run of ``bulk`` on the same journal decides per line from its journal row (found by the
row's tag): saved lines are skipped, pending ones (timed out ones too: their rows stay
accepted) are collected, uncertain ones are never resent, failed/moderated/rejected ones are
resent only with ``--retry-failed``, and lines never sent are sent. Uncertain lines whose job
has a key (the gateway accepted it, then reported it only unreadably or forgot it) are asked
about again: their images are collected if the gateway now lists the job done, else they stay
uncertain. Without a journal the manifest's rows decide the same way (``plan_from_manifest``).

A line whose job another gateway accepted (the journal row records another base URL or app id
than this run's: staging and production, a changed WUJIE_BASE_URL, another account) is neither
collected (this gateway does not know its key: it would end "unknown key", its paid images
never saved) nor resent (paid twice): it ends this run ``uncertain`` (``other_gateway``), its
row left as it was, and the summary names the base URL that collects it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import anyio

from .. import (
    JournalEntry,
    JournalFile,
    JournalLockedError,
    WujieClient,
    WujieError,
)
from .._budget import Kind
from .._keys import images_in
from ._bulk_data import Row
from ._input import BulkItem, moved_rows
from ._manifest import lines_ended, saved_indexes
from ._manifest_keys import charged_keys, record_manifest_keys
from ._manifest_plan import plan_from_manifest
from ._outcome import LineOutcome, Status, clean
from ._plan import (
    COLLECTED_AGAIN,
    OPEN_STATES,
    RECHECKED,
    Plan,
    attach_row,
    elsewhere_outcome,
    held,
    known_keys,
    legacy_unknown,
    line_of,
    lines_by_id,
    of_another_gateway,
    readable_error,
    told_long_ago,
    unusable_key,
)


def _settled_from(
    entry: JournalEntry, row: Row, by_key: dict[str, dict[str, Any]], by_line: dict[int, Any]
) -> LineOutcome:
    """The outcome a previous run recorded for a line this run leaves alone."""
    record = _recorded(entry, row, by_key, by_line) or {}
    status: Status = record.get("status") if record.get("status") in OPEN_STATES else None  # type: ignore[assignment]
    if status is None:
        status = "uncertain" if entry.state in ("uncertain", "intent") else "failed"
        if entry.state == "rejected":
            status = "rejected"
    code = record.get("error_code") or (status if status == "uncertain" else entry.state)
    return LineOutcome(
        status,
        row.line,
        row.row_id,
        entry.job_key,
        code,
        clean(record.get("error") or readable_error(entry.error or entry.state)),
    )


def _recorded(
    entry: JournalEntry, row: Row, by_key: dict[str, dict[str, Any]], by_line: dict[int, Any]
) -> dict[str, Any] | None:
    """The manifest row that says how the journal's ``entry`` ended, if any. A ``not_sent``
    row is not one: the journal says the line was sent since (a run stopped before sending
    it, and the next was killed while sending it), and the row's words would be false."""
    record = by_key.get(entry.job_key or "") or by_line.get(row.line)
    return None if record is None or record.get("status") == "not_sent" else record


def _refused_by_a_stop(state: str, record: dict[str, Any] | None) -> bool:
    """A line the gateway refused as a whole (wrong app id, base URL, balance): send it again.

    Such a submit is journaled ``rejected`` (never accepted, nothing charged) and its manifest
    line says ``not_sent``; once the setup is fixed, the plain re-run sends it. A line the
    gateway itself rejected (a bad field) stays ``rejected`` until ``--retry-failed``.
    """
    return state == "rejected" and record is not None and record.get("status") == "not_sent"


async def plan_rerun(
    client: WujieClient,
    items: list[BulkItem],
    manifest_records: list[dict[str, Any]],
    *,
    retry_failed: bool,
    job_timeout: float | None,
    own_journal: bool = False,
    retry_uncertain: bool = False,
    unpriced: Collection[Kind] = (),
) -> Plan:
    """Decide, per line, from the journal: send, collect, or leave as it ended.

    A job collected counts against ``--max-points`` unless a manifest row records its cost
    (the budget is the input's, across re-runs). ``own_journal``: the journal is the output
    folder's own, so every job in it is this input's (one input per folder), the jobs of rows
    removed since included. ``unpriced``: kinds with no known price (see :func:`held`)."""
    plan = Plan()
    charged = charged_keys(manifest_records)
    elsewhere = of_another_gateway(client)
    entries = await client.journal_entries()
    if await record_manifest_keys(client, manifest_records, entries):
        entries = await client.journal_entries()  # those rows are accepted now
    plan.journal_keys = known_keys((), entries)
    latest = {entry.tag: entry for entry in entries if entry.tag}
    moved = moved_rows(items, latest)
    plan.moved = len(moved)
    saved = saved_indexes(manifest_records)
    by_key = {r["key"]: r for r in manifest_records if isinstance(r.get("key"), str)}
    by_line = {r["line"]: r for r in manifest_records if r.get("status") != "saved" and "line" in r}
    unjournaled: list[BulkItem] = []

    def _gone(entry: JournalEntry) -> bool:
        # This very job's images are gone (not an earlier job's of the line: a resend the
        # journal holds and the manifest does not, a run killed after it was accepted, is
        # collected, never paid for a third time).
        record = by_key.get(entry.job_key or "")
        return (
            entry.state == "succeeded" and record is not None and record.get("error_code") == "gone"
        )

    def _recheck(entry: JournalEntry) -> bool:
        # A job the journal calls failed whose latest manifest row says it is not told yet:
        # uncertain with its key (see RECHECKED), or asked about again by a run that stopped
        # while it ran, whose wait ended, or that saved (some of) its images (the journal's
        # "succeeded" may not have been committed). The journal's "failed" is no verdict on
        # such a job: --retry-failed resending it would pay twice.
        record = by_key.get(entry.job_key or "")
        if entry.state != "failed" or record is None:
            return False
        if record.get("status") == "uncertain" or legacy_unknown(record):
            return record.get("error_code") in RECHECKED and not retry_uncertain
        return record.get("status") in ("pending", "saved") or (
            record.get("error_code") in COLLECTED_AGAIN
        )

    def _uncertain(entry: JournalEntry, row: Row) -> bool:
        # A job the journal calls failed that the manifest calls uncertain: accepted, and
        # then reported only in ways that could not be read, or forgotten by the gateway
        # after it listed it. It may have run and been charged: --retry-failed resent it.
        record = _recorded(entry, row, by_key, by_line)
        return record is not None and record.get("status") == "uncertain"

    for item in items:
        row = Row.of(item)
        entry = latest.get(moved.get(item.tag, item.tag))
        state = entry.state if entry is not None else "unsent"
        n = int(row.body.get("n") or 1)
        if entry is None:
            unjournaled.append(item)  # the manifest's word on it, below
        elif state == "unsent" or _refused_by_a_stop(state, by_line.get(row.line)):
            plan.send.append(row)
        elif retry_failed and _gone(entry):
            plan.send.append(row)  # its images' URLs are gone: only a new job makes them
        elif state in ("accepted", "cancelled", "succeeded") and entry.job_key:
            if entry.request and entry.request != row.body:
                # An id row edited since its job was sent: that job stands, collected (and
                # recorded) as the request it was, never mistaken for the new one.
                plan.changed += 1
                row = Row(row.line, row.row_id, row.tag, dict(entry.request))
                n = images_in(entry.request) or n
            if state == "succeeded" and len(saved.get(entry.job_key, ())) >= n:
                plan.settled.append(LineOutcome("saved", row.line, row.row_id, entry.job_key))
            elif elsewhere(entry):
                plan.settled.append(elsewhere_outcome(entry, row))
            elif (job := attach_row(client, entry, plan, n, job_timeout, charged)) is not None:
                plan.collect.append((row, job))
            else:
                plan.settled.append(unusable_key(entry, row))
            plan.skipped += 1
        elif entry.job_key and _recheck(entry):
            # Asked about again: collected if the gateway lists it done now.
            record = by_key[entry.job_key]
            uncertain = held(record, row.body, unpriced)
            # Its journal row's time; for a line left uncertain (see RECHECKED), what its
            # manifest row tells, if earlier. (A pending row tells nothing of the kind: its
            # run may have stopped a moment after the submit.)
            told = record.get("error_code") in RECHECKED
            submitted_at = min(entry.created, told_long_ago(client)) if told else entry.created
            if len(saved.get(entry.job_key, ())) >= n:
                plan.settled.append(LineOutcome("saved", row.line, row.row_id, entry.job_key))
            elif elsewhere(entry):
                plan.settled.append(elsewhere_outcome(entry, row))
            elif (
                job := attach_row(
                    client,
                    entry,
                    plan,
                    n,
                    job_timeout,
                    charged,
                    held=uncertain,
                    submitted_at=submitted_at,
                )
            ) is not None:
                plan.collect.append((row, job))
                plan.rechecked.add(job.key)
            else:
                plan.settled.append(unusable_key(entry, row))
            plan.skipped += 1
        elif state in ("failed", "rejected") and retry_failed and not _uncertain(entry, row):
            plan.send.append(row)
        elif (state in ("uncertain", "intent") or _uncertain(entry, row)) and retry_uncertain:
            plan.send.append(row)
            plan.superseded[row.row_id or row.line] = entry.id
        else:
            outcome = _settled_from(entry, row, by_key, by_line)
            plan.settled.append(outcome)
            if _recorded(entry, row, by_key, by_line) is None:
                plan.unrecorded.append((row, outcome))
            plan.skipped += 1
    claimed = {moved.get(item.tag, item.tag) for item in items}
    if unjournaled:
        # Lines this journal holds no row of: a new line, or one sent under a journal lost,
        # emptied or replaced since (deleting a damaged one is the obvious fix). The manifest
        # says how those ended, as on a re-run without a journal: a saved line is not paid for
        # again (every saved line of a run was, before).
        known = plan_from_manifest(
            client,
            unjournaled,
            manifest_records,
            retry_failed=retry_failed,
            job_timeout=job_timeout,
            retry_uncertain=retry_uncertain,
            unpriced=unpriced,
            orphans=False,
            # The other lines of the input hold their rows: a line added since that repeats
            # one of them is a new row, not that one moved (it read "saved", never sent).
            claimed=claimed | {item.tag for item in items},
        )
        plan.send = sorted([*plan.send, *known.send], key=lambda row: row.line)
        plan.collect += known.collect
        plan.rechecked |= known.rechecked
        plan.settled += known.settled
        plan.skipped += known.skipped
        plan.changed += known.changed
    lines = lines_by_id(manifest_records)
    for tag, entry in latest.items():
        key = entry.job_key
        if tag in claimed or entry.state not in ("accepted", "succeeded") or not key:
            continue
        if elsewhere(entry):
            continue  # another gateway's: left accepted, for a run (resume) on that gateway
        n = images_in(entry.request) or 1
        if entry.state == "succeeded" and len(saved.get(key, ())) >= n:
            continue
        if key not in by_key and not own_journal:
            # Nothing of this input's manifest names it: a row removed before its job's key
            # was written there, or another input's job in a journal the two share.
            if entry.state == "accepted":
                plan.unclaimed += 1
            continue
        # A row edited or removed since its job was sent: that job is paid, and collected as
        # the request it was (the new row, if any, is a new line).
        row = Row(*line_of(entry, lines), tag, dict(entry.request))
        if (job := attach_row(client, entry, plan, n, job_timeout, charged)) is not None:
            plan.collect.append((row, job))
            plan.orphans += 1
    return plan


async def journal_uncertain(
    path: Path, items: list[BulkItem], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Manifest-like ``uncertain`` rows for the lines of ``items`` whose journal row reads
    uncertain (or is an intent a killed run left: it reads uncertain once opened) and whose
    manifest does not say how they ended: a run killed outright while their submits were on
    the wire wrote no row for them. Read before the run's client opens the journal (its
    budget is set then); a journal that cannot be read here is left to that open to report.
    """
    if not await anyio.to_thread.run_sync(path.is_file):
        return []
    try:
        async with JournalFile(path) as journal:
            entries = await journal.entries()
    except JournalLockedError:
        raise  # another run holds it: exit 4, as the client's open would
    except (WujieError, OSError):
        return []
    latest = {entry.tag: entry for entry in entries if entry.tag}
    moved = moved_rows(items, latest)
    # A line the manifest says ended (a not_sent row is no end: the journal says it was sent
    # since) is the manifest's to count.
    ended = {tag for tag, r in lines_ended(records).items() if r.get("status") != "not_sent"}
    rows = []
    for item in items:
        entry = latest.get(moved.get(item.tag, item.tag))
        if entry is not None and entry.state in ("uncertain", "intent") and item.tag not in ended:
            rows.append({"tag": item.tag, "status": "uncertain"})
    return rows


async def plan_resume(client: WujieClient, manifest_records: list[dict[str, Any]]) -> Plan:
    """``resume``: collect every journaled job not ended (a wait for it cancelled included),
    or ended with images not saved, and ask again about the jobs of uncertain lines the
    gateway accepted (see RECHECKED), as a re-run of ``bulk`` does: asking costs nothing;
    their images are saved if the gateway lists them done now, else they stay uncertain."""
    plan = Plan()
    saved = saved_indexes(manifest_records)
    elsewhere = of_another_gateway(client)
    await record_manifest_keys(client, manifest_records)
    lines = lines_by_id(manifest_records)
    by_key = {r["key"]: r for r in manifest_records if isinstance(r.get("key"), str)}
    # Each line's latest row: an older one was superseded by a resend of the line.
    # (A row without a tag by its number: see _journal_rows.rows_per_line.)
    latest: dict[str | int, int] = {
        entry.tag or entry.id: entry.id for entry in await client.journal_entries()
    }
    # A cancelled row's job was accepted (paid) and only a wait for it was cancelled: its
    # images are collected, as a bulk re-run collects them (`journal forget` says so).
    for entry in await client.journal_entries("accepted", "cancelled", "succeeded", "failed"):
        n = images_in(entry.request) or 1
        if not entry.job_key or len(saved.get(entry.job_key, ())) >= n:
            continue
        record = by_key.get(entry.job_key)
        recheck = (
            entry.state == "failed"
            and record is not None
            and latest.get(entry.tag or entry.id) == entry.id
            and (record.get("status") == "uncertain" or legacy_unknown(record))
            and record.get("error_code") in RECHECKED
        )
        if entry.state == "failed" and not recheck:
            continue
        line, row_id = line_of(entry, lines)
        row = Row(line, row_id, entry.tag, entry.request)
        if elsewhere(entry):
            plan.settled.append(elsewhere_outcome(entry, row))
            continue
        job = attach_row(
            client,
            entry,
            plan,
            n,
            None,
            frozenset(),
            submitted_at=min(entry.created, told_long_ago(client)) if recheck else None,
        )
        if job is not None:
            plan.collect.append((row, job))
            if recheck:
                plan.rechecked.add(job.key)
        else:
            plan.settled.append(unusable_key(entry, row))
    return plan
