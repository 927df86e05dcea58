"""A re-run without a journal: the manifest's rows decide what each line does (see
:func:`plan_from_manifest`)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .. import (
    WujieClient,
)
from .._budget import Kind
from ._bulk_data import Row
from ._input import BulkItem, moved_rows
from ._manifest import line_outcome, recorded_request
from ._manifest_keys import charged_keys
from ._outcome import LineOutcome, Status, clean
from ._plan import (
    COLLECTED_AGAIN,
    OPEN_STATES,
    RECHECKED,
    Plan,
    as_int,
    attach_key,
    held,
    legacy_unknown,
    told_long_ago,
)


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
        n = as_int(row.body.get("n")) or 1  # a manifest's value: any JSON at all
        if last.get("status") == "saved" and isinstance(key, str):
            indexes = {
                r.get("index") for r in mine if r.get("status") == "saved" and r.get("key") == key
            }
            if len(indexes) >= n:
                plan.settled.append(LineOutcome("saved", row.line, row.row_id, key))
            elif (job := attach_key(client, key, row, n, job_timeout, charged)) is not None:
                plan.collect.append((row, job))
            else:
                plan.send.append(row)
                continue  # sent again: not skipped
        elif (
            last.get("error_code") in COLLECTED_AGAIN
            and not (retry_failed and last.get("error_code") == "gone")
            and isinstance(key, str)
            and (job := attach_key(client, key, row, n, job_timeout, charged)) is not None
        ):
            plan.collect.append((row, job))  # paid, and may have ended since: never resent
        elif (
            (last.get("status") == "uncertain" or legacy_unknown(last))
            and last.get("error_code") in RECHECKED
            and not retry_uncertain
            and isinstance(key, str)
            and (
                job := attach_key(
                    client,
                    key,
                    row,
                    n,
                    job_timeout,
                    charged,
                    held=held(last, row.body, unpriced),
                    submitted_at=told_long_ago(client),
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
            status: Status = last.get("status") if last.get("status") in OPEN_STATES else "failed"  # type: ignore[assignment]
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
            as_int(last.get("line")),
            row_id if isinstance(row_id, str) else None,
            tag,
            recorded_request(last, {}),
        )
        n = as_int(row.body.get("n")) or 1
        if (job := attach_key(client, key, row, n, job_timeout, charged)) is not None:
            plan.collect.append((row, job))
            plan.orphans += 1
    return plan


def _still_paid_for(last: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """True when a row's last record says its job may still give images this run should save:
    it was running when the run ended, ran past its deadline, or some images were not saved."""
    if last.get("status") == "pending" or last.get("error_code") in COLLECTED_AGAIN:
        return True
    if last.get("status") != "saved":
        return False
    key = last.get("key")
    saved = {r.get("index") for r in rows if r.get("status") == "saved" and r.get("key") == key}
    n = last.get("n")
    return isinstance(n, int) and len(saved) < n


def _row_of(record: dict[str, Any]) -> str:
    tag = record.get("tag")
    if isinstance(tag, str):
        return tag
    body = {"prompt": record.get("prompt"), "model": record.get("model")}
    return _legacy_row(record.get("line"), body)


def _legacy_row(line: Any, body: dict[str, Any]) -> str:
    """Records written before tags were: a line is its number and prompt."""
    return f"legacy:{line}:{body.get('model')}:{body.get('prompt')}"
