"""ASGI middleware in front of the service's routes: it refuses a request before BentoML parses
it. Each refusal is a JSON `{"error": "..."}` with its 4xx status.

- `ApiKeys`: every route but health, metrics and the API documentation needs an API key
  (`Authorization: Bearer KEY` or `X-API-Key: KEY`) whose role may call it: 401 without a known
  key, 403 for a role that may not, 429 with Retry-After over the key's rate limit (per role,
  a sliding window), 404 for a route that is not public.
- `Admission`: at most so many requests on the upload routes at once; one more gets 503 with
  Retry-After before its body is read. Every 503 the service answers carries Retry-After.
- `UploadLimits`: 413 for a body over the limit, from Content-Length or while it streams in,
  without reading the rest; 400 for a form that does not parse (BentoML answers 500) and for a
  text value where a file belongs (BentoML would fetch it as a URL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from feedback.keys import Caller

logger = logging.getLogger("bentoml.insect")

OPEN_PATHS = {
    "/",
    "/docs",
    "/docs.json",
    "/schema.json",
    "/livez",
    "/readyz",
    "/healthz",
    "/metrics",
    "/app",
}  # BentoML clients read /schema.json
# the Swagger UI's files, storage health, the web app (which signs people in itself)
OPEN_PREFIXES = ("/static_content/", "/health/", "/app/")
MAX_CACHED_KEYS = 10_000
RETRY_AFTER_S = "1"  # what a 503 tells a client to wait, in seconds
STORE_TIMEOUT_S = 0.5  # a rate-limit store slower than this is treated as down
KEY_CACHE_S = 5.0  # a revoked key is refused within this long; the database is asked once per key and period


async def reply(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def presented_key(scope) -> str | None:
    authorization = header(scope, b"authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return header(scope, b"x-api-key")


class ApiKeys:
    """Who may call what: `route_roles` maps each public route to the least role it needs."""

    def __init__(
        self,
        app,
        *,
        authenticate: Callable[[str], Caller | None],
        route_roles: dict[str, str],
        rate_limits: dict[str, str],
        rate_limit_store: str = "memory://",
    ):
        from limits import parse
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        self.app, self.authenticate, self.route_roles = app, authenticate, route_roles
        self.rates = {role: parse(rate) for role, rate in rate_limits.items()}  # e.g. "120/minute"
        # two counters a key and window, whatever the limit (a moving window keeps every hit: in
        # Redis, each request walked a list as long as the limit)
        self.limiter = SlidingWindowCounterRateLimiter(shared_storage(rate_limit_store))
        # while a shared store is down, each process counts on its own: limited, not blocked
        self.fallback = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._known: dict[str, tuple[Caller | None, float]] = {}

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        needed = self.route_roles.get(path)
        if needed is None:
            return await reply(send, 404, f"no route {path}; see /docs")
        key = presented_key(scope)
        if not key:
            return await reply(send, 401, "send an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        try:
            caller = await self._caller(key)
        except KeysUnavailableError:
            return await reply(send, 503, "API keys cannot be checked now; retry later", {"retry-after": RETRY_AFTER_S})
        if caller is None:
            return await reply(send, 401, "unknown or revoked API key")
        if not caller.may_act_as(needed):
            return await reply(send, 403, f"a {caller.role} key may not call {path}: it needs a {needed} key")
        if wait_s := await self._over_limit(caller):
            message = f"key {caller.name!r} is over its limit of {self.rates[caller.role]}; retry in {wait_s} s"
            return await reply(send, 429, message, {"retry-after": str(wait_s)})
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    async def _over_limit(self, caller: Caller) -> int:
        """Seconds until the key may call again; 0 when it may now (and the call is counted)."""
        from limits.errors import StorageError

        try:
            return await wait_s(self.limiter, self.rates[caller.role], caller.name)
        except StorageError as error:
            logger.warning("rate-limit store failed (%s); counting in this process meanwhile", error)
            return await wait_s(self.fallback, self.rates[caller.role], caller.name)

    async def _caller(self, key: str) -> Caller | None:
        """The key's caller, asked of the database at most once per KEY_CACHE_S. While the
        database is down, a key it answered for before keeps its last answer."""
        cached = self._known.get(key)
        if cached is None or cached[1] < time.monotonic():
            if len(self._known) > MAX_CACHED_KEYS:  # a flood of made-up keys must not grow it without bound
                self._known.clear()
            try:
                cached = (await asyncio.to_thread(self.authenticate, key), time.monotonic() + KEY_CACHE_S)
            except Exception as error:
                if cached is None:
                    raise KeysUnavailableError from error
                return cached[0]
            self._known[key] = cached
        return cached[0]


def shared_storage(uri: str):
    """limits' async storage for `uri`; a Redis store gives up after STORE_TIMEOUT_S."""
    from limits.storage import storage_from_string

    if uri.startswith(("redis://", "rediss://", "redis+unix://")):
        timeouts = {"socket_timeout": STORE_TIMEOUT_S, "socket_connect_timeout": STORE_TIMEOUT_S}
        return storage_from_string(f"async+{uri}", wrap_exceptions=True, implementation="redispy", **timeouts)
    return storage_from_string(f"async+{uri}", wrap_exceptions=True)


