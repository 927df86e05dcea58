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

import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .. import (
    ImageJob,
    InvalidRequestError,
    JournalEntry,
    JournalFile,
    JournalLockedError,
    WujieClient,
    WujieError,
)
from .._budget import Kind, kind_of
from .._gateway_identity import gateway_fingerprint, shown_base_url
from .._keys import images_in
from ._bulk_data import Row
from ._common import UsageError
from ._input import BulkItem, line_tag, moved_rows
from ._manifest_keys import charged_keys, record_manifest_keys
from ._outcome import (
    OTHER_GATEWAY,
    LineOutcome,
    Status,
    clean,
    line_outcome,
    lines_ended,
    recorded_request,
    saved_indexes,
)
from ._single import not_a_key

_REPR = re.compile(r"^[A-Za-z_]\w*\((['\"])(.*?)(\1\))?$", re.DOTALL)
_OPEN_STATES = ("failed", "moderated", "rejected", "uncertain")
# Lines whose job was paid and may still give its images (it ran on past the deadline or the
# stop, or succeeded but an image could not be saved): a re-run collects them by key.
_COLLECTED_AGAIN = ("timeout", "interrupted", "download", "gone")
# Uncertain lines whose job the gateway accepted (it has a key) and then reported only in ways
# that could not be read, or never listed or forgot: the job may have succeeded since (or the
# gateway answers readably now). A plain re-run asks about the key again (asking costs
# nothing; it is no resend) and collects the images if the job is listed done.
RECHECKED = ("protocol_error", "unknown_job")


@dataclass(slots=True)
class Plan:
    """What this run does with each line."""

    send: list[Row] = field(default_factory=list)
    collect: list[tuple[Row, ImageJob]] = field(default_factory=list)
    settled: list[LineOutcome] = field(default_factory=list)
    skipped: int = 0
    moved: int = 0  # lines recognised by their request at another line than recorded
    changed: int = 0  # id rows whose request differs from the job the journal holds
    # Jobs of rows no longer in the input (edited or removed since) collected all the same,
    # and running ones the journal holds that no row of this input's manifest names.
    orphans: int = 0
    unclaimed: int = 0
    # Settled lines whose outcome the manifest lacks (a run killed before writing it).
    unrecorded: list[tuple[Row, LineOutcome]] = field(default_factory=list)
    unusable: list[int] = field(default_factory=list)  # journal rows whose key is not usable
    # Journal rows of uncertain lines resent (--retry-uncertain), by the line's row id (else
    # its number): once its new submit is out, the old row is superseded and forgotten (as
    # journal resend does, see sent_lines).
    superseded: dict[str | int, int] = field(default_factory=dict)
    # Every key the journal holds: no new submit of this run may be given one of them.
    journal_keys: set[str] = field(default_factory=set)
    # Keys of uncertain lines asked about again (see RECHECKED): their cost is held as the
    # uncertain lines' (never counted twice), and a line that still cannot be told ends
    # uncertain again, never failed (BulkRun(rechecked=...)).
    rechecked: set[str] = field(default_factory=set)


def of_another_gateway(client: WujieClient) -> Callable[[JournalEntry], bool]:
    """Whether a journal row's submit went to another gateway than ``client``'s (another base
    URL or app id). A row that records none (written before rows did) is taken as this one's."""
    mine = gateway_fingerprint(client.base_url, client.credentials.app_id)
    return lambda entry: entry.gateway_fingerprint not in (None, mine)


def elsewhere_outcome(entry: JournalEntry, row: Row) -> LineOutcome:
    """A line whose job another gateway accepted: left to a run on that gateway."""
    shown = shown_base_url(entry.base_url or "") or "(not recorded)"
    return LineOutcome(
        "uncertain",
        row.line,
        row.row_id,
        entry.job_key,
        OTHER_GATEWAY,
        f"accepted (paid) by another gateway, base URL {shown} (or another app id): not "
        "collected from this one, and not sent again; collect it with a run on that gateway",
        base_url=shown,
    )


