"""What server text must not carry into a message or a log: the request signatures this
process made, and the secrets of URLs it quotes (:func:`without_url_secrets`).

A gateway or proxy that echoes the request's ``Authorization`` header in its error text hands
a replayable signature back to the client, which would put it into an error message and a log.
A general rule (long base64 runs, in ``snippet``) catches a verbatim echo; an echo that was
re-encoded on the way (HTML entities, percent-encoding, wrapped lines, split by markup) gets
past it. This module matches what the client itself signed, whatever came between its
letters: the recent signatures' letters and digits, in pieces of ``_PIECE``, against the
server text's letters and digits (as sent, HTML-unescaped and URL-unquoted).

Process-wide on purpose: every client of the process signs through ``authorization_header``,
and every server text reaches a message through ``snippet``.
"""

from __future__ import annotations

import base64
import html
import re
from collections import deque
from collections.abc import Iterator
from urllib.parse import unquote

# Sixteen letters and digits in a row from a signature do not come by chance (62**16), and a
# 2048-bit signature (344 characters) has runs of that length between its "+" and "/".
_PIECE = 16
_KEPT = 8  # signatures remembered (one per few minutes per client: re-signed when stale)
_NOT_LETTERS = re.compile(r"[^A-Za-z0-9]+")

_recent: deque[frozenset[str]] = deque(maxlen=_KEPT)
_pieces: frozenset[str] = frozenset()  # every piece of the recent signatures


# A URL in free text: its scheme, ``user:password@`` if any (up to the last ``@`` before the
# path, as urllib and yarl split it: a password may hold an unescaped ``@``), where it points,
# its query, its fragment. JSON's escaped slashes (``https:\/\/``) count: a reply's body is
# quoted as sent.
# A query or fragment ends at whitespace, a quote or an angle bracket (the text around it).
_URL_IN_TEXT = re.compile(
    r"""
    (?P<scheme> \b[A-Za-z][A-Za-z0-9+.-]{0,31}:\\?/\\?/ )
    (?P<userinfo> [^\s/\\?#"'<>`]*@ )?
    (?P<where> [^\s?#"'<>`]* )
    (?P<query> \?[^\s#"'<>`]+ )?
    (?P<fragment> \#[^\s"'<>`]+ )?
    """,
    re.VERBOSE,
)
HIDDEN = "<hidden>"


def without_url_secrets(text: str) -> str:
    """``text`` with every URL in it shown as a repr of an image shows its URL: the query
    (a CDN's signed token: ``?X-Amz-Signature=...`` fetches the image for anyone holding it)
    and fragment replaced by ``<hidden>``, and so is a ``user:password@``.

    For server text quoting a URL (a job's ``fail_message`` naming its signed image URL, an
    error page quoting the request): the rest of the text is kept as it is.
    """
    if "/" not in text:  # no URL: the common text costs one search
        return text
    return _URL_IN_TEXT.sub(_url_shown, text)


def _url_shown(match: re.Match[str]) -> str:
    userinfo = HIDDEN + "@" if match["userinfo"] else ""
    shown = match["scheme"] + userinfo + match["where"]
    if match["query"]:
        return shown + "?" + HIDDEN
    if match["fragment"]:
        return shown + "#" + HIDDEN
    return shown


def remember_signature(sign: str) -> None:
    """Keep ``sign`` (a base64 signature this process made) out of server text from now on,
    as sent and in hex (a gateway that quotes the signature it checked as hex digits)."""
    global _pieces
    forms = [_NOT_LETTERS.sub("", sign)]
    try:
        forms.append(base64.b64decode(sign, validate=True).hex())
    except ValueError:
        pass
    _recent.append(frozenset(piece for letters in forms for piece in _pieces_of(letters)))
    _pieces = frozenset().union(*_recent)  # one assignment: a reader sees old or new, whole


def quotes_a_signature(text: str) -> bool:
    """True when ``text`` quotes a piece of a signature this process made, in any encoding
    that keeps its letters and digits in order (after HTML-unescaping or URL-unquoting)."""
    pieces = _pieces
    if not pieces or len(text) < _PIECE:
        return False
    forms = [text]
    if "&" in text:
        forms.append(html.unescape(text))
    if "%" in text:
        forms.append(unquote(text))
    for form in forms:
        letters = _NOT_LETTERS.sub("", form)
        # (Hex pieces are kept in lower case: an upper-case echo is lowered to match them.)
        for found in {letters, letters.lower()}:
            if not pieces.isdisjoint(_pieces_of(found)):
                return True
    return False


def _pieces_of(letters: str) -> Iterator[str]:
    """Every run of ``_PIECE`` characters of ``letters``."""
    return (letters[start : start + _PIECE] for start in range(len(letters) - _PIECE + 1))
