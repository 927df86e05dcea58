"""``client.images``: the typed request surface (submit, submit_edit, generate, edit, attach).

It checks a request against its model and hands the body to the client (``submit``) or the key
to the client's job factory (``attach``); it holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Protocol, Unpack, cast

import anyio

from . import _contract, _rules
from ._errors import InvalidRequestError
from ._jobs import ImageJob
from ._models import EditRequest, GenerationRequest, unencodable
from ._request_fields import CLIENT_ONLY_FIELDS, EditFields, GenerationFields
from ._results import ImageResult
from ._slices import OFF_LOOP_CHARS, text_chars

# _send takes these out of a submit's fields by name.
assert CLIENT_ONLY_FIELDS == {"job_timeout", "extra_body", "tag"}


class SubmitJob(Protocol):
    """The client's submit of a checked body (see ``WujieClient``)."""

    def __call__(
        self,
        path: str,
        body: dict[str, Any],
        n: int | None,
        job_timeout: float | None,
        extra_body: Mapping[str, Any] | None,
        tag: str | None,
    ) -> Awaitable[ImageJob]: ...


class AttachJob(Protocol):
    """The client's attach of a key submitted earlier or elsewhere."""

    def __call__(
        self,
        key: str,
        *,
        job_timeout: float | None,
        n: int | None,
        request: Mapping[str, Any] | None = None,
        charge_budget: bool = False,
        submitted_at: float | None = None,
    ) -> ImageJob: ...


