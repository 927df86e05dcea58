"""An aiohttp.web app whose lifespan owns ONE WujieClient, shared by every request.

From the clone, in the README's venv (``python3 -m venv .venv && .venv/bin/pip install -q -e .``)::

    .venv/bin/python examples/web_app.py --port 8000

    POST /images             {"prompt": ..., "model": ..., "n": ...}  waits, returns the URLs
    POST /jobs               same body: returns {"key"} at once (202)
    GET  /jobs/{key}         the job's status, progress and images so far (404: a key the
                             gateway has not listed within ``--lookup-seconds``; ask again;
                             503 while 100 such keys are being looked for)
    GET  /jobs/{key}/events  server-sent events, one per change, until the job ends; a page
                             follows it with ``new EventSource("/jobs/KEY/events")``

Request handlers never poll: the client's single poller serves every awaiting handler, and an
events stream only reads what that poller already saw (``job.updates()``).

Every wait has a deadline, and stopping (Ctrl-C, SIGTERM) ends them all at once: open event
streams get a last ``event: closing`` (the browser reconnects later by itself), waiting
requests answer 503 with their job's key, submits not yet sent are refused, and the client
closes, all within a few seconds. What the gateway says is bounded before it reaches a browser:
an image URL longer than 4,096 characters (or not http/https) is left out with a note, so is
an image sent inline (``b64_json``, megabytes of base64), and error text goes through
``wujie_async.snippet()``. A submit that failed for the gateway's or the setup's sake
(credentials, base URL, balance, the network, a lost reply) is logged for the operator, and
the browser gets a short message (502) without the error's text, which names the gateway's URL
and quotes the gateway; the gateway's refusal of the request itself (a sensitive prompt) is
the browser's to read (422, with its ``code``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from _connect import connect
from aiohttp import web

from wujie_async import (
    BusinessError,
    ClientStateError,
    GeneratedImage,
    ImageJob,
    InvalidRequestError,
    JobError,
    JobUpdate,
    SubmitUncertainError,
    WujieClient,
    WujieError,
    snippet,
)

logger = logging.getLogger("web_app")
CLIENT = web.AppKey("client", WujieClient)
# How long POST /images may hold a request open before answering 504 (the job goes on).
WAIT_SECONDS = 120.0
_FIELDS = ("prompt", "model", "n", "size", "quality", "style", "background", "output_format")


SUBMITTED = web.AppKey("submitted", set)
# How long a request for a key nobody here submitted waits for the gateway to list it before
# answering 404 (the key is not given up: a later request may find it listed).
LOOKUP_SECONDS = web.AppKey("lookup_seconds", float)
# Keys nobody here submitted that the client looks for and the gateway has not listed yet, and
# how many of them at most: each is asked about in the client's batch calls until the gateway
# lists it or its unknown_key_grace runs out, so a browser sending made-up keys by the
# thousand would fill the calls that follow this app's paid jobs (and the gateway's rate).
LOOKING = web.AppKey("looking", dict)
MAX_LOOKUPS = web.AppKey("max_lookups", int)

# Once stopping, how long requests still open get before aiohttp cancels them (aiohttp's
# shutdown_timeout: a handler not reading its request gets it twice, so up to 6 s). The app's
# own waits (event streams included) end at once, so this is only a backstop.
SHUTDOWN_SECONDS = 3.0
# How long one event may take to reach a reader: a reader that stopped reading is dropped.
WRITE_SECONDS = 30.0
# How long a stream's last event may take when the app stops; and when a browser reconnects.
CLOSING_WRITE_SECONDS = 1.0
RECONNECT_MS = 5000
# What the gateway says is bounded before it reaches a browser: the longest image URL passed
# on (a real one is a few hundred characters), and the most characters of any other text.
MAX_URL_CHARS = 4096
MAX_TEXT_CHARS = 500


class Waits:
    """The app's open waits (a request waiting on its job, an event stream), each with a
    deadline, and all ended at once when the app stops (see ``end_all``)."""

    def __init__(self) -> None:
        self.stopping = False
        self._open: set[asyncio.Timeout] = set()

    @contextlib.asynccontextmanager
    async def until_stopping(self, seconds: float | None) -> AsyncIterator[None]:
        """Run the block; TimeoutError after ``seconds`` (None: no limit) or when the app stops
        (``self.stopping`` says which)."""
        async with asyncio.timeout(seconds) as deadline:
            if self.stopping:
                deadline.reschedule(asyncio.get_running_loop().time())
            self._open.add(deadline)
            try:
                yield
            finally:
                self._open.discard(deadline)

    def end_all(self) -> None:
        """Every open wait ends now, and every later one at once."""
        self.stopping = True
        now = asyncio.get_running_loop().time()
        for deadline in self._open:
            deadline.reschedule(now)


WAITS = web.AppKey("waits", Waits)


def _text(text: object) -> str:
    """Server text (an error message may quote the gateway), safe and short for a browser."""
    return snippet(str(text), limit=MAX_TEXT_CHARS)


def _images_view(images: Iterable[GeneratedImage]) -> dict[str, Any]:
    """``images``: each image's URL, in index order; null for one left out, and a note in
    ``notes`` saying why (sent inline, not at a URL; too long, not http or https: a broken or
    hostile gateway's)."""
    urls: list[str | None] = []
    notes: list[str] = []
    for image in images:
        url = image.url
        if url is None and image.b64_json is not None:
            # A gateway may send an image inline (as OpenAI's API sends gpt-image-1's): its
            # megabytes of base64 are not passed on in a reply or an event.
            notes.append(
                f"image {image.index}: sent inline (b64_json), not at a URL: this app passes "
                "on URLs only (save it with job.save())"
            )
        elif url is not None and len(url) > MAX_URL_CHARS:
            notes.append(f"image {image.index}: its URL of {len(url):,} characters is left out")
            url = None
        elif url is not None and (
            not url.startswith(("https://", "http://")) or not url.isprintable() or " " in url
        ):
            notes.append(f"image {image.index}: its URL is left out (not an http(s) URL)")
            url = None
        urls.append(url)
    return {"images": urls, "notes": notes} if notes else {"images": urls}


def _job_view(job: ImageJob) -> dict[str, Any]:
    return _update_view(job.snapshot())


def _update_view(update: JobUpdate) -> dict[str, Any]:
    view: dict[str, Any] = {
        "key": update.key,
        "status": update.status_name,
        "progress": update.progress,
        "queue_position": update.queue_position,
        "expected_seconds": update.expected_seconds,
        **_images_view(update.images),
        "done": update.done,
    }
    if update.error is not None:
        view["error"] = _text(update.error)
    return view


def _event(kind: str, data: dict[str, Any], retry_ms: int | None = None) -> bytes:
    """One server-sent event. The JSON is ASCII (``ensure_ascii``) and on one line, so no
    text in it can end the event or start another."""
    retry = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"event: {kind}\n{retry}data: {json.dumps(data)}\n\n".encode()


async def _known_job(request: web.Request) -> ImageJob:
    """The job of the URL's key, or 404 when the gateway has not listed that key (yet).

    A key this app submitted is known. Any other is attached (the poller asks about it at
    once) and is a 404 if the gateway has not listed it within the app's lookup seconds. The
    job is never cancelled here: the gateway may merely be slow to list a key (one this app
    paid for before a restart, or one another request waits on), and the client's own
    ``PollPolicy(unknown_key_grace=...)`` ends a key the gateway never lists. While
    ``max_lookups`` such keys are not listed yet, another is a 503 before it is attached.
    """
    key = request.match_info["key"]
    looking: dict[str, ImageJob] = request.app[LOOKING]
    for seen in [k for k, j in looking.items() if j.status is not None or j.done()]:
        del looking[seen]  # listed (or ended): no longer a lookup
    if (
        key not in request.app[SUBMITTED]
        and key not in looking
        and len(looking) >= request.app[MAX_LOOKUPS]
    ):
        raise web.HTTPServiceUnavailable(text="too many unknown keys are being looked up")
    try:
        job = request.app[CLIENT].images.attach(key)
    except InvalidRequestError:
        raise web.HTTPNotFound(text="not a job key") from None
    if key in request.app[SUBMITTED] or job.status is not None or job.done():
        return job
    looking[key] = job
    waits = request.app[WAITS]
    with contextlib.suppress(TimeoutError):
        async with waits.until_stopping(request.app[LOOKUP_SECONDS]):
            async for update in job.updates():
                if update.status is not None or update.done:
                    break
    if job.status is None and waits.stopping:
        raise web.HTTPServiceUnavailable(text="the server is stopping")
    if job.status is None:
        # Not cancelled: the job is shared (other requests may wait on it, its journal row
        # would end), and a key only slow to be listed must still be collected.
        raise web.HTTPNotFound(text=f"the gateway has not listed job {key} (not listed yet)")
    return job


async def _request_fields(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    fields = {name: body[name] for name in _FIELDS if name in body}
    fields.setdefault("model", "gpt-image-1")
    return fields


def _bad_request(exc: InvalidRequestError) -> web.Response:
    return web.json_response(
        {"error": _text(exc), "field": exc.field, "rule": exc.rule}, status=400
    )


def _gateway_failed(exc: WujieError) -> web.Response:
    """A submit that failed. The gateway's refusal of this request (a sensitive prompt, a
    field it rejects) is the browser's to read; any other failure (credentials, base URL,
    balance, the network, a lost reply) is the operator's: its text names the gateway's URL
    and quotes what the gateway said (the app id it refused, say), so it is logged, and the
    browser is told only what it may do."""
    if isinstance(exc, BusinessError) and not exc.systemic:
        return web.json_response({"error": _text(exc), "code": exc.code}, status=422)
    logger.warning("a submit failed: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, SubmitUncertainError):
        told = "the image service did not answer: the request may have been taken; do not resend it"
    else:
        told = "the image service is unavailable; try again later"
    return web.json_response({"error": told, "type": type(exc).__name__}, status=502)


def _stopping() -> web.Response:
    return web.json_response({"error": "the server is stopping"}, status=503)


async def create_image(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    waits = request.app[WAITS]
    try:
        job = await client.images.submit(**await _request_fields(request))
        request.app[SUBMITTED].add(job.key)
        async with waits.until_stopping(WAIT_SECONDS):
            result = await job.result()
    except InvalidRequestError as exc:
        return _bad_request(exc)
    except TimeoutError:
        if waits.stopping:  # the job goes on: its key finds it once the app is back
            body = {"error": "the server is stopping", "key": job.key}
            return web.json_response(body, status=503)
        return web.json_response({"error": "still running", "key": job.key}, status=504)
    except JobError as exc:
        return web.json_response({"error": _text(exc), "key": exc.job_key}, status=422)
    except ClientStateError:
        return _stopping()  # stopping: submits not yet sent are refused
    except WujieError as exc:
        return _gateway_failed(exc)
    return web.json_response({"key": result.key, **_images_view(result.images)})


async def submit_job(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    try:
        job = await client.images.submit(**await _request_fields(request))
    except InvalidRequestError as exc:
        return _bad_request(exc)
    except ClientStateError:
        return _stopping()
    except WujieError as exc:
        return _gateway_failed(exc)
    request.app[SUBMITTED].add(job.key)
    return web.json_response({"key": job.key}, status=202)


async def job_status(request: web.Request) -> web.Response:
    return web.json_response(_job_view(await _known_job(request)))


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the job's state now, then one event per change; the last one is
    ``event: done``. A slow reader gets the latest state, never a backlog.

    When the app stops, the stream ends at once with ``event: closing`` (the job goes on; the
    browser reconnects after ``retry`` ms). A reader that takes no event for WRITE_SECONDS is
    dropped.
    """
    job = await _known_job(request)
    waits = request.app[WAITS]
    stream = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    with contextlib.suppress(ConnectionResetError):  # the browser went away; the job goes on
        try:
            async with waits.until_stopping(None):
                await stream.prepare(request)
                async for update in job.updates():
                    kind = "done" if update.done else "update"
                    async with asyncio.timeout(WRITE_SECONDS):
                        await stream.write(_event(kind, _update_view(update)))
        except TimeoutError:
            if not stream.prepared:  # the app stopped before the stream began
                raise web.HTTPServiceUnavailable(text="the server is stopping") from None
            if not waits.stopping:  # a reader that stopped reading: drop it
                if request.transport is not None:
                    request.transport.abort()
                return stream
            closing = {"key": job.key, "reason": "the server is stopping; the job goes on"}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSING_WRITE_SECONDS):
                    await stream.write(_event("closing", closing, retry_ms=RECONNECT_MS))
    return stream


def create_app(
    client_factory: Callable[[], contextlib.AbstractAsyncContextManager[WujieClient]],
    *,
    lookup_seconds: float = 5.0,
    max_lookups: int = 100,
) -> web.Application:
    """The app; ``client_factory()`` opens the client its lifespan owns; a key nobody here
    submitted is a 404 if the gateway has not listed it within ``lookup_seconds`` (the job
    goes on: the client asks about it until its ``unknown_key_grace`` runs out); while
    ``max_lookups`` such keys are not listed yet, another is a 503."""
    app = web.Application()
    app[LOOKUP_SECONDS] = lookup_seconds
    app[MAX_LOOKUPS] = max_lookups
    app[LOOKING] = {}
    app[WAITS] = Waits()

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        # Closed after the requests end (aiohttp runs cleanup after them), which on_shutdown
        # below makes prompt.
        async with client_factory() as client:
            app[CLIENT] = client
            app[SUBMITTED] = set()  # an example's memory: a real app keeps keys elsewhere
            yield

    async def stopping(app: web.Application) -> None:
        # aiohttp's on_shutdown: the app stops listening, then calls this before it waits
        # for the requests still open; end their waits now rather than when their jobs end.
        app[WAITS].end_all()
        if CLIENT in app:
            with contextlib.suppress(ClientStateError):  # it is closed already
                app[CLIENT].stop_submitting()

    app.cleanup_ctx.append(lifespan)
    app.on_shutdown.append(stopping)
    app.router.add_post("/images", create_image)
    app.router.add_post("/jobs", submit_job)
    app.router.add_get("/jobs/{key}", job_status)
    app.router.add_get("/jobs/{key}/events", job_events)
    return app


if __name__ == "__main__":
    # The docstring as written: its command lines stay lines a user can copy.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--lookup-seconds", type=float, default=5.0, help="how long an unknown key is looked for"
    )
    args = parser.parse_args()
    app = create_app(connect, lookup_seconds=args.lookup_seconds)
    web.run_app(app, host=args.host, port=args.port, shutdown_timeout=SHUTDOWN_SECONDS)
