"""What a job gives back: its images, its result, and the images saved from it.

Plain values whose only dependency inside the package is ``_redaction`` (itself dependent on
nothing), so that the error tree (an incomplete job's error carries its result) and the models
can both use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._redaction import quotes_a_signature


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One finished image.

    Attributes:
        index: its position in the job (0 to n-1).
        url: where to download it (URLs expire: download promptly).
        b64_json: the image inline, when the gateway sent it that way.
        revised_prompt: the prompt the model actually used, when reported.

    Its repr shows the URL without its query (a CDN's signed token) and cuts long texts
    short, and hides a URL or text that quotes a request signature of this process (a proxy
    that echoed the request's headers into the reply); the fields hold what the gateway sent.
    """

    index: int
    url: str | None
    b64_json: str | None = None
    revised_prompt: str | None = None

    def __repr__(self) -> str:
        # An inline image is megabytes of base64: a result, a job update or an error logged
        # with its images would put them all in one log line. Its size stands in for it.
        inline = None if self.b64_json is None else f"<{len(self.b64_json):,} characters>"
        # A CDN's URL carries its signed token in the query (anyone holding it can fetch the
        # image until it expires): the repr shows where the image is, never the token. The
        # revised prompt is the gateway's text, of any length: the repr shows its start.
        return (
            f"GeneratedImage(index={self.index!r}, url={_url_shown(self.url)!r}, "
            f"b64_json={inline}, revised_prompt={_text_shown(self.revised_prompt)!r})"
        )


_REPR_TEXT_CHARS = 200  # of a URL or revised prompt in a repr
_HIDDEN = "<hidden>"
_QUOTES_A_SIGNATURE = "<hidden: it quotes a request signature>"


def _url_shown(url: str | None) -> str | None:
    """``url`` without its query, fragment and ``user:password@`` (each replaced by a
    marker), cut short; only its scheme when it quotes a request signature."""
    if url is None:
        return None
    where, query, _ = url.partition("?")
    where, fragment, _ = where.partition("#")
    scheme, slashes, rest = where.rpartition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = _HIDDEN + "@" + authority.rpartition("@")[2]
    shown = scheme + slashes + authority + slash + path
    if quotes_a_signature(shown):
        # A header that can be replayed for minutes, echoed into the reply: never into a log.
        return scheme + slashes + _QUOTES_A_SIGNATURE
    if query:
        shown += "?" + _HIDDEN
    elif fragment:
        shown += "#" + _HIDDEN
    return _cut(shown)


def _text_shown(text: str | None) -> str | None:
    """The gateway's text, cut short; hidden whole when it quotes a request signature."""
    if text is not None and quotes_a_signature(text):
        return _QUOTES_A_SIGNATURE
    return _cut(text)


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= _REPR_TEXT_CHARS:
        return text
    return f"{text[:_REPR_TEXT_CHARS]}...<{len(text):,} characters>"


@dataclass(frozen=True, slots=True)
class ImageResult:
    """A job that succeeded: its key, final status and images."""

    key: str
    status: int
    images: tuple[GeneratedImage, ...]


@dataclass(frozen=True, slots=True)
class SavedImage:
    """One image saved to disk: complete, synced, under its final name.

    Attributes:
        index: the image's position in its job.
        path: the file.
        bytes: the file's size.
        sha256: the SHA-256 of the file's bytes, in hex.
    """

    index: int
    path: Path
    bytes: int
    sha256: str