class Images:
    """``client.images``: submit, generate, edit and attach image jobs."""

    def __init__(self, *, submit: SubmitJob, attach: AttachJob) -> None:
        # The client hands over the two things it does with a checked request: no reach-in.
        self._submit = submit
        self._attach = attach

    async def submit(self, **fields: Unpack[GenerationFields]) -> ImageJob:
        """Submit a generation; returns its job as soon as the gateway gives a key.

        Fields are those of API.md section 1 (see :class:`GenerationFields`); None or leaving
        one out lets the gateway use its default. ``job_timeout`` is the job's deadline in
        seconds (default ``Timeouts.job``); ``extra_body`` adds fields this client does not
        know yet, sent as given. ``tag`` is your own id for this submit (a queue message id,
        say): never sent, but kept in the journal so :meth:`WujieClient.find_submit` can tell
        whether it was already sent.

        Raises:
            InvalidRequestError: a field breaks the model's rules (nothing was sent).
            SubmitUncertainError: the reply was lost; the gateway may have accepted the job.
            APIError: the gateway refused the submit.
        """
        # ``fields`` is this call's own dict (``**``): _send may take from it, no copy needed.
        return await self._send(_contract.GENERATIONS_PATH, GenerationRequest, cast(Any, fields))

    async def submit_edit(self, **fields: Unpack[EditFields]) -> ImageJob:
        """Submit an edit of ``image`` (URLs, base64 or data URLs), optionally with ``mask``.

        See :meth:`submit` for the other arguments and errors.
        """
        # Every other rule first; then the images' bytes, megabytes of them decoded on a
        # worker thread (the event loop runs on meanwhile).
        body, n, job_timeout, extra_body, tag = self._checked(
            EditRequest, cast(Any, fields), image_bytes=False
        )
        if text_chars(body) <= OFF_LOOP_CHARS:
            found = _rules.image_byte_violations(body)
        else:
            found = await anyio.to_thread.run_sync(
                _rules.image_byte_violations, body, abandon_on_cancel=True
            )
        if found:
            raise InvalidRequestError(found)
        return await self._submit(_contract.EDITS_PATH, body, n, job_timeout, extra_body, tag)

    def _send(
        self, path: str, kind: type[GenerationRequest | EditRequest], fields: dict[str, Any]
    ) -> Awaitable[ImageJob]:
        """The checked request's submit, to be awaited by the caller's coroutine (``submit``):
        a plain call, not a coroutine of its own (one layer less per submit; an error here
        still raises where the caller awaits)."""
        return self._submit(path, *self._checked(kind, fields))

    @staticmethod
    def _checked(
        kind: type[GenerationRequest | EditRequest],
        fields: dict[str, Any],
        *,
        image_bytes: bool = True,
    ) -> tuple[dict[str, Any], int | None, Any, Any, Any]:
        """``(body, n, job_timeout, extra_body, tag)`` of a submit's ``fields``, checked
        (``image_bytes``: see ``_rules.violations``).

        Raises:
            InvalidRequestError: naming every field that breaks a rule (nothing is sent).
        """
        # The client's own options (CLIENT_ONLY_FIELDS), never sent: taken out of the fields.
        job_timeout = fields.pop("job_timeout", None)
        extra_body = fields.pop("extra_body", None)
        tag = fields.pop("tag", None)
        # The tag is kept in the journal as text: it must be a str that can be stored.
        tag_found = (
            []
            if tag is None
            else [("tag", "must be a string (or None)")]
            if not isinstance(tag, str)
            else unencodable({"tag": tag})
        )
        try:
            body, n = kind.checked_body(fields, image_bytes=image_bytes)
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.violations + tag_found) from None
        if tag_found:
            raise InvalidRequestError(tag_found)
        return body, n, job_timeout, extra_body, tag

    async def generate(self, **fields: Unpack[GenerationFields]) -> ImageResult:
        """Submit a generation and wait for its result (``submit`` then ``await job``).

        Takes the arguments of :meth:`submit`; the wait is bounded by the job's deadline.
        """
        job = await self.submit(**fields)
        return await job

    async def edit(self, **fields: Unpack[EditFields]) -> ImageResult:
        """Submit an edit and wait for its result (``submit_edit`` then ``await job``)."""
        job = await self.submit_edit(**fields)
        return await job

    def attach(
        self,
        key: str,
        *,
        job_timeout: float | None = None,
        n: int | None = None,
        request: Mapping[str, Any] | None = None,
        charge_budget: bool = False,
        submitted_at: float | None = None,
    ) -> ImageJob:
        """A job for a key submitted earlier or elsewhere; the poller picks it up at once.

        Attaching a key this client already tracks, or saw end lately (the last 1,024), returns
        that same job; a key a submit of this client is still receiving (its journal write on
        the way) gets the job that submit then returns too (with the attach's deadline, and
        its ``request`` and ``n``, or the submit's where the attach gave none). ``n``, when
        given, lets ``job.image(i)`` reject indexes out of range at once. ``request`` is the
        body it was submitted with, kept as ``job.request``.

        ``charge_budget=True`` counts the job's cost against this client's points budget
        (``Limits(max_points=...)``), as when a re-run collects what an earlier run of the same
        budget paid for: its expected cost (by ``request`` and ``n``) is held from now, and
        turns into what it cost when it ends. It is never refused (it is paid already); the
        submits after it are. Without a budget it changes nothing. It needs ``request`` (with
        its ``model``): a job's cost is known by its kind. A job this client already counted
        as maybe charged is counted once: one whose wait ended (by its key), or a submit whose
        reply was lost, given the ``request`` of its ``SubmitUncertainError`` (or, with a
        journal, after ``record_submit_key``); so is the job of a key a submit of this
        client is still receiving (that submit's reservation counts it).

        ``submitted_at``, when known, is the unix time the key was submitted (a journal row's
        ``created``), or a time it was surely submitted by. The gateway may leave a new key out
        of its replies for a moment after its submit: that is what
        ``PollPolicy.unknown_key_grace`` waits for before a key never listed ends as unknown
        (``UnknownJobError``). A key submitted longer ago than that is past that moment, so
        it waits only what is left of the grace, and at least 3 s (a gateway may leave a key
        it knows out of a reply or two), measured over replies as ever. A key the gateway
        lists, and later leaves out, waits the whole grace. (In fleet mode the leader's own
        policy decides.)

        Raises:
            InvalidRequestError: ``key``, ``n``, ``job_timeout``, ``request`` or
                ``submitted_at`` is malformed.
            ClientStateError: the client is not open.
        """
        return self._attach(
            key,
            job_timeout=job_timeout,
            n=n,
            request=request,
            charge_budget=charge_budget,
            submitted_at=submitted_at,
        )
