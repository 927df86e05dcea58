"""An aiohttp.web app whose lifespan owns ONE WujieClient, shared by every request.

From the clone, in the README's venv (``python3 -m venv .venv && .venv/bin/pip install -q -e .``)::

    .venv/bin/python examples/web_app.py --port 8000

    POST /images      {"prompt": ..., "model": ..., "n": ...}  waits, returns the image URLs
    POST /jobs        same body: returns {"key"} at once (202)
    GET  /jobs/{key}  the job's status, progress and images so far

Request handlers never poll: the client's single poller serves every awaiting handler.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from _connect import connect
from aiohttp import web

from wujie_async import (
    ImageJob,
    InvalidRequestError,
    JobError,
    WujieClient,
    WujieError,
)

CLIENT = web.AppKey("client", WujieClient)
# How long POST /images may hold a request open before answering 504 (the job goes on).
WAIT_SECONDS = 120.0
_FIELDS = ("prompt", "model", "n", "size", "quality", "style", "background", "output_format")


def _job_view(job: ImageJob) -> dict[str, Any]:
    return {
        "key": job.key,
        "status": job.status_name,
        "progress": job.progress,
        "images": [image.url for image in job.images],
    }


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
    return web.json_response({"key": job.key}, status=202)


async def job_status(request: web.Request) -> web.Response:
    job = request.app[CLIENT].images.attach(request.match_info["key"])
    view = _job_view(job)
    if job.done() and job.exception() is not None:
        view["error"] = str(job.exception())
    return web.json_response(view)


def create_app(
    client_factory: Callable[[], contextlib.AbstractAsyncContextManager[WujieClient]],
) -> web.Application:
    """The app; ``client_factory()`` opens the client its lifespan owns."""
    app = web.Application()

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        async with client_factory() as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(lifespan)
    app.router.add_post("/images", create_image)
    app.router.add_post("/jobs", submit_job)
    app.router.add_get("/jobs/{key}", job_status)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    web.run_app(create_app(connect), host=args.host, port=args.port)
