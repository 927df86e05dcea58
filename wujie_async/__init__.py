"""wujie_async: an asyncio client of the Wujie "OpenAI Image" gateway.

Submit many image jobs at once; one background poller per client asks about all of them in
shared batch calls; each job (and each image) is an awaitable that resolves as results land.
"""

from ._auth import Credentials
from ._client import ClientStats, Images, WujieClient
from ._config import DownloadPolicy, Limits, PollPolicy, RetryPolicy, Timeouts
from ._contract import JobStatus
from ._errors import (
    APIError,
    AuthenticationError,
    BudgetExceededError,
    BusinessError,
    ClientStateError,
    EndpointNotFoundError,
    IncompleteJobError,
    InsufficientBalanceError,
    InvalidRequestError,
    JobCancelledError,
    JobError,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    LockRaceError,
    ModerationRejectedError,
    ParameterError,
    ProtocolError,
    RateLimitedError,
    RequestRefusedError,
    ResponseTooLargeError,
    SensitivePromptError,
    ServerError,
    SubmitUncertainError,
    TransportError,
    UnexpectedRedirectError,
    UnknownJobError,
    WujieError,
    snippet,
)
from ._jobs import ImageJob, JobUpdate
from ._journal import JournalEntry
from ._journal_file import JournalFile
from ._journal_worker import JournalLockedError
from ._request_fields import EditFields, GenerationFields
from ._results import GeneratedImage, ImageResult, SavedImage
from ._stats import FleetStats

__version__ = "0.2.0"

__all__ = [
    "APIError",
    "AuthenticationError",
    "BudgetExceededError",
    "BusinessError",
    "ClientStateError",
    "ClientStats",
    "Credentials",
    "DownloadPolicy",
    "EditFields",
    "EndpointNotFoundError",
    "FleetStats",
    "GeneratedImage",
    "GenerationFields",
    "ImageJob",
    "ImageResult",
    "Images",
    "IncompleteJobError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobProtocolError",
    "JobStatus",
    "JobTimeoutError",
    "JobUpdate",
    "JournalEntry",
    "JournalFile",
    "JournalLockedError",
    "Limits",
    "LockRaceError",
    "ModerationRejectedError",
    "ParameterError",
    "PollPolicy",
    "ProtocolError",
    "RateLimitedError",
    "RequestRefusedError",
    "ResponseTooLargeError",
    "RetryPolicy",
    "SavedImage",
    "SensitivePromptError",
    "ServerError",
    "SubmitUncertainError",
    "Timeouts",
    "TransportError",
    "UnexpectedRedirectError",
    "UnknownJobError",
    "WujieClient",
    "WujieError",
    "__version__",
    "snippet",
]
