"""One job at a time: ``generate``/``edit`` requests from flags, ``--no-wait``, ``status KEY...``.

``edit`` takes ``--image`` and ``--mask`` as http(s) URLs (sent as given: the gateway fetches
them) or local files, read here and sent inline as base64 data URLs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import time
from typing import Any, Final

from .. import (
    ImageJob,
    InvalidRequestError,
    JobCancelledError,
    JobProtocolError,
    Limits,
    UnknownJobError,
    WujieClient,
)
from .._image_formats import sniff_format
from .._keys import is_job_key
from .._local_files import LocalFileError, read_regular_file
from .._models import EditRequest, GenerationRequest
from .._rules import GPT_IMAGE_MAX_BYTES
from ._common import EXIT_FAILED, EXIT_OK, EXIT_SYSTEMIC, UsageError, open_client
from ._outcome import clean

# The most an image file may hold: gpt-image-1 takes images under 25 MB, the most any model
# takes (dall-e-2's 4 MB is checked with the request). One byte more is read, never the rest.
MAX_IMAGE_FILE_BYTES: Final = GPT_IMAGE_MAX_BYTES - 1
_MIME = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_INDEXED = re.compile(r"^(?P<field>\w+)\[(?P<index>\d+)\]$")
# How long ``status`` (without --wait) waits for the gateway to list every key.
STATUS_WAIT_S: Final = 15.0
# How long a key may be left out of the gateway's replies before ``status`` reads it as not
# found (the client's grace is 30 s: a key may be absent for a moment right after its submit).
STATUS_KEY_GRACE_S: Final = 3.0
# Batch calls that may fail (after their retries) before ``status`` stops waiting for replies.
STATUS_FAILED_CALLS: Final = 3


def image_argument(value: str, flag: str) -> str:
    """An ``--image``/``--mask`` value as the request carries it: a URL, or a data URL."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    try:
        # A regular file only, read up to the limit: a FIFO would block the open and
        # /dev/zero would fill memory.
        data = read_regular_file(value, MAX_IMAGE_FILE_BYTES)
    except LocalFileError as exc:
        if exc.too_large:
            raise UsageError(
                f"{flag} {value}: larger than {GPT_IMAGE_MAX_BYTES // 1_000_000} MB "
                "(no model takes an image this large)"
            ) from None
        raise UsageError(
            f"{flag} {value}: cannot read it ({exc.reason}); give an image file or an http(s) URL"
        ) from None
    kind = sniff_format(data[:16])
    if kind is None:
        raise UsageError(f"{flag} {value}: not a PNG, JPEG or WEBP image")
    return f"data:{_MIME[kind]};base64,{base64.b64encode(data).decode('ascii')}"


def _flag(field: str) -> str:
    """A request field as the command line names it (``image[1]`` is the 2nd ``--image``)."""
    found = _INDEXED.match(field)
    if found:
        return f"--{found['field']} #{int(found['index']) + 1}"
    if field == "prompt":
        return "prompt"  # the positional argument, as the usage line names it
    return "-n" if field == "n" else f"--{field.replace('_', '-')}"


def _rule(rule: str) -> str:
    """A field's rule as the command line reads it: its arguments come as bytes, and bytes
    that are not UTF-8 arrive as lone surrogates, which the library's rule names."""
    if "lone surrogates" in rule:
        return "must be UTF-8 text (the argument holds bytes that are not)"
    return rule


def build_request(
    args: argparse.Namespace, defaults: dict[str, Any]
) -> GenerationRequest | EditRequest:
    """The ``generate`` or ``edit`` request the flags describe; a UsageError names the flag."""
    fields: dict[str, Any] = {**defaults, "prompt": args.prompt}
    kind: type[GenerationRequest | EditRequest] = GenerationRequest
    if args.command == "edit":
        kind = EditRequest
        fields["image"] = [image_argument(value, "--image") for value in args.image]
        if args.mask is not None:
            fields["mask"] = image_argument(args.mask, "--mask")
    try:
        return kind.build(fields)
    except InvalidRequestError as exc:
        raise UsageError("; ".join(f"{_flag(f)}: {_rule(r)}" for f, r in exc.violations)) from None


async def submit(client: WujieClient, body: dict[str, Any], **options: Any) -> ImageJob:
    """Submit ``body`` to the endpoint it belongs to: an edit when it carries images."""
    if "image" in body:
        return await client.images.submit_edit(**body, **options)
    return await client.images.submit(**body, **options)


async def submit_no_wait(args: argparse.Namespace, request: GenerationRequest | EditRequest) -> int:
    """``generate --no-wait`` / ``edit --no-wait``: submit, print the key, exit."""
    async with open_client(args, Limits(), None) as client:
        job = await submit(client, request.body(), job_timeout=args.job_timeout)
        if args.json:
            print(json.dumps({"key": job.key}))  # noqa: T201 - this command's output
        else:
            print(job.key)  # noqa: T201 - the key is this command's output
    return EXIT_OK


async def show_status(args: argparse.Namespace) -> int:
    """``status KEY...``: one line per key, as the gateway reports it now."""
    limits = Limits()
    async with open_client(args, limits, None, unknown_key_grace=STATUS_KEY_GRACE_S) as client:
        jobs = [_attach(client, key) for key in args.keys]
        await _first_reports(client, jobs)
        findings = [_finding(job) for job in jobs]
        for job in jobs:
            line = json.dumps(as_json(job)) if args.json else describe(job)
            print(line)  # noqa: T201 - the status lines are this command's output
    if NO_ANSWER in findings:
        return EXIT_SYSTEMIC
    return EXIT_OK if all(found == FOUND for found in findings) else EXIT_FAILED


