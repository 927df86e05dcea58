"""The fleet's errors, subclasses of the package's tree (see ``wujie_async._errors``)::

ClientStateError
└── FleetUnavailableError   Redis cannot be reached or stopped answering (names the URL)
WujieError
└── LeaseLostError          this member no longer holds a shard's lease: stop acting for it
"""

from __future__ import annotations

from .._errors import ClientStateError, WujieError


class FleetUnavailableError(ClientStateError):
    """The fleet's Redis cannot be reached, or a command missed its deadline.

    Attributes:
        url: the Redis URL, with any password replaced by ``***``.
    """

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)


class LeaseLostError(WujieError):
    """This member does not (or may no longer) hold the lease of ``shard``.

    Raised before acting when the lease's remaining validity is too short, and when a fenced
    Redis write finds another holder's token. The member must stop polling for that shard.

    Attributes:
        shard: the shard whose lease is gone.
    """

    def __init__(self, message: str, *, shard: int) -> None:
        self.shard = shard
        super().__init__(message)
