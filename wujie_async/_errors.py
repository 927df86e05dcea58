"""The one error tree of wujie_async.

::

    WujieError                      every error this package raises
    ├── InvalidRequestError         bad input, caught before any network call (field, rule)
    ├── BudgetExceededError         a submit could take the points spent past Limits.max_points
    ├── ClientStateError            client used before open, after close, or from another loop
    │   ├── JournalLockedError      another live process has the journal open (pid, host)
    │   ├── fleet.FleetUnavailableError  Redis away or refusing writes (url)  [fleet mode]
    │   └── fleet.FleetMismatchError  the fleet's members use another gateway  [fleet mode]
    ├── APIError                    the gateway answered, and the answer is an error
    │   ├── AuthenticationError     HTTP 401/403: bad credentials, clock skew, unknown app  [S]
    │   ├── EndpointNotFoundError   HTTP 404/405 without an envelope: wrong base URL (url)  [S]
    │   ├── RequestRefusedError     another HTTP 4xx without an envelope: a proxy refused it
    │   │                           (or a 4xx whose body could not be read: refused)
    │   │                           [S] for 407 (the proxy wants credentials of its own)
    │   ├── RateLimitedError        HTTP 429 (retry_after in seconds, when the server said)
    │   ├── ServerError             HTTP 5xx: transient on the gateway's side
    │   ├── ProtocolError           the reply is not what the contract promises (what came back)
    │   │   ├── ResponseTooLargeError   the reply, decoded, is over Limits.max_response_bytes
    │   │   └── UnexpectedRedirectError a 3xx reply (location); never followed            [S]
    │   └── BusinessError           HTTP 2xx with code != "200" (code, message)
    │       ├── ParameterError          20010001 / 20010015: the gateway rejected a field
    │       ├── LockRaceError           20010018: safe to resubmit
    │       ├── SensitivePromptError    20110001: the prompt contains sensitive words
    │       └── InsufficientBalanceError 20110010: out of points; never retried         [S]
    ├── TransportError              no usable reply (connection refused, reset, timed out)
    │   │                           [S] when it never reached the server (reached_server=False);
    │   │                           lasting=True: not retried (a TLS certificate not verified)
    │   └── SubmitUncertainError    a submit whose reply was lost: it may have been charged
    └── JobError                    a job (job_key) ended without images
        ├── JobFailedError          status 3 (fail_code, fail_message)
        ├── ModerationRejectedError status 5
        ├── JobTimeoutError         the job's deadline passed while it was still running
        ├── UnknownJobError         the gateway kept not listing the key past the grace period
        ├── JobProtocolError        the gateway's entry for the job is unreadable (also a
        │                           ProtocolError)
        ├── JobCancelledError       job.cancel() or client shutdown stopped tracking it
        └── IncompleteJobError      status 4 with fewer images than the job makes (result:
                                    the images that came, paid for; expected)

Every error carries what it knows (``job_key``, ``code``, ``http_status``, what came back) and
its message says what to do. No message ever contains a private key or an Authorization header,
and no error reaches one through ``__cause__``/``__context__`` (see ``_transport.py``).

``[S]`` marks the *systemic* errors (``error.systemic`` is True): not a problem of one request
but of the setup (credentials, base URL, balance, network), so a program sending many requests
should stop sending instead of failing each one the same way. Every server-provided text put in
a message goes through :func:`snippet` first, so a hostile reply cannot drive the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _contract
from ._redaction import quotes_a_signature, without_url_secrets

if TYPE_CHECKING:
    from ._results import ImageResult

_SNIPPET_CHARS = 300
# Only this much of a text is looked at: an 8 MiB reply costs no more than a short one.
_SNIPPET_SCAN_CHARS = 4 * 1024

# Terminal escape sequences, removed whole so that their parameters do not leak through as
# text: OSC/DCS/SOS/PM/APC strings up to BEL or ST (``ESC ]0;title BEL``), CSI sequences
# (``ESC [2J``, colours), their 8-bit C1 forms, and any other two-byte ``ESC x`` sequence.
_ESCAPE_SEQUENCE = re.compile(
    r"""
      (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]) [^\x07\x1b\x9c]* (?:\x07|\x1b\\|\x9c)?
    | (?:\x1b\[|\x9b) [0-?]* [ -/]* [@-~]?
    | \x1b [ -/]* [0-~]?
    """,
    re.VERBOSE,
)
# Every other control character: C0 (but whitespace, folded below), DEL, C1, and every Unicode
# format character (category Cf), which can make a terminal show text in another order or hide
# some of it: bidi overrides, isolates and marks, zero-width ones, the BOM, the soft hyphen, and
# the tag characters (U+E0000 block) that can carry a whole hidden sentence. Variation selectors
# and the blank Hangul fillers hide text as well.
_CONTROL = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    "\u115f\u1160\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f"
    "\ufeff\uffa0\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
# HTML a proxy or an error page puts around its words (a 502 page, a WAF's block page): a web app
# that shows an error's text must not be handed markup. Removed: comments, declarations, script
# and style elements with their content, tags of HTML's elements, and any tag with an attribute
# (an unknown element still runs its ``onclick``), attributes after a "/" too, as browsers read
# them (``<svg/onload=...>``), and a "<" inside a tag is part of it, as browsers read it.
# Removed again until nothing is (markup inside a tag rejoined it: ``<img src=x
# onerror=alert(1)//<b>>``), and a tag left open at the end. ``<prompt>`` or ``n <= 10`` stay.
_HTML_ELEMENTS = (
    "a|abbr|address|article|aside|audio|b|base|bdi|bdo|big|blink|blockquote|body|br|button|canvas"
    "|caption|center|cite|code|col|colgroup|dd|del|details|dfn|dialog|div|dl|dt|em|embed|fieldset"
    "|figcaption|figure|font|footer|form|frame|frameset|h[1-6]|head|header|hr|html|i|iframe|img"
    "|input|ins|kbd|label|legend|li|link|main|mark|marquee|math|menu|meta|meter|nav|noscript"
    "|object|ol|optgroup|option|output|p|param|picture|pre|progress|q|s|samp|section|select"
    "|small|source|span|strike|strong|sub|summary|sup|svg|table|tbody|td|template|textarea"
    "|tfoot|th|thead|time|title|tr|track|tt|u|ul|var|video|wbr"
)
_MARKUP = re.compile(
    rf"""
      <(script|style)\b[^>]*> .*? (?:</\1\s*>|$)
    | <!--.*?(?:-->|$)
    | <[!?][^<>]*>
    | </?(?:{_HTML_ELEMENTS})(?:[\s/][^>]*)?>
    | <[A-Za-z][\w:-]*[\s/][^>=]*=[^>]*>
    """,
    re.VERBOSE | re.IGNORECASE | re.DOTALL,
)
# The start of a tag with an attribute: one the text leaves open (no ">" after it) would be
# closed by the page's own next ">".
_TAG_START = re.compile(r"<[A-Za-z][\w:-]*[\s/]")
_MARKUP_PASSES = 8
# A run of base64 this long is a signature (RSA-1024 gives 172 characters), not words: a gateway
# or proxy that echoes the request's Authorization header in its error text must not put a
# replayable header into a message or a log. Escaped (``\/``) and URL-encoded forms count too.
_SIGNATURE_LIKE = re.compile(r"[A-Za-z0-9+/\\%_=-]{128,}")
_QUOTES_A_SIGNATURE = "[server text left out: it quotes this client's request signature]"


def snippet(text: bytes | str, *, limit: int = _SNIPPET_CHARS) -> str:
    """A short one-line excerpt of server text, safe to print to a terminal or a log.

    Every control character is removed: C0 (escape included), DEL, C1, every Unicode format
    character (bidi overrides, marks and isolates, zero-width characters, the BOM, the soft
    hyphen, tag characters), variation selectors, and whole ANSI/OSC escape sequences (titles,
    screen clears, colours); so is HTML markup (tags of HTML's elements, any tag with an
    attribute, comments, script and style elements whole); runs of whitespace, newlines
    included, become one space. A run of
    128 or more base64 characters (a signature, as in an echoed Authorization header) is left
    out; a text that still quotes a signature this process made, in another encoding (HTML
    entities, percent-encoding, wrapped lines), is left out whole. Use it for any
    server-provided text that is printed or logged.

    Args:
        text: the text, or raw bytes (decoded as UTF-8, bad bytes replaced).
        limit: the most characters kept; longer texts end in ``...``.
    """
    if (
        type(text) is str
        and len(text) <= limit
        and text.isascii()
        and text.isprintable()
        and "<" not in text
        and "  " not in text
        and text[:1] != " "
        and text[-1:] != " "
    ):
        # The common text (a job's own message, a key of hex digits): printable ASCII with no
        # markup and nothing to fold has nothing the cleaning below removes; only the signature
        # rules apply. (Each message of an error made this way: a cancel of 10,000 jobs made
        # 10,000 of them, and the regular expressions below cost more than the rest of it.)
        text = without_url_secrets(text)
        if len(text) >= 128:
            text = _SIGNATURE_LIKE.sub(_redacted, text)
        return _QUOTES_A_SIGNATURE if quotes_a_signature(text) else text
    if isinstance(text, bytes | bytearray):
        text = bytes(text[: _SNIPPET_SCAN_CHARS * 4]).decode("utf-8", "replace")
    elif not isinstance(text, str):
        text = str(text)
    # Control characters go before markup: removed after it, they rejoined a tag they had
    # split (``<\x00script>`` and ``<scr\u200bipt>`` came out as ``<script>``).
    text = _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", text[:_SNIPPET_SCAN_CHARS]))
    if "<" in text:
        text = _without_markup(text)
    text = without_url_secrets(" ".join(text.split()))
    text = _SIGNATURE_LIKE.sub(_redacted, text)
    if quotes_a_signature(text):  # still, in another encoding: left out whole
        text = _QUOTES_A_SIGNATURE
    return text if len(text) <= limit else text[:limit] + "..."


def _without_markup(text: str) -> str:
    """``text`` with every tag ``_MARKUP`` finds removed, over and over until none is left (or
    with no "<" at all, if tags still nest deeper), and a tag left open at its end cut."""
    # No tag closes after the last ">": when many a "<" follows it, only the text before it is
    # searched for tags (hostile text costs one pass, not one per "<"; a script or style
    # element left open there then keeps its text, which no tag is left to run).
    closed = text.rfind(">") + 1
    tail = ""
    if text.count("<", closed) > _MARKUP_PASSES:
        text, tail = text[:closed], text[closed:]
    for _ in range(_MARKUP_PASSES):
        cleaned = _MARKUP.sub(" ", text)
        if cleaned == text:
            break
        text = cleaned
    else:
        text = text.replace("<", " ")
    text += tail
    # After the last ">", a tag start with an "=" after it is a tag the page's own next ">"
    # would close, and a comment's start hides what follows: cut from there.
    closed = text.rfind(">") + 1
    equals = text.rfind("=")
    if equals > closed and (start := _TAG_START.search(text, closed, equals)) is not None:
        text = text[: start.start()]
    comment = text.find("<!--", closed)
    return text if comment < 0 else text[:comment]


def _redacted(match: re.Match[str]) -> str:
    run = match.group()
    # A signature mixes cases and digits; a run of one letter or of hex digits is kept.
    if run.lower() == run or run.upper() == run or not any(ch.isdigit() for ch in run):
        return run
    return f"[{len(run)} characters like a signature, left out]"


def shown_key(key: str) -> str:
    """A job key as messages and logs show it. The gateway chose it, and a key may hold
    markup (``<img/src=x/onerror=...>`` has no whitespace or control character): it is server
    text like any other, cleaned by :func:`snippet`; a key of the gateway's form (hex digits)
    shows as it is."""
    return snippet(key, limit=140)


def some_and_more(items: Sequence[str], most: int) -> str:
    """The first ``most`` of ``items``, and how many more: ``"a, b, c and 7 more"`` (a line
    that names what was left, never thousands of names long)."""
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def add_note_once(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` unless it has that note already: an error shared by callers
    (saves of one image join one download) is told a caller's note once, not once a caller."""
    if note not in getattr(error, "__notes__", ()):
        error.add_note(note)


class WujieError(Exception):
    """Base class of every error raised by wujie_async.

    Attributes:
        systemic: True when the error is not about one request but about the setup
            (credentials, base URL, balance, network): further requests would fail the same
            way, so stop sending and fix what the message names.
    """

    systemic: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its message and attributes, rebuilt without calling __init__: the
        # default (``cls(*self.args)``) calls it with the message alone, and a class whose
        # __init__ takes keyword arguments (SubmitUncertainError's ``request``) could not be
        # unpickled, so it could not come back from a process pool. The chained errors and
        # the traceback are left out, as pickle always leaves them.
        return (_rebuilt, (type(self), self.args), dict(vars(self)))


def _rebuilt(cls: type[WujieError], args: tuple[Any, ...]) -> WujieError:
    """An error of ``cls`` with ``args``, its attributes to be set by unpickling."""
    error = cls.__new__(cls)
    error.args = args  # (OSError's __new__ leaves them to __init__: JobTimeoutError's)
    return error


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


class BudgetExceededError(WujieError):
    """A submit could take the points spent past ``Limits.max_points``; nothing was sent.

    Attributes:
        max_points: the budget.
        spent: points charged for jobs that ended.
        reserved: points held for jobs in flight.
        needed: what this submit is expected to cost (None: not known yet; no room was left).
        model: the request's model.
        unpriced: no job of this kind has reported what it cost (``integral_cost``: a
            finished one did not say, or the first one ended without saying: the wait for
            it timed out or was cancelled, its submit's reply was lost, or the gateway lost
            or garbled it) and no price was given: the budget cannot be held for it.
        reported_unreadably: with ``unpriced``: the gateway did report what a job of this kind
            cost, unreadably (``integral_cost`` was text, negative, or far too large; a
            WARNING says what it was), not a number of points.
    """

    def __init__(
        self,
        *,
        max_points: float,
        spent: float,
        reserved: float,
        needed: float | None,
        model: str,
        unpriced: bool = False,
        reported_unreadably: bool = False,
    ) -> None:
        self.max_points = max_points
        self.spent = spent
        self.reserved = reserved
        self.needed = needed
        self.model = model
        self.unpriced = unpriced
        self.reported_unreadably = unpriced and reported_unreadably
        if self.reported_unreadably:
            message = (
                f"over the points budget: the gateway reported what a {model} job costs "
                "unreadably (integral_cost was not a number of points: a WARNING said what "
                f"it was), so max_points={max_points:g} cannot be held for "
                "more of them; nothing was sent. Give its price in "
                f'Limits.point_prices (e.g. {{"{model}": 8}}, points per image)'
            )
        elif unpriced:
            message = (
                f"over the points budget: the gateway has not reported what a {model} job "
                "costs (integral_cost: a finished one did not say, or the first one ended "
                "without saying: timed out, cancelled, its reply lost, or lost by the gateway), "
                f"so max_points={max_points:g} cannot be held for "
                "more of them; nothing was sent. Give its price in "
                f'Limits.point_prices (e.g. {{"{model}": 8}}, points per image)'
            )
        else:
            cost = f"about {needed:g} points" if needed is not None else "an unknown cost"
            message = (
                f"over the points budget: this {model} job ({cost}) could take the points "
                f"spent past max_points={max_points:g} (spent {spent:g}, held for jobs in "
                f"flight {reserved:g}); nothing was sent. Raise Limits.max_points, or wait for "
                "jobs in flight to end"
            )
        super().__init__(message)


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
        self.code = None if code is None else snippet(code, limit=40)
        # Messages often quote the server's own text: never let it drive the terminal.
        self.message = snippet(message, limit=500)
        self.body = snippet(body)
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [self.message]
        if self.http_status is not None:
            parts.append(f"HTTP {self.http_status}")
        if self.code is not None:
            parts.append(f"code {self.code}")
        return " | ".join(parts)


class AuthenticationError(APIError):
    """HTTP 401 or 403: the app id, key or timestamp was refused. Check credentials and clock.

    Systemic: every request with these credentials fails the same way.
    """

    systemic = True


class EndpointNotFoundError(APIError):
    """HTTP 404/405 with a body that is not a JSON envelope: the route does not exist there.

    The base URL is wrong (a proxy or web server answered, not the gateway), so nothing was
    accepted: a submit that gets this is refused, never uncertain. Systemic.

    Attributes:
        url: the URL that does not exist.
    """

    systemic = True

    def __init__(self, message: str, *, url: str, **kwargs: Any) -> None:
        self.url = url
        super().__init__(message, **kwargs)


class RequestRefusedError(APIError):
    """HTTP 4xx (not 401, 403, 404, 405 or 429) with a body that is not a JSON envelope: a
    proxy or web server in front of the gateway refused the request (413: the body is too
    large for it; 400, 414, 431...), so it never reached the gateway and nothing was accepted.
    Also a 4xx whose body could not be read (cut short, over the size cap, too slow): its
    status says the request was refused, though not by whom (the message says so).
    A submit that gets this is refused, never uncertain, and not retried (the same request
    gets the same answer). Not systemic (another, smaller request may pass), but for 407: the
    proxy wants credentials of its own, and every request gets the same answer.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.systemic = self.http_status == 407


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
    """The reply, decoded, is larger than ``Limits.max_response_bytes``; reading stopped there.

    Compressed replies are measured after decompression, so a small gzip bomb cannot inflate
    past the cap. A batch query that gets this asked about too much at once: ask about fewer.

    Attributes:
        limit: the cap, in bytes.
    """

    def __init__(self, message: str, *, limit: int, **kwargs: Any) -> None:
        self.limit = limit
        super().__init__(message, **kwargs)


class ReplyTooComplexError(ProtocolError):
    """The reply nests deeper than the JSON reader follows, or holds more JSON objects and
    arrays than any reply of the contract does (not a contract's reply: a hostile entry).
    Not exported: a batch query that gets it asks about fewer keys, as for a reply too large,
    so that one entry costs its own job only.

    Attributes:
        why: what made it unreadable, in our words (it ends a job's error message).
    """

    def __init__(self, message: str, *, why: str, **kwargs: Any) -> None:
        self.why = why
        super().__init__(message, **kwargs)


class UnexpectedRedirectError(ProtocolError):
    """A 3xx reply to an API call. Redirects are never followed: a signed request that a
    redirect could send elsewhere (or loop on, paying each time) is not sent twice.

    The base URL is probably wrong (``http`` for ``https``, a missing path prefix). Nothing was
    accepted at the URL asked, so a submit that gets this is not uncertain. Systemic.

    Attributes:
        location: where the reply pointed (sanitized), or ``""`` when it did not say.
    """

    systemic = True

    def __init__(self, message: str, *, location: str, **kwargs: Any) -> None:
        self.location = location
        super().__init__(message, **kwargs)


class BusinessError(APIError):
    """HTTP 200 with an envelope code other than ``"200"``."""


class ParameterError(BusinessError):
    """The gateway rejected a parameter (20010001 / 20010015)."""


class LockRaceError(BusinessError):
    """20010018: the gateway lost a lock race; the platform says resubmitting is safe."""


class SensitivePromptError(BusinessError):
    """20110001: the prompt contains words the platform refuses."""


class InsufficientBalanceError(BusinessError):
    """20110010: the account is out of points. Top up; retrying will not help. Systemic."""

    systemic = True


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
    return cls(message or no_message(code), code=code, http_status=http_status)


def no_message(code: object, said: str = "the gateway gave no message") -> str:
    """The words for a refusal (or a failed job) the gateway gave no message for: what its
    code means where the contract says (the code alone told a user nothing), else ``said``."""
    meaning = _contract.CODE_MEANINGS.get(str(code))
    return f"{meaning} ({said})" if meaning else said


class TransportError(WujieError):
    """No usable reply: the connection failed, was reset, or timed out.

    Attributes:
        reached_server: False when the request provably never reached the gateway
            (connection refused, DNS failure, connect timeout), so resending is safe.
        systemic: True exactly when ``reached_server`` is False: the gateway cannot be reached
            at all, so every request would fail the same way.
        lasting: True when trying again soon cannot help, so the client made one try only:
            the gateway's TLS certificate could not be verified (fix the base URL's host or
            this machine's CA certificates). A refused or timed-out connection is not lasting
            (a gateway restarting refuses connections for a moment): it is retried.
    """

    def __init__(self, message: str, *, reached_server: bool, lasting: bool = False) -> None:
        self.reached_server = reached_server
        self.systemic = not reached_server
        self.lasting = lasting
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
    """A job ended without (all of) its images. ``job_key`` names it."""

    def __init__(self, message: str, *, job_key: str) -> None:
        self.job_key = job_key
        # The message quotes server text (fail_message): strip what could drive a terminal.
        super().__init__(f"job {shown_key(job_key)}: {snippet(message, limit=500)}")


class JobFailedError(JobError):
    """The job ended without images: status 3 (failed), 5 (moderation) or -1 (no result).

    ``fail_code`` is the gateway's code when it is a short number (else None).
    ``fail_message`` is the gateway's text made safe to print: control characters and escape
    sequences removed, whitespace folded, at most 300 characters (:func:`snippet`).
    """

    # How the message words the ending (a subclass says more).
    _ended = "failed"

    def __init__(self, *, job_key: str, fail_code: int | None, fail_message: str | None) -> None:
        self.fail_code = fail_code
        self.fail_message = fail_message
        # Only what the gateway said: no "fail_code=None", no "None" for a reason not given.
        code = "" if fail_code is None else f" (fail_code={fail_code})"
        reason = fail_message or no_message(fail_code, "the gateway gave no reason")
        super().__init__(f"{self._ended}{code}: {reason}", job_key=job_key)


class ModerationRejectedError(JobFailedError):
    """The gateway reported status 5: the job was rejected by moderation."""

    _ended = "rejected by moderation"


class JobTimeoutError(JobError, TimeoutError):
    """The job's deadline passed while the gateway still reported it as running.

    Only the client's wait ended: the job is paid and may still end. Its journal row stays
    ``accepted`` (``resume()`` collects it) and ``attach(job_key)`` waits on it afresh.
    """


class UnknownJobError(JobError):
    """The gateway did not list the key for longer than the grace period.

    Attributes:
        was_listed: the gateway had listed the job before (it was accepted, and may have run
            and been charged): it may have ended and had its result cleaned up before it was
            seen done. Sending the request again may pay twice.
    """

    def __init__(self, message: str, *, job_key: str, was_listed: bool = False) -> None:
        super().__init__(message, job_key=job_key)
        self.was_listed = was_listed


class JobCancelledError(JobError):
    """The client stopped tracking the job (``job.cancel()`` or shutdown); it may still run."""


class JobProtocolError(JobError, ProtocolError):
    """The gateway's report on this one job breaks the contract (malformed, or too large).

    The job ends; every other job carries on. It is both a ``JobError`` (the job ended without
    images) and a ``ProtocolError`` (the gateway's reply is at fault).
    """


class IncompleteJobError(JobError):
    """The gateway reported the job done (status 4) with fewer images than it makes.

    The job is paid: nothing that came is hidden. ``await job`` raises this; ``job.image(i)``
    still gives each image that came and raises this for the others; ``job.save()`` saves
    the images that came, then raises this (its note names their files).

    When the job's ``n`` is not known (a key attached without it), only a job done with no
    image at all is incomplete (``expected`` is 1 then).

    Attributes:
        result: an :class:`ImageResult` of the images that did come (status 4).
        expected: how many images the job makes (its ``n``; 1 when not known).
        landed: how many of those came (the other images of ``result``, if any, have an
            index past ``expected``).
    """

    def __init__(self, *, job_key: str, result: ImageResult, expected: int) -> None:
        self.result = result
        self.expected = expected
        super().__init__(
            f"the gateway reported the job done with {self.landed} of {expected} image(s)",
            job_key=job_key,
        )

    @property
    def landed(self) -> int:
        """How many of the ``expected`` images came."""
        return sum(1 for image in self.result.images if image.index < self.expected)
