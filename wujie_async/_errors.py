"""The one error tree of wujie_async.

::

    WujieError                      every error this package raises
    ├── InvalidRequestError         bad input, caught before any network call (field, rule)
    ├── ClientStateError            client used before open, after close, or from another loop
    ├── APIError                    the gateway answered, and the answer is an error
    │   ├── AuthenticationError     HTTP 401: bad credentials, clock skew, unknown app
    │   ├── RateLimitedError        HTTP 429 (retry_after in seconds, when the server said)
    │   ├── ServerError             HTTP 5xx: transient on the gateway's side
    │   ├── ProtocolError           the reply is not what the contract promises (what came back)
    │   │   └── ResponseTooLargeError   the reply is over Limits.max_response_bytes
    │   └── BusinessError           HTTP 200 with code != "200" (code, message)
    │       ├── ParameterError          20010001 / 20010015: the gateway rejected a field
    │       ├── LockRaceError           20010018: safe to resubmit
    │       ├── SensitivePromptError    20110001: the prompt contains sensitive words
    │       └── InsufficientBalanceError 20110010: out of points; never retried
    ├── TransportError              no usable reply (connection refused, reset, timed out)
    │   └── SubmitUncertainError    a submit whose reply was lost: it may have been charged
    └── JobError                    a job (job_key) ended without images
        ├── JobFailedError          status 3 (fail_code, fail_message)
        ├── ModerationRejectedError status 5
        ├── JobTimeoutError         the job's deadline passed while it was still running
        ├── UnknownJobError         the gateway kept not listing the key past the grace period
        ├── JobProtocolError        the gateway's entry for the job is unreadable (also a
        │                           ProtocolError)
        └── JobCancelledError       job.cancel() or client shutdown stopped tracking it

Every error carries what it knows (``job_key``, ``code``, ``http_status``, what came back) and
its message says what to do. No message ever contains a private key or an Authorization header.
"""

from __future__ import annotations

from typing import Any

from . import _contract

_SNIPPET_CHARS = 300


def snippet(body: bytes | str) -> str:
    """A short, printable excerpt of a reply body for error messages."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."


class WujieError(Exception):
    """Base class of every error raised by wujie_async."""


class InvalidRequestError(WujieError, ValueError):
    """A request field breaks a rule of the contract; raised before anything is sent.

    Attributes:
        field: the offending field (``"size"``, ``"image[0]"``, ...).
        rule: the rule it breaks, in words.
        violations: every ``(field, rule)`` found, the first one being ``field``/``rule``.
    """

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        self.field, self.rule = violations[0]
        text = "; ".join(f"{field}: {rule}" for field, rule in violations)
        super().__init__(f"invalid request: {text}")


class ClientStateError(WujieError, RuntimeError):
    """The client is used when it cannot work: not opened, closed, or from another event loop."""


class APIError(WujieError):
    """The gateway answered with an error.

    Attributes:
        http_status: the HTTP status of the reply.
        code: the envelope code, when there was an envelope.
        message: the envelope message or a description of the reply.
        body: an excerpt of what came back.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        body: str = "",
    ) -> None:
        self.http_status = http_status
        self.code = code
        self.message = message
        self.body = body
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [self.message]
        if self.http_status is not None:
            parts.append(f"HTTP {self.http_status}")
        if self.code is not None:
            parts.append(f"code {self.code}")
        return " | ".join(parts)


class AuthenticationError(APIError):
    """HTTP 401: the signature, app id or timestamp was refused. Check credentials and clock."""


class RateLimitedError(APIError):
    """HTTP 429: slow down. ``retry_after`` is the server's hint in seconds, if it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class ServerError(APIError):
    """HTTP 5xx: a transient failure on the gateway's side."""


class ProtocolError(APIError):
    """The reply breaks the contract (not JSON, wrong shape, too large); ``body`` shows it."""


class ResponseTooLargeError(ProtocolError):
    """The reply is larger than ``Limits.max_response_bytes``; it was not read whole."""


class BusinessError(APIError):
    """HTTP 200 with an envelope code other than ``"200"``."""


class ParameterError(BusinessError):
    """The gateway rejected a parameter (20010001 / 20010015)."""


class LockRaceError(BusinessError):
    """20010018: the gateway lost a lock race; the platform says resubmitting is safe."""


class SensitivePromptError(BusinessError):
    """20110001: the prompt contains words the platform refuses."""


class InsufficientBalanceError(BusinessError):
    """20110010: the account is out of points. Top up; retrying will not help."""


_BUSINESS_ERRORS: dict[str, type[BusinessError]] = {
    _contract.CODE_INVALID_PARAMETER: ParameterError,
    _contract.CODE_UNSUPPORTED_SIZE: ParameterError,
    _contract.CODE_LOCK_RACE: LockRaceError,
    _contract.CODE_SENSITIVE_PROMPT: SensitivePromptError,
    _contract.CODE_INSUFFICIENT_BALANCE: InsufficientBalanceError,
}


def business_error(code: str, message: str, *, http_status: int = 200) -> BusinessError:
    """The most specific BusinessError class for an envelope code."""
    cls = _BUSINESS_ERRORS.get(code, BusinessError)
    return cls(message or "business error", code=code, http_status=http_status)


class TransportError(WujieError):
    """No usable reply: the connection failed, was reset, or timed out.

    Attributes:
        reached_server: False when the request provably never reached the gateway
            (connection refused, DNS failure, connect timeout), so resending is safe.
    """

    def __init__(self, message: str, *, reached_server: bool) -> None:
        self.reached_server = reached_server
        super().__init__(message)


class SubmitUncertainError(TransportError):
    """A submit was sent but its reply was lost: the gateway may have accepted (and charged) it.

    It is never resubmitted silently. ``request`` is the body that was sent; with a journal, the
    intent is recorded as uncertain and listed by ``WujieClient.uncertain_submits()``.
    """

    def __init__(self, message: str, *, request: dict[str, Any]) -> None:
        self.request = request
        super().__init__(message, reached_server=True)


class JobError(WujieError):
    """A job ended without images. ``job_key`` names it."""

    def __init__(self, message: str, *, job_key: str) -> None:
        self.job_key = job_key
        super().__init__(f"job {job_key}: {message}")


class JobFailedError(JobError):
    """The gateway reported status 3 (failed) with ``fail_code`` and ``fail_message``."""

    def __init__(self, *, job_key: str, fail_code: int | None, fail_message: str | None) -> None:
        self.fail_code = fail_code
        self.fail_message = fail_message
        super().__init__(f"failed (fail_code={fail_code}): {fail_message}", job_key=job_key)


class ModerationRejectedError(JobFailedError):
    """The gateway reported status 5: the job was rejected by moderation."""


class JobTimeoutError(JobError, TimeoutError):
    """The job's deadline passed while the gateway still reported it as running."""


class UnknownJobError(JobError):
    """The gateway did not list the key for longer than the grace period."""


class JobCancelledError(JobError):
    """The client stopped tracking the job (``job.cancel()`` or shutdown); it may still run."""


class JobProtocolError(JobError, ProtocolError):
    """The gateway's report on this one job breaks the contract (malformed, or too large).

    The job ends; every other job carries on. It is both a ``JobError`` (the job ended without
    images) and a ``ProtocolError`` (the gateway's reply is at fault).
    """
