"""The emulated gateway: an aiohttp.web application serving API.md over real HTTP.

Order of work for an API request, as at a real edge: injected faults (a proxy's doing), then
auth (401), then the per-app rate limit (429), then the body (20010001), then the job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import zlib
from dataclasses import asdict, replace
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives.asymmetric import rsa

from .. import _contract, _rules
from .._auth import verify_signature
from .._contract import JobStatus
from .._errors import InvalidRequestError
from . import _png
from ._clock import Clock, GatewayClock
from ._options import check_config, check_faults, fault_config_from_mapping
from ._replies import HTML_PAGE, Refused, envelope, inline_png
from ._state import (
    EmulatedJob,
    EmulatorConfig,
    FaultConfig,
    JobStore,
)
from ._stats import Stats

ENDPOINTS: Final = {
    "generations": _contract.GENERATIONS_PATH,
    "edits": _contract.EDITS_PATH,
    "info": _contract.BATCH_INFO_PATH,
}


_JOB_FAIL_CODE: Final = 50000001


# An entry's numbers (numbers_as_text gives them as strings).
_NUMBER_FIELDS: Final = frozenset(
    {"status", "complete_percent", "expected_seconds", "queue_before_num", "integral_cost"}
)


_VERIFIED_CACHE_MAX: Final = 10_000


logger = logging.getLogger("wujie_async.emulator")


def _drawn_by_key(key: str, probability: float) -> bool:
    """A fault drawn by a job's key rather than per request: every listing (and file) of the
    job agrees, ``probability`` of the jobs drawn."""
    return probability > 0 and zlib.crc32(key.encode()) % 10_000 < probability * 10_000


class _TokenBucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = now

    def take(self, now: float) -> float:
        """0 when a token was taken at ``now``, else seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Gateway:
    """State and handlers of one emulated gateway.

    Args:
        config: how it behaves.
        clock: the source of seconds for everything it times (jobs, rate limit, stats);
            default: the running event loop's clock. Tests pass a fake one to move time.

    Attributes:
        clock: its clock; ``clock.unix(reading)`` turns a reading into unix seconds.
    """

    def __init__(self, config: EmulatorConfig, *, clock: Clock | None = None) -> None:
        check_config(config)
        self.config = config
        self.clock = GatewayClock(clock)
        self.rng = random.Random(config.seed)
        self.store = JobStore(config, self.rng, self.clock)
        self.stats = Stats()
        self.apps: dict[str, rsa.RSAPublicKey] = {}
        self._verified: dict[str, tuple[str, int]] = {}
        self._buckets: dict[str, _TokenBucket] = {}
        self._burst_left = config.faults.burst_429

    # --- configuration at run time ------------------------------------------------------------
    @property
    def faults(self) -> FaultConfig:
        """The fault settings in force."""
        return self.config.faults

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the fault settings (takes effect on the next request)."""
        check_faults(faults)
        self.config = replace(self.config, faults=faults)
        self.store.config = self.config
        self._burst_left = faults.burst_429

    def set_rate_limit(self, rps: float | None) -> None:
        """Change the per-app rate limit."""
        self.config = replace(self.config, rate_limit_rps=rps)
        self.store.config = self.config
        self._buckets.clear()

    def register_app(self, app_id: str, public_key: rsa.RSAPublicKey) -> None:
        """Accept requests signed by ``app_id``'s key."""
        self.apps[app_id] = public_key

    # --- the application ------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._peer_gone])
        base = _contract.BASE_PATH
        app.router.add_post(base + ENDPOINTS["generations"], self._generations, name="generations")
        app.router.add_post(base + ENDPOINTS["edits"], self._edits, name="edits")
        app.router.add_post(base + ENDPOINTS["info"], self._info, name="info")
        app.router.add_get("/files/{key}/{index}.png", self._file, name="files")
        app.router.add_get("/files/tmp/{key}/{index}.png", self._temporary_file)
        app.router.add_get("/_emulator/stats", self._stats, name="stats")
        app.router.add_post("/_emulator/faults", self._set_faults, name="faults")
        return app

    @web.middleware
    async def _peer_gone(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A client that leaves mid-request is normal for a gateway: one DEBUG line, no ERROR.

        Once the peer has closed its connection, aiohttp fails the request's body with
        ConnectionResetError: a handler still reading it (after a ``slow_reply`` delay, or a
        client that gave up mid-upload) would raise it, and aiohttp logs any exception out of
        a handler as "Error handling request" at ERROR with a traceback. Only a connection
        error while the connection is gone is taken for the client leaving; any other error,
        or a connection error on a live connection, goes on to aiohttp and is logged as the
        bug it is.
        """
        try:
            return await handler(request)
        except ConnectionError as exc:
            transport = request.transport
            if transport is not None and not transport.is_closing():
                raise
            self.stats.clients_gone += 1
            logger.debug(
                "emulator: client left before the reply to %s %s (%s)",
                request.method,
                request.path,
                exc,
            )
            # Nothing reaches the client: aiohttp fails to write this and drops it quietly.
            return web.Response(status=499)

    def snapshot(self, *, timelines: bool = True) -> dict[str, Any]:
        """Every counter, as JSON-ready data."""
        now = self.clock.now()
        unix = self.clock.unix
        stats = self.stats
        data: dict[str, Any] = {
            "requests": dict(stats.requests),
            "http_statuses": {str(k): v for k, v in stats.http_statuses.items()},
            "batch_calls": len(stats.batch_sizes),
            "batch_sizes": list(stats.batch_sizes),
            "batch_callers": [list(call) for call in stats.batch_callers],
            "batch_keys": [list(keys) for keys in stats.batch_keys],
            "submits_accepted": stats.submits_accepted,
            "clients_gone": stats.clients_gone,
            "submit_arrivals": list(stats.submit_arrivals),
            # What the account has been charged: every job that has ended by now, polled or not.
            "points_charged": sum(
                job.cost() for job in self.store.jobs.values() if now >= job.ends_at
            ),
            "jobs_by_state": self.store.counts_by_state(now),
            "faults": dict(stats.faults),
        }
        if timelines:
            data["timelines"] = {
                job.key: {
                    "created": unix(job.created_at),
                    "done": unix(job.ends_at),
                    "first_listed_done": (
                        None if job.first_listed_done is None else unix(job.first_listed_done)
                    ),
                }
                for job in self.store.jobs.values()
            }
        return data

    # --- the steps every API request goes through ------------------------------------------------
    async def _front(self, request: web.Request, endpoint: str) -> str:
        """Faults, auth and rate limit; returns the app id, or raises Refused / drops."""
        self.stats.requests[endpoint] += 1
        if endpoint in ("generations", "edits"):
            self.stats.submit_arrivals.append(self.clock.unix(self.clock.now()))
        faults = self.config.faults
        if endpoint in faults.endpoints:
            await self._inject_faults(request, faults)
        app_id = self._authenticate(request)
        if self.config.rate_limit_rps is not None:
            bucket = self._buckets.get(app_id)
            if bucket is None:
                bucket = self._buckets[app_id] = _TokenBucket(
                    self.config.rate_limit_rps, self.clock.now()
                )
            wait = bucket.take(self.clock.now())
            if wait:
                self.stats.faults["rate_limited"] += 1
                raise self._too_many(max(1, math.ceil(wait)))
        return app_id

    def _too_many(self, retry_after: int) -> Refused:
        return Refused(
            envelope(
                "429",
                "too many requests",
                status=429,
                headers={"Retry-After": str(retry_after)},
            )
        )

    async def _inject_faults(self, request: web.Request, faults: FaultConfig) -> None:
        roll = self.rng.random
        if faults.slow_reply and roll() < faults.slow_reply:
            self.stats.faults["slow_reply"] += 1
            await asyncio.sleep(faults.slow_reply_s)
        if faults.drop_connection and roll() < faults.drop_connection:
            self.stats.faults["drop_connection"] += 1
            raise self._drop(request)
        if self._burst_left > 0:
            self._burst_left -= 1
            self.stats.faults["burst_429"] += 1
            raise self._too_many(faults.retry_after_s)
        if faults.http_429 and roll() < faults.http_429:
            self.stats.faults["http_429"] += 1
            raise self._too_many(faults.retry_after_s)
        if faults.http_5xx and roll() < faults.http_5xx:
            self.stats.faults["http_5xx"] += 1
            raise Refused(envelope("500", "internal server error", status=faults.http_5xx_status))
        if faults.html_reply and roll() < faults.html_reply:
            self.stats.faults["html_reply"] += 1
            raise Refused(
                web.Response(body=HTML_PAGE, status=faults.html_status, content_type="text/html")
            )

    @staticmethod
    def _drop(request: web.Request) -> Refused:
        # Close the socket with nothing written: the client sees the connection die mid-request.
        transport = request.transport
        if transport is not None:
            transport.abort()
        return Refused(web.Response(status=499), dropped=True)

    def _unauthorized(self, reason: str) -> Refused:
        return Refused(envelope(_contract.AUTH_ERROR_CODE, f"unauthorized: {reason}", status=401))

    def _authenticate(self, request: web.Request) -> str:
        header = request.headers.get("Authorization")
        if not header:
            raise self._unauthorized("missing Authorization header")
        now = self.clock.unix_now()  # the signed timestamp is unix seconds
        cached = self._verified.get(header)
        if cached is None:
            cached = self._verify(header)
            if len(self._verified) >= _VERIFIED_CACHE_MAX:
                self._verified.clear()
            self._verified[header] = cached
        app_id, timestamp = cached
        if now - timestamp > _contract.TIMESTAMP_MAX_AGE_SECONDS:
            raise self._unauthorized("timestamp is too old")
        if timestamp - now > _contract.TIMESTAMP_MAX_FUTURE_SECONDS:
            raise self._unauthorized("timestamp is in the future")
        return app_id

    def _verify(self, header: str) -> tuple[str, int]:
        try:
            parsed = json.loads(header)
        except ValueError:
            raise self._unauthorized("Authorization is not a JSON object") from None
        if not isinstance(parsed, dict):
            raise self._unauthorized("Authorization is not a JSON object")
        app_id, sign, original = parsed.get("appId"), parsed.get("sign"), parsed.get("original")
        if parsed.get("secretKeyVersion") != _contract.SECRET_KEY_VERSION:
            raise self._unauthorized('secretKeyVersion must be "1"')
        if not all(isinstance(v, str) and v for v in (app_id, sign, original)):
            raise self._unauthorized("appId, sign and original are required strings")
        assert isinstance(app_id, str) and isinstance(sign, str) and isinstance(original, str)
        try:
            signed = json.loads(original)
        except ValueError:
            raise self._unauthorized("original is not JSON") from None
        timestamp = signed.get("timestamp") if isinstance(signed, dict) else None
        if not isinstance(signed, dict) or signed.get("appId") != app_id:
            raise self._unauthorized("original does not name the same appId")
        if not isinstance(timestamp, int) or isinstance(timestamp, bool):
            raise self._unauthorized("original.timestamp must be an integer")
        public_key = self.apps.get(app_id)
        if public_key is None:
            raise self._unauthorized(f"unknown appId {app_id!r}")
        if not verify_signature(public_key, original, sign):
            raise self._unauthorized("signature does not verify")
        return app_id, timestamp

    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError:
            raise Refused(
                envelope(_contract.CODE_INVALID_PARAMETER, "body: must be valid JSON")
            ) from None

    async def _answer(self, request: web.Request, endpoint: str, work: Any) -> web.StreamResponse:
        try:
            app_id = await self._front(request, endpoint)
            response: web.StreamResponse = await work(request, app_id)
        except Refused as refused:
            response = refused.response
            if refused.dropped:
                return response  # nothing reaches the client; aiohttp discards it
        self.stats.http_statuses[response.status] += 1
        faults = self.config.faults
        if (
            faults.cut_reply
            and endpoint in faults.endpoints
            and isinstance(response, web.Response)
            and isinstance(response.body, bytes)
            and self.rng.random() < faults.cut_reply
        ):
            self.stats.faults["cut_reply"] += 1
            return await self._cut(request, response, response.body)
        return response

    @staticmethod
    async def _cut(request: web.Request, whole: web.Response, body: bytes) -> web.StreamResponse:
        """``whole``'s status, headers and first half, then the connection reset: a reply
        cut mid-body (``cut_reply``), the full length announced."""
        cut = web.StreamResponse(status=whole.status, headers=whole.headers)
        cut.content_length = len(body)
        await cut.prepare(request)
        await cut.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            transport.abort()
        return cut

    # --- endpoints -------------------------------------------------------------------------------
    async def _generations(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "generations", self._submit_generation)

    async def _edits(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "edits", self._submit_edit)

    async def _submit_generation(self, request: web.Request, app_id: str) -> web.StreamResponse:
        return await self._submit(request, app_id, "generation")

    async def _submit_edit(self, request: web.Request, app_id: str) -> web.StreamResponse:
        return await self._submit(request, app_id, "edit")

    async def _submit(
        self, request: web.Request, app_id: str, kind: _rules.RequestKind
    ) -> web.StreamResponse:
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return envelope(_contract.CODE_INVALID_PARAMETER, "body: must be a JSON object")
        found = _rules.violations(
            kind, body, unknown_models=False, strict_regexps=self.config.strict_regexps
        )
        if found:
            text = "; ".join(f"{name}: {rule}" for name, rule in found)
            return envelope(_contract.CODE_INVALID_PARAMETER, f"invalid parameter: {text}")
        faults = self.config.faults
        if faults.business_error and self.rng.random() < faults.business_error:
            self.stats.faults["business_error"] += 1
            return envelope(faults.business_error_code, "business error (injected)")
        job = self.store.create(app_id, body)
        self.stats.submits_accepted += 1
        if faults.drop_after_accept and self.rng.random() < faults.drop_after_accept:
            self.stats.faults["drop_after_accept"] += 1
            raise self._drop(request)
        return envelope(_contract.SUCCESS_CODE, "success", {"key": job.key})

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "info", self._batch_info)

    async def _batch_info(self, request: web.Request, app_id: str) -> web.StreamResponse:
        keys = await self._json_body(request)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return envelope(_contract.CODE_INVALID_PARAMETER, "body: must be a JSON array of keys")
        if len(keys) > self.config.batch_cap:
            return envelope(
                _contract.CODE_INVALID_PARAMETER,
                f"body: at most {self.config.batch_cap} keys per call, got {len(keys)}",
            )
        self.stats.batch_sizes.append(len(keys))
        now = self.clock.now()
        member = request.headers.get("X-Wujie-Member", "")
        self.stats.batch_callers.append((self.clock.unix(now), member))
        self.stats.batch_keys.append(keys)
        origin = str(request.url.origin())
        entries: list[dict[str, Any]] = []
        faults = self.config.faults
        for key in keys:
            job = self.store.visible(key, app_id, now)
            if job is None:
                continue
            if faults.entries_missing and self.rng.random() < faults.entries_missing:
                self.stats.faults["entries_missing"] += 1
                continue
            entry = self._entry(job, now, origin, faults)
            if faults.numbers_as_text and self.rng.random() < faults.numbers_as_text:
                self.stats.faults["numbers_as_text"] += 1
                entry = {
                    name: str(value) if name in _NUMBER_FIELDS and value is not None else value
                    for name, value in entry.items()
                }
            entries.append(entry)
            if faults.duplicate_entries and self.rng.random() < faults.duplicate_entries:
                self.stats.faults["duplicate_entries"] += 1
                entries.append(entry)
            if faults.stale_duplicates and self.rng.random() < faults.stale_duplicates:
                self.stats.faults["stale_duplicates"] += 1
                stale = {"key": job.key, "status": int(JobStatus.QUEUED), "images": []}
                entries.insert(self.rng.randrange(len(entries) + 1), stale)
        if faults.shuffle_entries:
            self.rng.shuffle(entries)
        return envelope(_contract.SUCCESS_CODE, "success", {_contract.BATCH_LIST_FIELD: entries})

    def _entry(
        self, job: EmulatedJob, now: float, origin: str, faults: FaultConfig
    ) -> dict[str, Any]:
        status: int = job.status_at(now)
        if status in _contract.TERMINAL_STATUSES:
            if job.first_listed_done is None:
                job.first_listed_done = now
        elif faults.unknown_status and self.rng.random() < faults.unknown_status:
            self.stats.faults["unknown_status"] += 1
            status = 2
        fail: dict[str, Any] | None = None
        if job.outcome == JobStatus.FAILED and status == JobStatus.FAILED:
            fail = {"fail_code": _JOB_FAIL_CODE, "fail_message": "generation failed upstream"}
        elif status == JobStatus.MODERATION_REJECTED:
            fail = {
                "fail_code": int(_contract.CODE_SENSITIVE_PROMPT),
                "fail_message": "prompt contains sensitive words",
            }
        config = self.config
        listed = job.images_listed_at(now, progressive=config.images_progressive)
        if status == JobStatus.SUCCEEDED and now < job.ends_at + config.done_unlisted_s * (
            config.time_scale
        ):
            listed = 0  # done, and the images not listed yet
        folder = "tmp/" if config.temporary_urls and now < job.ends_at else ""
        inline = config.image_delivery == "b64_json"
        revised = (
            f"{job.prompt}, rendered in fine detail"
            if config.revised_prompts and job.model == "dall-e-3"
            else None
        )
        images = [
            {
                "url": None if inline else f"{origin}/files/{folder}{job.key}/{index}.png",
                "b64_json": inline_png(job.key, index, job.size) if inline else None,
                "revised_prompt": revised,
            }
            for index in range(listed)
        ]
        entry: dict[str, Any] = {"key": job.key, "status": status}
        percent = job.percent_at(now, self.config.progress_percent)
        if percent is not None:
            entry["complete_percent"] = percent
        expected = job.expected_at(
            now,
            rounding=self.config.estimate_rounding,
            while_queued=self.config.estimate_while_queued,
        )
        if expected is not None:
            entry["expected_seconds"] = expected
        entry["images"] = images
        entry["fail_message"] = fail
        if self.config.progress_fields:
            self._progress(entry, job, now)
        return entry

    def _stamp(self, at: float) -> float | int:
        """A progress stamp: unix seconds as this gateway's clock and rounding give them."""
        unix = self.clock.unix(at) + self.config.stamp_skew
        return math.floor(unix) if self.config.stamp_rounding == "floor" else round(unix, 3)

    def _progress(self, entry: dict[str, Any], job: EmulatedJob, now: float) -> None:
        """The platform's optional progress fields, each only once it is known."""
        if now < job.started_at:
            entry["queue_before_num"] = self.store.queue_before(job, now)
        elif job.outcome != JobStatus.MODERATION_REJECTED:
            entry["start_gen_time"] = self._stamp(job.started_at)
        if now >= job.ends_at:
            entry["complete_time"] = self._stamp(job.ends_at)
            faults = self.config.faults
            if not _drawn_by_key(job.key, faults.cost_unreported):
                entry["integral_cost"] = (
                    0 if _drawn_by_key(job.key, faults.cost_zero) else job.cost()
                )

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests["files"] += 1
        job = self.store.jobs.get(request.match_info["key"])
        try:
            index = int(request.match_info["index"])
        except ValueError:
            index = -1
        if job is None or not 0 <= index < job.images_done_at(self.clock.now()):
            return web.Response(status=404, text="no such image")
        if _drawn_by_key(job.key, self.config.faults.images_gone):
            return web.Response(status=404, text="expired")
        width, height = _png.downscaled(*job.size)
        png = await asyncio.to_thread(_png.render_png, job.key, index, width, height)
        return web.Response(body=png, content_type="image/png")

    async def _temporary_file(self, request: web.Request) -> web.StreamResponse:
        """An image at its temporary URL (``temporary_urls``): gone once its job has ended."""
        job = self.store.jobs.get(request.match_info["key"])
        if job is None or self.clock.now() >= job.ends_at:
            self.stats.requests["files"] += 1
            return web.Response(status=404, text="expired")
        return await self._file(request)

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        timelines = request.query.get("timelines", "1") != "0"
        return web.json_response(self.snapshot(timelines=timelines))

    async def _set_faults(self, request: web.Request) -> web.StreamResponse:
        # The whole fault set is replaced (an empty object turns every fault off), read by the
        # same field parser as the command line, so the two never drift.
        try:
            wanted = await request.json()
            if not isinstance(wanted, dict):
                raise ValueError("the body must be a JSON object of FaultConfig fields")
            self.set_faults(fault_config_from_mapping(wanted))
        except (ValueError, InvalidRequestError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        current = asdict(self.config.faults)
        current["endpoints"] = sorted(current["endpoints"])
        return web.json_response(current)