async def wait_s(limiter, rate, name: str) -> int:
    if await limiter.hit(rate, name):
        return 0
    stats = await limiter.get_window_stats(rate, name)
    return max(1, math.ceil(stats.reset_time - time.time()))


class KeysUnavailableError(Exception):
    """The key database did not answer for a key it has not answered for before."""


class Admission:
    """At most `max_in_flight` requests on `routes` at once: past that, 503 with Retry-After
    before the body is read, so a burst queues within a bound instead of without one. Every 503
    from the app (storage down, no model yet) gets Retry-After too."""

    def __init__(self, app, *, routes: set[str], max_in_flight: int):
        self.app, self.routes, self.max_in_flight = app, routes, max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope.get("path") in self.routes
        if counted and self.in_flight >= self.max_in_flight:
            message = f"the service is at its limit of {self.max_in_flight} requests at once; retry in {RETRY_AFTER_S} s"
            return await reply(send, 503, message, {"retry-after": RETRY_AFTER_S})
        self.in_flight += counted
        scope.setdefault("state", {})["received_at"] = time.perf_counter()  # the handler times its upload from here
        try:
            await self.app(scope, receive, _retry_after_on_503(send))
        finally:
            self.in_flight -= counted


def _retry_after_on_503(send):
    async def sending(message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 503:
            headers = list(message.get("headers", []))
            if not any(name.lower() == b"retry-after" for name, _ in headers):
                message = {**message, "headers": [*headers, (b"retry-after", RETRY_AFTER_S.encode())]}
        await send(message)

    return sending


class BodyTooLargeError(Exception):
    pass


class UploadLimits:
    """On the upload `routes`: bodies up to `max_bytes`, read here (BentoML reads every body whole
    anyway), and file fields that hold files."""

    def __init__(self, app, *, routes: set[str], max_bytes: int, file_fields: set[str]):
        self.app, self.routes, self.max_bytes, self.file_fields = app, routes, max_bytes, file_fields

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.routes:
            return await self.app(scope, receive, send)
        too_large = f"the request body is over the limit of {self.max_bytes} bytes"
        declared = header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return await reply(send, 413, too_large)
        try:
            body = await self._read(receive)
        except BodyTooLargeError:
            return await reply(send, 413, too_large)
        if refusal := await self._refusal(scope, body):
            return await reply(send, 400, refusal)
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:  # stop reading: the rest is never taken in
                raise BodyTooLargeError
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _refusal(self, scope, body: bytes) -> str | None:
        """Why the body gets a 400, if it does: a form that does not parse (BentoML answers those
        with a 500), or a file field sent as a value (text, JSON, a form field without a
        filename), which BentoML would fetch as a URL."""
        content_type = header(scope, b"content-type") or ""
        if content_type.startswith("multipart/form-data"):
            try:  # Starlette's parser, the one BentoML runs next
                form = await Request(scope, _replay(body, None)).form()
            except (MultiPartException, HTTPException) as error:
                return f"malformed multipart/form-data: {getattr(error, 'detail', error)}"
            fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
            await form.close()
        elif content_type.startswith("application/x-www-form-urlencoded"):
            fields = parse_qs(body.decode("latin-1"))
        elif content_type.startswith("application/json"):
            try:
                fields = json.loads(body)
            except ValueError:
                return None  # BentoML answers malformed JSON itself
        else:
            return None
        text = next((name for name in self.file_fields if isinstance(fields, dict) and name in fields), None)
        return text and f"{text!r} must be an uploaded file, not text"


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()  # the server's disconnect, when the client goes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
