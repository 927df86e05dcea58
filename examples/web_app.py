"""An aiohttp.web app whose lifespan owns ONE WujieClient, shared by every request.

From the clone, in the README's venv (``python3 -m venv .venv && .venv/bin/pip install -q -e .``)::

    .venv/bin/python examples/web_app.py --port 8000

    POST /images             {"prompt": ..., "model": ..., "n": ...}  waits, returns the URLs
    POST /jobs               same body: returns {"key"} at once (202)
    GET  /jobs/{key}         the job's status, progress and images so far (404: unknown key)
    GET  /jobs/{key}/events  server-sent events, one per change, until the job ends; a page
                             follows it with ``new EventSource("/jobs/KEY/events")``

Request handlers never poll: the client's single poller serves every awaiting handler, and an
events stream only reads what that poller already saw (``job.updates()``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from _connect import connect
from aiohttp import web

from wujie_async import (
    ImageJob,
    InvalidRequestError,
    JobError,
    JobUpdate,
    WujieClient,
    WujieError,
)

CLIENT = web.AppKey("client", WujieClient)
# How long POST /images may hold a request open before answering 504 (the job goes on).
WAIT_SECONDS = 120.0
_FIELDS = ("prompt", "model", "n", "size", "quality", "style", "background", "output_format")


SUBMITTED = web.AppKey("submitted", set)
# How long a key nobody here submitted may go unlisted by the gateway before it is a 404.
LOOKUP_SECONDS = web.AppKey("lookup_seconds", float)


def _job_view(job: ImageJob) -> dict[str, Any]:
    return _update_view(job.snapshot())


def _update_view(update: JobUpdate) -> dict[str, Any]:
    view: dict[str, Any] = {
        "key": update.key,
        "status": update.status_name,
        "progress": update.progress,
        "queue_position": update.queue_position,
        "expected_seconds": update.expected_seconds,
        "images": [image.url for image in update.images],
        "done": update.done,
    }
    if update.error is not None:
        view["error"] = str(update.error)
    return view


async def _known_job(request: web.Request) -> ImageJob:
    """The job of the URL's key, or 404 when the gateway does not know that key.

    A key this app submitted is known. Any other is attached (the poller asks about it at
    once) and is a 404 if the gateway has not listed it within the app's lookup seconds.
    """
    key = request.match_info["key"]
    try:
        job = request.app[CLIENT].images.attach(key)
    except InvalidRequestError:
        raise web.HTTPNotFound(text="not a job key") from None
    if key in request.app[SUBMITTED] or job.status is not None or job.done():
        return job
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(request.app[LOOKUP_SECONDS]):
            async for update in job.updates():
                if update.status is not None or update.done:
                    break
    if job.status is None:
        job.cancel()  # stop asking about a key the gateway does not know
        raise web.HTTPNotFound(text=f"the gateway does not know job {key}")
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
    return web.json_response({"error": str(exc), "field": exc.field, "rule": exc.rule}, status=400)


async def create_image(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    try:
        job = await client.images.submit(**await _request_fields(request))
        request.app[SUBMITTED].add(job.key)
        result = await job.result(timeout=WAIT_SECONDS)
    except InvalidRequestError as exc:
        return _bad_request(exc)
    except TimeoutError:
        return web.json_response({"error": "still running", "key": job.key}, status=504)
    except JobError as exc:
        return web.json_response({"error": str(exc), "key": exc.job_key}, status=422)
    except WujieError as exc:
        return web.json_response({"error": str(exc)}, status=502)
    return web.json_response({"key": result.key, "images": [i.url for i in result.images]})


async def submit_job(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    try:
        job = await client.images.submit(**await _request_fields(request))
    except InvalidRequestError as exc:
        return _bad_request(exc)
    except WujieError as exc:
        return web.json_response({"error": str(exc)}, status=502)
    request.app[SUBMITTED].add(job.key)
    return web.json_response({"key": job.key}, status=202)


async def job_status(request: web.Request) -> web.Response:
    return web.json_response(_job_view(await _known_job(request)))


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the job's state now, then one event per change; the last one is
    ``event: done``. A slow reader gets the latest state, never a backlog."""
    job = await _known_job(request)
    stream = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await stream.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the browser went away; the job goes on
        async for update in job.updates():
            kind = "done" if update.done else "update"
            data = json.dumps(_update_view(update))
            await stream.write(f"event: {kind}\ndata: {data}\n\n".encode())
    return stream


def create_app(
    client_factory: Callable[[], contextlib.AbstractAsyncContextManager[WujieClient]],
    *,
    lookup_seconds: float = 5.0,
) -> web.Application:
    """The app; ``client_factory()`` opens the client its lifespan owns; a key nobody here
    submitted is a 404 if the gateway has not listed it within ``lookup_seconds``."""
    app = web.Application()
    app[LOOKUP_SECONDS] = lookup_seconds

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        async with client_factory() as client:
            app[CLIENT] = client
            app[SUBMITTED] = set()  # an example's memory: a real app keeps keys elsewhere
            yield

    app.cleanup_ctx.append(lifespan)
    app.router.add_post("/images", create_image)
    app.router.add_post("/jobs", submit_job)
    app.router.add_get("/jobs/{key}", job_status)
    app.router.add_get("/jobs/{key}/events", job_events)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--lookup-seconds", type=float, default=5.0, help="how long an unknown key is looked for"
    )
    args = parser.parse_args()
    app = create_app(connect, lookup_seconds=args.lookup_seconds)
    web.run_app(app, host=args.host, port=args.port)
