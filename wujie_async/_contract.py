"""Every detail of the wire contract that the platform has not published.

``../shared/API.md`` marks these lines **[assumed]**. They live here, and only here, so that when
a real gateway disagrees one edit corrects the client and the emulator together. Published
([doc]/[platform]) facts that several modules need are kept here too, labelled as such.
"""

from __future__ import annotations

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

# --- Batch detail query ---------------------------------------------------------------------------
MAX_KEYS_PER_BATCH: Final = 50  # [assumed] more gets CODE_INVALID_PARAMETER
# [assumed] the reply is {"data": {"list": [entry, ...]}}; the client also reads a bare array.
BATCH_LIST_FIELD: Final = "list"

# Job status values [assumed]. Anything else is "not terminal": keep polling.
STATUS_QUEUED: Final = 0
STATUS_GENERATING: Final = 1
STATUS_FAILED: Final = 3
STATUS_SUCCEEDED: Final = 4
STATUS_MODERATION_REJECTED: Final = 5
# [platform] a public integration of the platform's own-model API treats -1 as finished: the
# job ended without a result (a terminal failure, not a status to keep polling).
STATUS_ENDED_WITHOUT_RESULT: Final = -1
TERMINAL_STATUSES: Final = frozenset(
    {STATUS_FAILED, STATUS_SUCCEEDED, STATUS_MODERATION_REJECTED, STATUS_ENDED_WITHOUT_RESULT}
)
# Statuses that end a job without images, each failing it with JobFailedError (or a subclass).
FAILED_STATUSES: Final = frozenset(
    {STATUS_FAILED, STATUS_MODERATION_REJECTED, STATUS_ENDED_WITHOUT_RESULT}
)


# --- Gateway-level HTTP statuses [assumed] ----------------------------------------------
HTTP_RATE_LIMITED: Final = 429  # may carry Retry-After (seconds)