def known_keys(records: Iterable[dict[str, Any]], entries: Iterable[JournalEntry] = ()) -> set[str]:
    """Every job key the manifest's ``records`` and the journal's ``entries`` hold: keys of
    earlier jobs that no new submit may be given (``WujieClient.refuse_keys``)."""
    keys = {key for record in records if isinstance(key := record.get("key"), str)}
    return keys | {entry.job_key for entry in entries if entry.job_key}


def readable_error(error: str) -> str:
    """A journaled error as words: rows may hold ``Class('message')``; keep the message.

    A cancelled submit is journaled as ``CancelledError(...)`` whose text says nothing to a
    user (``Cancelled via cancel scope 7f79...``): it is said in words instead.
    """
    if error.startswith("CancelledError("):
        return "interrupted while the submit was under way: it may have been accepted (and charged)"
    found = _REPR.match(error)
    return clean(found.group(2) if found else error)


def line_of(entry: JournalEntry, lines: Mapping[str, int] | None = None) -> tuple[int, str | None]:
    """The input line and row id a journal row's tag names. An id row's tag holds no line:
    ``lines`` (the manifest's line of each id, see :func:`lines_by_id`) gives it, else 0."""
    tag = entry.tag or ""
    if tag.startswith("id:"):
        row_id = tag[3:]
        return (lines or {}).get(row_id, 0), row_id
    parsed = line_tag(tag)
    return (parsed[0] if parsed is not None else 0), None


def sent_lines(outcomes: Iterable[LineOutcome]) -> set[str | int]:
    """The lines a run sent (each by its row id, else its number): every outcome but
    ``not_sent``. A journal row such a line was resent for is superseded by the new submit."""
    return {o.row_id or o.line for o in outcomes if o.status != "not_sent"}


def lines_by_id(records: list[dict[str, Any]]) -> dict[str, int]:
    """The latest input line the manifest gives each row id."""
    return {
        record["id"]: record["line"]
        for record in records
        if isinstance(record.get("id"), str) and _int(record.get("line")) > 0
    }


