"""Every detail of the wire contract that the platform has not published.

``docs/API.md`` marks these lines **[assumed]** (and lists where each one lives here). They live
here, and only here, so that when a real gateway disagrees one edit corrects the client and the
emulator together. Published ([doc]/[platform]) facts that several modules need are kept here
too, labelled as such: paths, envelope codes, the batch limit and reply shape, and
:class:`JobStatus`, the job statuses both sides read.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

# --- Base URL and paths -----------------------------------------------------------------------
PRODUCTION_BASE_URL: Final = "https://gate.wujieai.net/wj-open/v1"  # [doc]
BASE_PATH: Final = "/wj-open/v1"  # [doc] prefix of every endpoint
GENERATIONS_PATH: Final = "/ai/wj/images/generations"  # [doc]
EDITS_PATH: Final = "/ai/wj/images/edits"  # [doc]
BATCH_INFO_PATH: Final = "/ai/wj/images/info"  # [assumed path]

# --- Authentication -----------------------------------------------------------------------------
SECRET_KEY_VERSION: Final = "1"  # [platform]
# A signature may be reused for a few minutes; a public SDK caches it 4 minutes [platform].
SIGNATURE_REUSE_SECONDS: Final = 240.0
# The window a server accepts around its own clock [assumed].
TIMESTAMP_MAX_AGE_SECONDS: Final = 600
TIMESTAMP_MAX_FUTURE_SECONDS: Final = 300
AUTH_ERROR_CODE: Final = "401"  # [assumed] envelope code on HTTP 401

# --- Envelope codes -------------------------------------------------------------------------------
SUCCESS_CODE: Final = "200"  # [doc]
CODE_INVALID_PARAMETER: Final = "20010001"  # [platform]
CODE_UNSUPPORTED_SIZE: Final = "20010015"  # [platform]
CODE_LOCK_RACE: Final = "20010018"  # [platform] safe to resubmit
CODE_SENSITIVE_PROMPT: Final = "20110001"  # [platform]
CODE_INSUFFICIENT_BALANCE: Final = "20110010"  # [platform]
# What each code means, as the contract words it: said for a refusal (or a job's fail_code)
# whose message is empty, which said only its code.
CODE_MEANINGS: Final = {
    CODE_INVALID_PARAMETER: "invalid parameter",
    CODE_UNSUPPORTED_SIZE: "unsupported size/resolution",
    CODE_LOCK_RACE: "lock race (safe to resubmit)",
    CODE_SENSITIVE_PROMPT: "prompt contains sensitive words",
    CODE_INSUFFICIENT_BALANCE: "insufficient points balance",
}

# --- Prompts --------------------------------------------------------------------------------------
# [assumed] API.md gives no bound on a prompt: these are the upstream models' own (a longer
# prompt is refused there, after the gateway may have charged for it). A model not listed (a
# model name the client does not know) gets the largest of them. A bound, above all, against
# an accident: a 50 MB line of a bulk input was sent, and paid for.
MAX_PROMPT_CHARS: Final = {"gpt-image-1": 32_000, "dall-e-3": 4_000, "dall-e-2": 1_000}
MAX_PROMPT_CHARS_OTHER: Final = 32_000

# --- Edits ----------------------------------------------------------------------------------------
# Source images one edit takes, by model: dall-e-2 exactly one [doc]; gpt-image-1 1 to 16
# [assumed] (API.md is silent; the upstream model's own documentation allows 16). A known model
# not listed edits nothing [assumed]: API.md gives edit image rules for these two only, none
# for dall-e-3.
EDIT_IMAGES: Final = {"gpt-image-1": 16, "dall-e-2": 1}

# --- Batch detail query ---------------------------------------------------------------------------
MAX_KEYS_PER_BATCH: Final = 50  # [assumed] more gets CODE_INVALID_PARAMETER
MAX_IMAGES_PER_JOB: Final = 10  # [doc] n is 1 to 10: an entry listing more is not to be believed
# [assumed] the reply is {"data": {"list": [entry, ...]}}; the client also reads a bare array
# and a null list (none listed); a null data is a malformed reply (_replies), asked again.
BATCH_LIST_FIELD: Final = "list"


class JobStatus(IntEnum):
    """A job's ``status`` in batch replies [assumed values]; any other value: keep polling.

    Shared by the client and the emulator, so the two never disagree on what a number means.
    A status the gateway sends that is not listed here is kept as a plain ``int``.
    """

    # [platform] ended without a result: a terminal failure (a public integration of the
    # platform's own-model API treats -1 as finished), not a status to keep polling.
    ENDED_WITHOUT_RESULT = -1
    QUEUED = 0  # waiting in the gateway's queue (``queue_before_num`` may say how many ahead)
    GENERATING = 1  # being made; images finished so far may already be listed
    FAILED = 3  # ended without (all) images; ``fail_message`` says why
    SUCCEEDED = 4  # ended with every image listed
    MODERATION_REJECTED = 5  # refused by moderation

    @property
    def label(self) -> str:
        """The status in words, as users read it (``job.status_name``)."""
        return _STATUS_LABELS[self]

    @property
    def terminal(self) -> bool:
        """True for the statuses that end a job."""
        return self in TERMINAL_STATUSES


_STATUS_LABELS: Final = {
    JobStatus.ENDED_WITHOUT_RESULT: "ended without a result",
    JobStatus.QUEUED: "queued",
    JobStatus.GENERATING: "generating",
    JobStatus.FAILED: "failed",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.MODERATION_REJECTED: "rejected",
}
_BY_VALUE: Final[dict[int, JobStatus]] = {status.value: status for status in JobStatus}


def job_status(value: int) -> JobStatus | int:
    """``value`` as a :class:`JobStatus` when the contract names it, else the plain number."""
    return _BY_VALUE.get(value, value)


RUNNING_STATUSES: Final = frozenset({JobStatus.QUEUED, JobStatus.GENERATING})
TERMINAL_STATUSES: Final = frozenset(set(JobStatus) - RUNNING_STATUSES)
# Statuses that end a job without images, each failing it with JobFailedError (or a subclass).
FAILED_STATUSES: Final = TERMINAL_STATUSES - {JobStatus.SUCCEEDED}


# --- Gateway-level HTTP statuses [assumed] ----------------------------------------------
HTTP_RATE_LIMITED: Final = 429  # may carry Retry-After (seconds)
