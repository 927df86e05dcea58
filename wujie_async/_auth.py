"""The platform's RSA request signature, and a signer that caches the header it makes.

``original`` is the compact JSON ``{"appId":...,"timestamp":...}``; ``sign`` is base64 of an
RSA PKCS#1 v1.5 / SHA-256 signature over it; both travel in the ``Authorization`` header as a
JSON object. PKCS#1 v1.5 is deterministic, which is what lets a test vector pin it byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import _contract
from ._env import Environment
from ._errors import InvalidRequestError
from ._local_files import LocalFileError, read_regular_file
from ._redaction import remember_signature

REDACTED = "<redacted>"
# A private-key file holds at most this much: a 16384-bit RSA key is 13 KB as PEM. The read
# stops here, so a path naming /dev/zero or a huge file costs no memory.
MAX_KEY_FILE_BYTES = 64 * 1024


def load_private_key(private_key: str) -> rsa.RSAPrivateKey:
    """Parse a private key given as base64 of PKCS#8 DER (the console's form) or as PEM.

    Raises:
        InvalidRequestError: naming ``private_key`` (never echoing it) when it cannot be used.
            It has no ``__context__``, and this frame keeps no copy of the key as a local.
    """
    der = b""
    key: PrivateKeyTypes | None = None
    rule = "must be an RSA key"
    try:
        if "-----BEGIN" in private_key:
            key = serialization.load_pem_private_key(private_key.encode(), password=None)
        else:
            der = base64.b64decode("".join(private_key.split()), validate=True)
            key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        # cryptography's words for a key that needs a password (no key material in them).
        encrypted = isinstance(exc, TypeError) and "encrypted" in str(exc)
        rule = (
            "is encrypted (protected by a password): give it unencrypted, e.g. "
            "`openssl pkcs8 -topk8 -nocrypt -in KEY.pem`"
            if encrypted
            else "must be an RSA key: base64 of PKCS#8 DER, or PEM"
        )
    if not isinstance(key, rsa.RSAPrivateKey):
        # Raised outside the handler, so that cryptography's error (whose text may quote the
        # key) is not its __context__; and the key leaves this frame's locals first: the
        # error's traceback keeps them, and an error reporter that records locals (Sentry's
        # default) would store a damaged key, most of it still good.
        private_key = der = key = None  # type: ignore[assignment]
        raise InvalidRequestError([("private_key", rule)])
    return key


def read_key_file(location: str | Path, name: str) -> str:
    """The text of the private-key file at ``location``.

    Only a regular file of at most ``MAX_KEY_FILE_BYTES`` is read: a FIFO would block the
    open (for ever, with no writer) and ``/dev/zero`` would fill memory.

    Raises:
        InvalidRequestError: naming ``name``, when the file cannot be read. The location is
            shown only when it looks like a file name: a key pasted where its path belongs
            (``WUJIE_PRIVATE_KEY_FILE="$(cat key.pem)"``) is never echoed, and no exception
            holding it rides along as ``__context__``.
    """
    text = str(location)
    try:
        return read_regular_file(text, MAX_KEY_FILE_BYTES).decode("utf-8")
    except LocalFileError as exc:
        reason = exc.reason  # never the file name, nor a byte of the file
        if exc.too_large:
            reason = f"larger than {MAX_KEY_FILE_BYTES // 1024} KiB, more than a private key"
    except UnicodeDecodeError:
        reason = "not a text file"
    if "\n" in text or "-----" in text or len(text) > 255:
        shown = "its value, which is not a file name (a key itself goes in WUJIE_PRIVATE_KEY)"
    else:
        shown = text
    raise InvalidRequestError([(name, f"cannot read {shown}: {reason}")])


def original_text(app_id: str, timestamp: int) -> str:
    """The signed text: compact JSON, keys in alphabetical order."""
    return json.dumps({"appId": app_id, "timestamp": timestamp}, separators=(",", ":"))


def sign_original(key: rsa.RSAPrivateKey, original: str) -> str:
    """base64 of RSA PKCS#1 v1.5 over SHA-256 of ``original``'s UTF-8 bytes."""
    signature = key.sign(original.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def authorization_header(app_id: str, key: rsa.RSAPrivateKey, timestamp: int) -> str:
    """The ``Authorization`` header value for one timestamp, in the documented key order."""
    original = original_text(app_id, timestamp)
    sign = sign_original(key, original)
    remember_signature(sign)  # a server that quotes it back must not get it into a message
    header = {
        "secretKeyVersion": _contract.SECRET_KEY_VERSION,
        "appId": app_id,
        "sign": sign,
        "original": original,
    }
    return json.dumps(header, separators=(",", ":"))


def verify_signature(public_key: rsa.RSAPublicKey, original: str, sign: str) -> bool:
    """True when ``sign`` is a valid signature of ``original`` (used by the emulator)."""
    try:
        signature = base64.b64decode(sign, validate=True)
        public_key.verify(signature, original.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


@dataclass(frozen=True, slots=True, init=False)
class Credentials:
    """An app id and its RSA private key (base64 PKCS#8 DER, or PEM).

    The key is parsed once, at construction, so a bad key fails here and not mid-run; it never
    appears in ``repr`` or in any error message, nor as a local of any frame of the error's
    traceback (an error reporter that records locals would send it).
    """

    app_id: str
    private_key: str = field(repr=False)
    _key: rsa.RSAPrivateKey = field(init=False, repr=False, compare=False)

    def __init__(self, app_id: str, private_key: str) -> None:
        # Written out, not made by dataclass: the generated __init__ is a frame of its own
        # (file "<string>") whose local ``private_key`` a refused key's traceback kept.
        try:
            key = _usable_key(app_id, private_key)
        except InvalidRequestError as exc:
            violations = exc.violations
        else:
            object.__setattr__(self, "app_id", app_id)
            object.__setattr__(self, "private_key", private_key)
            object.__setattr__(self, "_key", key)
            return
        # A new error, raised after the key left this frame: the refused one's traceback
        # holds the frames that parsed the key, each with it as a local.
        private_key = None  # type: ignore[assignment]
        raise InvalidRequestError(violations)

    def __repr__(self) -> str:
        # getattr: a refused key's traceback holds ``self`` before anything was set, and an
        # error reporter that records locals calls this on it.
        app_id = getattr(self, "app_id", None)
        return f"Credentials(app_id={app_id!r}, private_key={REDACTED!r})"

    @classmethod
    def from_env(cls) -> Credentials:
        """Read ``WUJIE_APP_ID`` and ``WUJIE_PRIVATE_KEY`` (or ``WUJIE_PRIVATE_KEY_FILE``).

        ``WUJIE_PRIVATE_KEY_FILE`` names a file holding the key; it is read only when
        ``WUJIE_PRIVATE_KEY`` is not set.

        Raises:
            InvalidRequestError: naming the missing variable, or the key file that cannot be read.
        """
        try:
            return cls._from(Environment.read())
        except InvalidRequestError as exc:
            violations = exc.violations
        # A new error, with none of the frames that held the key read from the environment
        # (the caller passed no key to see): an error reporter that records locals would store
        # a damaged key, most of it still good. Raised outside the handler: no __context__.
        raise InvalidRequestError(violations)

    @classmethod
    def _from(cls, env: Environment) -> Credentials:
        app_id = env.app_id or ""
        private_key = env.private_key or ""
        key_file = env.private_key_file or ""
        if not private_key and key_file:
            private_key = read_key_file(key_file, "WUJIE_PRIVATE_KEY_FILE")
        missing = [
            (name, f"environment variable is not set{also}")
            for name, value, also in (
                ("WUJIE_APP_ID", app_id, ""),
                (
                    "WUJIE_PRIVATE_KEY",
                    private_key,
                    " (nor WUJIE_PRIVATE_KEY_FILE, a file of the key)",
                ),
            )
            if not value
        ]
        if missing:
            raise InvalidRequestError(missing)
        return cls(app_id=app_id, private_key=private_key)

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half of the key, for a server that verifies these credentials."""
        return self._key.public_key()

    def header_at(self, timestamp: int) -> str:
        """The Authorization header for ``timestamp`` (unix seconds)."""
        return authorization_header(self.app_id, self._key, timestamp)


def _usable_key(app_id: object, private_key: object) -> rsa.RSAPrivateKey:
    """The parsed key of credentials ``app_id`` and ``private_key``, both checked."""
    if not isinstance(app_id, str) or not app_id.strip():
        raise InvalidRequestError([("app_id", "required: a non-empty string")])
    if not isinstance(private_key, str) or not private_key.strip():
        raise InvalidRequestError([("private_key", "required: a non-empty string")])
    return load_private_key(private_key)


class HeaderSigner:
    """Hands out an Authorization header, re-signing only when the cached one gets old.

    Signing (about a millisecond of RSA) runs in a worker thread so the event loop never waits
    on it, and concurrent callers share one signing.
    """

    __slots__ = ("_clock", "_credentials", "_header", "_lock", "_max_age", "_signed_at")

    def __init__(
        self,
        credentials: Credentials,
        *,
        max_age: float = _contract.SIGNATURE_REUSE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credentials = credentials
        self._max_age = max_age
        self._clock = clock
        self._header: str | None = None
        self._signed_at = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"HeaderSigner(app_id={self._credentials.app_id!r})"

    def invalidate(self) -> None:
        """Forget the cached header (after a 401, say) so the next call signs anew."""
        self._header = None

    def cached(self) -> str | None:
        """The cached header while it is younger than ``max_age`` (else None: await
        :meth:`header`). The hot path: no coroutine while the cached header serves."""
        header = self._header
        if header is not None and self._clock() - self._signed_at < self._max_age:
            return header
        return None

    async def header(self) -> str:
        """A header whose timestamp is at most ``max_age`` seconds old."""
        header = self._header
        if header is not None and self._clock() - self._signed_at < self._max_age:
            return header
        async with self._lock:
            if self._header is not None and self._clock() - self._signed_at < self._max_age:
                return self._header
            now = self._clock()
            self._header = await asyncio.to_thread(self._credentials.header_at, int(now))
            self._signed_at = now
            return self._header