def _settled_from(
    entry: JournalEntry, row: Row, by_key: dict[str, dict[str, Any]], by_line: dict[int, Any]
) -> LineOutcome:
    """The outcome a previous run recorded for a line this run leaves alone."""
    record = _recorded(entry, row, by_key, by_line) or {}
    status: Status = record.get("status") if record.get("status") in _OPEN_STATES else None  # type: ignore[assignment]
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
    removed since included. ``unpriced``: kinds with no known price (see :func:`_held`)."""
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
        if record.get("status") == "uncertain" or _legacy_unknown(record):
            return record.get("error_code") in RECHECKED and not retry_uncertain
        return record.get("status") in ("pending", "saved") or (
            record.get("error_code") in _COLLECTED_AGAIN
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
            elif (job := _attach(client, entry, plan, n, job_timeout, charged)) is not None:
                plan.collect.append((row, job))
            else:
                plan.settled.append(_unusable_key(entry, row))
            plan.skipped += 1
        elif entry.job_key and _recheck(entry):
            # Asked about again: collected if the gateway lists it done now.
            record = by_key[entry.job_key]
            uncertain = _held(record, row.body, unpriced)
            # Its journal row's time; for a line left uncertain (see RECHECKED), what its
            # manifest row tells, if earlier. (A pending row tells nothing of the kind: its
            # run may have stopped a moment after the submit.)
            told = record.get("error_code") in RECHECKED
            submitted_at = min(entry.created, _told_long_ago(client)) if told else entry.created
            if len(saved.get(entry.job_key, ())) >= n:
                plan.settled.append(LineOutcome("saved", row.line, row.row_id, entry.job_key))
            elif elsewhere(entry):
                plan.settled.append(elsewhere_outcome(entry, row))
            elif (
                job := _attach(
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
                plan.settled.append(_unusable_key(entry, row))
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
        if (job := _attach(client, entry, plan, n, job_timeout, charged)) is not None:
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


def plan_from_manifest(
    client: WujieClient,
    items: list[BulkItem],
    records: list[dict[str, Any]],
    *,
    retry_failed: bool,
    job_timeout: float | None,
    retry_uncertain: bool = False,
    unpriced: Collection[Kind] = (),
    orphans: bool = True,
    claimed: Collection[str] = (),
) -> Plan:
    """A re-run without a journal continues its manifest: lines saved stay saved, a job whose
    images were partly saved, that timed out, whose run stopped while it ran or whose images
    could not be saved is collected again by its key, lines that ended otherwise keep their
    outcome (failed ones are resent with ``--retry-failed``;
    uncertain ones only with ``--retry-uncertain``; those with a job key are asked about again
    and collected if the gateway now lists them done), and the rest (not sent, or never recorded)
    are sent. A job
    collected counts against ``--max-points`` unless a row records its cost. ``orphans``:
    also collect the jobs of rows no longer in the input (off when ``items`` is a part of
    it: the lines a journal holds no row of). ``claimed``: the recorded rows the rest of the
    input holds (when ``items`` is a part of it), which no line of ``items`` moved to."""
    plan = Plan()
    charged = charged_keys(records)
    by_row: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_row.setdefault(_row_of(record), []).append(record)
    moved = moved_rows(items, by_row, claimed=claimed)
    plan.moved = len(moved)
    for item in items:
        row = Row.of(item)
        mine = by_row.get(moved.get(item.tag, item.tag)) or by_row.get(
            _legacy_row(row.line, row.body), []
        )
        if not mine or line_outcome(mine).get("status") == "not_sent":
            plan.send.append(row)
            continue
        last = line_outcome(mine)
        key = last.get("key")
        if row.row_id is not None and isinstance(key, str):
            recorded = recorded_request(last, row.body)
            if recorded != row.body:
                # An id row edited since its job was sent: that job stands, collected (and
                # recorded) as the request it was, never mistaken for the new one.
                plan.changed += 1
                row = Row(row.line, row.row_id, row.tag, recorded)
        n = _int(row.body.get("n")) or 1  # a manifest's value: any JSON at all
        if last.get("status") == "saved" and isinstance(key, str):
            indexes = {
                r.get("index") for r in mine if r.get("status") == "saved" and r.get("key") == key
            }
            if len(indexes) >= n:
                plan.settled.append(LineOutcome("saved", row.line, row.row_id, key))
            elif (job := _attach_key(client, key, row, n, job_timeout, charged)) is not None:
                plan.collect.append((row, job))
            else:
                plan.send.append(row)
                continue  # sent again: not skipped
        elif (
            last.get("error_code") in _COLLECTED_AGAIN
            and not (retry_failed and last.get("error_code") == "gone")
            and isinstance(key, str)
            and (job := _attach_key(client, key, row, n, job_timeout, charged)) is not None
        ):
            plan.collect.append((row, job))  # paid, and may have ended since: never resent
        elif (
            (last.get("status") == "uncertain" or _legacy_unknown(last))
            and last.get("error_code") in RECHECKED
            and not retry_uncertain
            and isinstance(key, str)
            and (
                job := _attach_key(
                    client,
                    key,
                    row,
                    n,
                    job_timeout,
                    charged,
                    held=_held(last, row.body, unpriced),
                    submitted_at=_told_long_ago(client),
                )
            )
            is not None
        ):
            # Accepted, then not told: asked about again (its cost stays held as the
            # uncertain line's); collected if the gateway lists it done now.
            plan.collect.append((row, job))
            plan.rechecked.add(key)
        elif last.get("status") in ("failed", "moderated", "rejected") and retry_failed:
            plan.send.append(row)
            continue  # sent again: not skipped
        elif last.get("status") == "uncertain" and retry_uncertain:
            plan.send.append(row)
            continue
        else:
            status: Status = last.get("status") if last.get("status") in _OPEN_STATES else "failed"  # type: ignore[assignment]
            message = clean(last.get("error") or status)
            plan.settled.append(
                LineOutcome(status, row.line, row.row_id, key, last.get("error_code"), message)
            )
        plan.skipped += 1
    if not orphans:
        return plan
    claimed = {moved.get(item.tag, item.tag) for item in items}
    # Each key's newest row, whatever row it is under: a line that moved had its job recorded
    # under its new place since, and its old place's row is no longer the last word on it.
    newest = {r["key"]: r for r in records if isinstance(r.get("key"), str)}
    for tag, mine in by_row.items():
        last = mine[-1]
        key = last.get("key")
        if tag in claimed or tag.startswith("legacy:") or not isinstance(key, str):
            continue
        if newest.get(key) is not last:
            continue
        if not _still_paid_for(last, mine):
            continue
        # A row edited or removed since its job was sent: that job is paid, and collected as
        # the request it was (the new row, if any, is a new line).
        row_id = last.get("id")
        row = Row(
            _int(last.get("line")),
            row_id if isinstance(row_id, str) else None,
            tag,
            recorded_request(last, {}),
        )
        n = _int(row.body.get("n")) or 1
        if (job := _attach_key(client, key, row, n, job_timeout, charged)) is not None:
            plan.collect.append((row, job))
            plan.orphans += 1
    return plan


def _held(record: dict[str, Any], body: dict[str, Any], unpriced: Collection[Kind]) -> bool:
    """Whether the budget holds the cost of an uncertain line asked about again already: it
    counts what uncertain lines may have cost (``uncertain_cost``) at their kind's price. A
    line of a kind with no known price (``unpriced``) is counted at nothing there, so its job
    is charged to the budget when collected (what it cost, once it is known), as any job
    collected is: never twice, never not at all."""
    if record.get("status") != "uncertain":
        return False
    return kind_of(body, images_in(body) or 1) not in unpriced


def _legacy_unknown(record: dict[str, Any]) -> bool:
    """A row of a job whose key the gateway handed out and then never listed, written
    ``failed`` by a version before such jobs ended ``uncertain``: it may have run and been
    charged all the same, so it is asked about again, never resent by ``--retry-failed``
    (its cost is not held as an uncertain line's: the collect counts it)."""
    return record.get("status") == "failed" and record.get("error_code") == "unknown_job"


def _still_paid_for(last: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """True when a row's last record says its job may still give images this run should save:
    it was running when the run ended, ran past its deadline, or some images were not saved."""
    if last.get("status") == "pending" or last.get("error_code") in _COLLECTED_AGAIN:
        return True
    if last.get("status") != "saved":
        return False
    key = last.get("key")
    saved = {r.get("index") for r in rows if r.get("status") == "saved" and r.get("key") == key}
    n = last.get("n")
    return isinstance(n, int) and len(saved) < n


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _row_of(record: dict[str, Any]) -> str:
    tag = record.get("tag")
    if isinstance(tag, str):
        return tag
    body = {"prompt": record.get("prompt"), "model": record.get("model")}
    return _legacy_row(record.get("line"), body)


def _legacy_row(line: Any, body: dict[str, Any]) -> str:
    """Records written before tags were: a line is its number and prompt."""
    return f"legacy:{line}:{body.get('model')}:{body.get('prompt')}"


def _attach_key(
    client: WujieClient,
    key: str,
    row: Row,
    n: int,
    job_timeout: float | None,
    charged: frozenset[str],
    *,
    held: bool = False,
    submitted_at: float | None = None,
) -> ImageJob | None:
    try:
        return _attach_charged(
            client, key, row.body, n, job_timeout, charged, held=held, submitted_at=submitted_at
        )
    except InvalidRequestError:
        return None


def _told_long_ago(client: WujieClient) -> float:
    """A time an uncertain line's job (see RECHECKED) was surely submitted by, as its
    manifest row tells (a manifest keeps no submit times): the row says the gateway listed
    the key and then forgot it, or left it out of its replies, or listed it only unreadably,
    for a whole grace after the submit, before the row was written. Past that moment after
    a submit, a key never listed on the re-ask ends after a few seconds of replies
    (``attach(submitted_at=...)``), not after the whole grace again: it stays uncertain."""
    return time.time() - client.poll_policy.unknown_key_grace


def _attach_charged(
    client: WujieClient,
    key: str,
    request: dict[str, Any],
    n: int,
    job_timeout: float | None,
    charged: frozenset[str],
    *,
    held: bool = False,
    submitted_at: float | None = None,
) -> ImageJob:
    """The job of an earlier run's key. Its cost counts against the budget (if any) unless
    ``charged`` says a manifest row records it, the request names no model to price it by, or
    ``held``: an uncertain line's, whose cost the budget holds already (``uncertain_cost``).

    Raises:
        InvalidRequestError: the key (or ``n``) is not usable.
    """
    return client.images.attach(
        key,
        job_timeout=job_timeout,
        n=n,
        request=request,
        charge_budget=not held and key not in charged and isinstance(request.get("model"), str),
        submitted_at=submitted_at,
    )


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
            and (record.get("status") == "uncertain" or _legacy_unknown(record))
            and record.get("error_code") in RECHECKED
        )
        if entry.state == "failed" and not recheck:
            continue
        line, row_id = line_of(entry, lines)
        row = Row(line, row_id, entry.tag, entry.request)
        if elsewhere(entry):
            plan.settled.append(elsewhere_outcome(entry, row))
            continue
        job = _attach(
            client,
            entry,
            plan,
            n,
            None,
            frozenset(),
            submitted_at=min(entry.created, _told_long_ago(client)) if recheck else None,
        )
        if job is not None:
            plan.collect.append((row, job))
            if recheck:
                plan.rechecked.add(job.key)
        else:
            plan.settled.append(_unusable_key(entry, row))
    return plan


def _attach(
    client: WujieClient,
    entry: JournalEntry,
    plan: Plan,
    n: int,
    job_timeout: float | None,
    charged: frozenset[str],
    *,
    held: bool = False,
    submitted_at: float | None = None,
) -> ImageJob | None:
    """The job of a journaled key (see :func:`_attach_charged`), or None (noted in ``plan``)
    when the key is not usable: one damaged row never stops the others."""
    try:
        return _attach_charged(
            client,
            entry.job_key or "",
            entry.request,
            n,
            job_timeout,
            charged,
            held=held,
            submitted_at=submitted_at,
        )
    except InvalidRequestError:
        plan.unusable.append(entry.id)
        return None


def _unusable_key(entry: JournalEntry, row: Row) -> LineOutcome:
    return LineOutcome(
        "failed",
        row.line,
        row.row_id,
        None,
        "journal",
        f"journal row {entry.id} holds a job key that is not usable "
        f"({clean(entry.job_key)[:40]!r}); its job cannot be followed (see the gateway's console)",
    )


def plan_status(
    client: WujieClient,
    keys: list[str],
    *,
    job_timeout: float | None,
) -> Plan:
    """``status --wait``: collect the jobs of these keys (numbered 1.. in the order given).

    Images an earlier run saved (the manifest says which) are not fetched again.
    """
    plan = Plan()
    for number, key in enumerate(keys, start=1):
        try:
            job = client.images.attach(key, job_timeout=job_timeout)
        except InvalidRequestError:
            raise UsageError(not_a_key(key)) from None
        plan.collect.append((Row(number, None, None, {}), job))
    return plan