def _attach(client: WujieClient, key: str) -> ImageJob:
    try:
        # The job's deadline is the wait's: a key never answered about ends with a
        # JobTimeoutError that says why (the batch calls failing, and how).
        return client.images.attach(key, job_timeout=STATUS_WAIT_S)
    except InvalidRequestError:
        raise UsageError(not_a_key(key)) from None


# What a job key looks like, as the command line says it: the rule the library checks
# (``check_key``) and where a user finds real keys.
KEY_RULE: Final = (
    "a job key is 1 to 128 characters with no whitespace, control or invisible characters, "
    "as the gateway handed it out (e.g. 3E46BF62A51256A96EEFB73079BD55E2): the key "
    '`generate --no-wait` printed, or a manifest row\'s "key"'
)


def not_a_key(key: str) -> str:
    """The usage error of a ``KEY`` argument that is no job key (see :data:`KEY_RULE`)."""
    return f"KEY {clean(key)[:140]!r} is not a job key: {KEY_RULE} (nothing was asked)"


def check_keys(keys: list[str]) -> None:
    """Refuse a ``KEY`` that is no job key before anything else (credentials, the output
    folder, the gateway): a mistyped or half-pasted key is said as such, naming the rule."""
    for key in keys:
        if not is_job_key(key):
            raise UsageError(not_a_key(key))


async def _first_reports(client: WujieClient, jobs: list[ImageJob]) -> None:
    """Wait until the gateway has listed every key or each has ended, or a short deadline.

    A key the gateway does not list ends once it has been left out of the replies for
    ``STATUS_KEY_GRACE_S`` (and one listed only in unreadable entries likewise); a key the
    gateway could not be asked about (its batch calls fail: a 5xx, a 401, a page that is not
    JSON) ends at the deadline. The wait ends sooner when the calls keep failing, and
    whatever was not answered reads as "no answer", never as "not found".
    """
    errors_before = client.stats.batch_errors
    deadline = time.monotonic() + STATUS_WAIT_S + 1.0  # the jobs' own deadlines come first
    while time.monotonic() < deadline:
        if all(_reported(job) for job in jobs):
            return
        if client.stats.batch_errors - errors_before >= STATUS_FAILED_CALLS:
            return
        await asyncio.sleep(0.02)  # reads in-memory job state only; the poller does the asking


def _reported(job: ImageJob) -> bool:
    """Has the gateway listed this key (or has the job ended) since it was attached?"""
    return job.status is not None or job.done()


# What ``status`` learnt of a key.
FOUND: Final = "found"  # listed
UNREADABLE: Final = "unreadable"  # listed only in entries that could not be read (or too large)
NOT_FOUND: Final = "not found"  # replies came back without it for STATUS_KEY_GRACE_S
NO_ANSWER: Final = "no answer"  # no reply about it came back: the calls failed or were slow


def _finding(job: ImageJob) -> str:
    if job.status is not None:
        return FOUND
    error = job.exception() if job.done() else None
    if isinstance(error, UnknownJobError):
        return NOT_FOUND
    if isinstance(error, JobProtocolError):
        return UNREADABLE
    return NO_ANSWER


def as_json(job: ImageJob) -> dict[str, Any]:
    """One key's status as a JSON object (``status --json`` prints one per line)."""
    error = job.exception() if job.done() else None
    finding = _finding(job)
    return {
        "key": job.key,
        # null: the gateway could not be asked (its calls failed): neither found nor not.
        "found": None if finding == NO_ANSWER else finding != NOT_FOUND,
        "status": job.status_name if job.status is not None else finding,
        "status_code": None if job.status is None else int(job.status),
        "progress": job.progress,
        "expected_seconds": job.expected_seconds,
        "queue_position": job.queue_position,
        "points": job.points_charged,
        "images": [
            {"index": image.index, "url": image.url, "inline": image.b64_json is not None}
            for image in job.images
        ],
        "error": _why(job) if finding == NO_ANSWER else clean(error) if error else None,
    }


def _why(job: ImageJob) -> str:
    """Why a key the gateway has not reported on reads as it does (one clean line)."""
    error = job.exception() if job.done() else None
    if error is None or isinstance(error, JobCancelledError):
        return "the gateway's batch calls failed (see the warnings above)"
    return clean(error)


def describe(job: ImageJob) -> str:
    """One status line: key, state, progress, images, or why it ended."""
    finding = _finding(job)
    if finding == NOT_FOUND:
        # Not "does not exist": a gateway may take seconds to list a key it has just handed
        # out, and a user told "not found" about a paid job may submit it again.
        return (
            f"{job.key}  not found (the gateway does not list this key; one submitted in the "
            "last 30 s may not be listed yet: `status KEY --wait` waits for it)"
        )
    if job.status is None:  # listed only unreadably, or not answered about
        said = _why(job)
        if finding == NO_ANSWER:
            return f"{job.key}  no answer (not known whether the gateway lists it): {said}"
        return f"{job.key}  unreadable: {said}"
    parts = [job.key, job.status_name, f"{job.progress:.0f}%"]
    if job.images:
        parts.append(f"{len(job.images)} image(s)")
    error = job.exception()
    if error is not None:
        parts.append(clean(error))
    elif not job.done() and job.expected_seconds is not None:
        parts.append(f"about {job.expected_seconds:.0f} s left")
    return "  ".join(parts)
