"""The environment variables wujie_async reads, all read here and nowhere else.

The client (``WujieClient()`` with no arguments), ``Credentials.from_env`` and the command line
take their defaults from one :class:`Environment`, so a variable means the same everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

APP_ID: Final = "WUJIE_APP_ID"
PRIVATE_KEY: Final = "WUJIE_PRIVATE_KEY"
PRIVATE_KEY_FILE: Final = "WUJIE_PRIVATE_KEY_FILE"
BASE_URL: Final = "WUJIE_BASE_URL"
LOG: Final = "WUJIE_LOG"


@dataclass(frozen=True, slots=True)
class Environment:
    """What the environment says; None for a variable that is unset or empty.

    Attributes:
        app_id: ``WUJIE_APP_ID``.
        private_key: ``WUJIE_PRIVATE_KEY`` (base64 DER or PEM); never shown in a repr.
        private_key_file: ``WUJIE_PRIVATE_KEY_FILE``, a file holding the key (read only when
            ``WUJIE_PRIVATE_KEY`` is unset).
        base_url: ``WUJIE_BASE_URL``.
        log: ``WUJIE_LOG``: ``debug``, ``info`` or ``warning`` shows the ``wujie_async`` log
            from that level up on stderr (see ``_telemetry.log_level``).
    """

    app_id: str | None
    private_key: str | None
    private_key_file: str | None
    base_url: str | None
    log: str | None = None

    def __repr__(self) -> str:
        key = None if self.private_key is None else "***"
        return (
            f"Environment(app_id={self.app_id!r}, private_key={key!r}, "
            f"private_key_file={self.private_key_file!r}, base_url={self.base_url!r}, "
            f"log={self.log!r})"
        )

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """Read the variables from ``environ`` (default: the process environment)."""
        source = os.environ if environ is None else environ
        return cls(
            app_id=source.get(APP_ID) or None,
            private_key=source.get(PRIVATE_KEY) or None,
            private_key_file=source.get(PRIVATE_KEY_FILE) or None,
            base_url=source.get(BASE_URL) or None,
            log=source.get(LOG) or None,
        )
