"""ASGI middleware in front of the service's routes: it refuses a request before BentoML parses
it. Each refusal is a JSON `{"error": "..."}` with its 4xx status.

- `ApiKeys`: every route but health, the API documentation and the web app's sign-in needs a
  caller: an API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`) on the API, a signed-in
  session on the web app. 401 without a known key, 403 for a role that may not, 429 with
  Retry-After over the key's rate limit (per role, a sliding window, the web app's requests
  included), 404 for a route that is not public; /metrics is an admin's. A key that is not known
  to be good costs its sender's address one try of a small budget before it is looked up; past
  the budget, 429 without a lookup. A stranger's refusal (no key, an unknown key, no route, a
  form sent without a session) is answered after a delay, so that a client looping on refusals
  sends one a delay instead of thousands a second.
- `Admission`: at most so many requests on the upload routes at once; one more gets 503 with
  Retry-After before its body is read. Every 503 the service answers carries Retry-After.
- `BodyLimits`: every body has a limit of its route's (kilobytes unless the route takes an image):
  413 from Content-Length or while it streams in, without reading the rest; 400 for a form or
  JSON that does not parse (BentoML answers 500) and for a text value where a file belongs
  (BentoML would fetch it as a URL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from urllib.parse import parse_qs, quote

from cachetools import LRUCache
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from feedback.keys import Caller, key_digest

logger = logging.getLogger("bentoml.insect")

OPEN_PATHS = {"/", "/docs", "/docs.json", "/schema.json", "/livez", "/readyz", "/healthz"}  # BentoML clients read /schema.json
OPEN_PREFIXES = ("/static_content/", "/health/")  # the Swagger UI's files, storage health
WEB_PREFIX = "/app"  # the web app: its callers are signed-in sessions
WEB_OPEN = {"/app/sign-in"}  # ... but for its sign-in form and its files
WEB_OPEN_PREFIXES = ("/app/static/",)
ADMIN_ROUTES = {"/metrics"}
MAX_CACHED_KEYS = 10_000  # each of the two caches (good keys, unknown keys)
MAX_FILENAME = 255  # characters of an uploaded file's name, as a file system takes them
RETRY_AFTER_S = "1"  # what a 503 tells a client to wait, in seconds
STORE_TIMEOUT_S = 0.5  # a rate-limit store slower than this is treated as down
KEY_CACHE_S = 5.0  # a revoked key is refused within this long; the database is asked once per key and period
LOOKUP_TIMEOUT_S = 2.0  # a key database slower than this is treated as down
MAX_HELD_STRANGERS = 1000  # refusals waiting out their delay at once; past that, answered at once
KNOWN_KEY_WAIT_S = 0.25  # how long a good key's request waits for its check again before its last answer serves


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


def client_address(scope) -> str:
    """Who sent the request, as the server saw it (behind a proxy: uvicorn's --forwarded-allow-ips)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


async def to_sign_in(scope, send) -> None:
    """Send a request without a (valid) session to the sign-in form, and back after it: to the
    page asked for by GET; a form sent without a session goes back to the app's front page."""
    back = scope["path"] if scope["method"] == "GET" else f"{WEB_PREFIX}/"
    if scope["method"] == "GET" and scope.get("query_string"):
        back += "?" + scope["query_string"].decode("latin-1")
    location = f"{WEB_PREFIX}/sign-in?next={quote(back, safe='/')}".encode()
    await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location)]})
    await send({"type": "http.response.body", "body": b""})


class ApiKeys:
    """Who may call what: `route_roles` maps each public route to the least role it needs; every
    web app page needs a client at least (the app checks finer roles itself). `session_digest`
    reads a request's web session: the sha256 of the key it signed in with, or None."""

    def __init__(
        self,
        app,
        *,
        authenticate: Callable[[str], Caller | None],
        route_roles: dict[str, str],
        rate_limits: dict[str, str],
        unknown_key_limit: str,
        session_digest: Callable[[dict], str | None] = lambda scope: None,
        rate_limit_store: str = "memory://",
        stranger_delay_s: float = 0.0,
    ):
        from limits import parse
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        self.app, self.authenticate, self.session_digest = app, authenticate, session_digest
        self.stranger_delay_s, self._held = stranger_delay_s, 0
        self.route_roles = {**route_roles, **dict.fromkeys(ADMIN_ROUTES, "admin")}
        self.rates = {role: parse(rate) for role, rate in rate_limits.items()}  # e.g. "120/minute"
        self.unknown_key_rate = parse(unknown_key_limit)  # per client address
        # two counters a key and window, whatever the limit (a moving window keeps every hit: in
        # Redis, each request walked a list as long as the limit)
        self.limiter = SlidingWindowCounterRateLimiter(shared_storage(rate_limit_store))
        # while a shared store is down, each process counts on its own: limited, not blocked
        self.fallback = SlidingWindowCounterRateLimiter(MemoryStorage())
        # key sha256 -> (caller, until when the answer holds); apart, so unknown keys never evict good ones
        self._good: LRUCache[str, tuple[Caller, float]] = LRUCache(MAX_CACHED_KEYS)
        self._unknown: LRUCache[str, float] = LRUCache(MAX_CACHED_KEYS)
        self._looking_up: dict[str, asyncio.Future] = {}  # at most one lookup a key at once
        # lookups on threads of their own: a database that hangs holds these, not the ones uploads decode on
        self.lookups = ThreadPoolExecutor(2, thread_name_prefix="key-lookup")

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        if path == WEB_PREFIX or path.startswith(f"{WEB_PREFIX}/"):
            return await self._web(scope, receive, send)
        needed = self.route_roles.get(path)
        if needed is None:
            return await self._refuse_stranger(partial(reply, send, 404, f"no route {path}; see /docs"))
        key = presented_key(scope)
        if not key:
            message = "send an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            return await self._refuse_stranger(partial(reply, send, 401, message))
        await self._admit(key_digest(key), needed, scope, receive, send)

    async def _web(self, scope, receive, send) -> None:
        """A web app request: its session's key, checked as an API key is; without a session,
        the sign-in form (nothing of the request is read)."""
        path = scope["path"]
        if path in WEB_OPEN or path.startswith(WEB_OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        digest = self.session_digest(scope)
        if digest is None:  # a newcomer's page at once, within its address's budget; else as a stranger's
            refusal = partial(to_sign_in, scope, send)
            newcomer = scope["method"] == "GET" and not await self._over_limit(
                self.unknown_key_rate, f"no-session:{client_address(scope)}"
            )
            return await (refusal() if newcomer else self._refuse_stranger(refusal))
        await self._admit(digest, "client", scope, receive, send, web=True)

    async def _admit(self, digest: str, needed: str, scope, receive, send, web: bool = False) -> None:
        """Let the holder of the key with this sha256 through, if it may call and is within its
        limits (a web session whose key is unknown or revoked goes to the sign-in form)."""
        try:
            caller = await self._caller(digest, client_address(scope))
        except KeysUnavailableError:
            return await reply(send, 503, "API keys cannot be checked now; retry later", {"retry-after": RETRY_AFTER_S})
        except TooManyUnknownKeysError as error:
            message = f"too many unknown keys from {client_address(scope)}; retry in {error.wait_s} s"
            return await self._refuse_stranger(partial(reply, send, 429, message, {"retry-after": str(error.wait_s)}))
        if caller is None:
            unknown = partial(to_sign_in, scope, send) if web else partial(reply, send, 401, "unknown or revoked API key")
            return await self._refuse_stranger(unknown)
        if not caller.may_act_as(needed):
            return await reply(send, 403, f"a {caller.role} key may not call {scope['path']}: it needs a {needed} key")
        if wait := await self._over_limit(self.rates[caller.role], caller.name):
            message = f"key {caller.name!r} is over its limit of {self.rates[caller.role]}; retry in {wait} s"
            return await reply(send, 429, message, {"retry-after": str(wait)})
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    async def _refuse_stranger(self, refusal: Callable[[], Awaitable[None]]) -> None:
        """Send `refusal` after about `stranger_delay_s`, or at once while MAX_HELD_STRANGERS wait:
        a waiting refusal holds a coroutine and its connection, nothing read, nothing asked. The
        delay varies by half either way, so clients refused together do not come back together
        (300 slow uploads in step came back as one burst a second)."""
        if self._held < MAX_HELD_STRANGERS:
            self._held += 1
            try:
                await asyncio.sleep(self.stranger_delay_s * random.uniform(0.5, 1.5))
            finally:
                self._held -= 1
        await refusal()

    async def _over_limit(self, rate, name: str) -> int:
        """Seconds until `name` may call again; 0 when it may now (and the call is counted)."""
        from limits.errors import StorageError

        try:
            return await wait_s(self.limiter, rate, name)
        except StorageError as error:
            logger.warning("rate-limit store failed (%s); counting in this process meanwhile", error)
            return await wait_s(self.fallback, rate, name)

    async def _caller(self, digest: str, address: str) -> Caller | None:
        """The caller holding the key with this sha256, asked of the database at most once per
        KEY_CACHE_S, and once at a time: a burst of requests with one key (after a restart, say)
        waits for the one lookup. A key known to be good is asked again without a limit; any
        other costs `address` one try of its budget first, and an unknown one is answered from
        memory for KEY_CACHE_S."""
        now = time.monotonic()
        known = self._good.get(digest)
        if known is not None and known[1] >= now:
            return known[0]
        if (pending := self._looking_up.get(digest)) is not None:
            return await asyncio.shield(pending)
        if known is None:
            if self._unknown.get(digest, 0.0) >= now:
                return None
            if wait := await self._over_limit(self.unknown_key_rate, f"unknown-key:{address}"):
                raise TooManyUnknownKeysError(wait)
        self._looking_up[digest] = lookup = asyncio.ensure_future(self._look_up(digest, known))
        lookup.add_done_callback(lambda _: self._looking_up.pop(digest, None))
        return await asyncio.shield(lookup)

    async def _look_up(self, digest: str, known: tuple[Caller, float] | None) -> Caller | None:
        """Ask the database, and remember its answer. A key known to be good keeps its last
        answer while the database is down or slow (a hanging one costs its requests a moment
        each KEY_CACHE_S)."""
        lookup = asyncio.get_running_loop().run_in_executor(self.lookups, self.authenticate, digest)
        try:
            caller = await asyncio.wait_for(lookup, LOOKUP_TIMEOUT_S if known is None else KNOWN_KEY_WAIT_S)
        except Exception as error:
            if known is None:
                raise KeysUnavailableError from error
            self._good[digest] = (known[0], time.monotonic() + KEY_CACHE_S)  # asked again in a while, not by every request
            return known[0]
        if caller is None:
            self._good.pop(digest, None)
            self._unknown[digest] = time.monotonic() + KEY_CACHE_S
        else:
            self._good[digest] = (caller, time.monotonic() + KEY_CACHE_S)
        return caller


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


class TooManyUnknownKeysError(Exception):
    """An address has tried more keys that are not known to be good than its budget allows."""

    def __init__(self, wait_s: int):
        self.wait_s = wait_s


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


class BodyLimits:
    """Every request body within its route's limit (`route_bytes`, else `default_bytes`), read
    here before anything parses it (BentoML and the web app read every body whole anyway), and
    file fields that hold files."""

    def __init__(self, app, *, route_bytes: dict[str, int], default_bytes: int, file_fields: set[str]):
        self.app, self.route_bytes, self.default_bytes, self.file_fields = app, route_bytes, default_bytes, file_fields

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.route_bytes.get(scope["path"], self.default_bytes)
        too_large = f"the request body is over the limit of {limit} bytes for {scope['path']}"
        declared = header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await reply(send, 413, too_large)
        try:
            body = await _read(receive, limit)
        except BodyTooLargeError:
            return await reply(send, 413, too_large)
        if refusal := await self._refusal(scope, body):
            return await reply(send, 400, refusal)
        await self.app(scope, _replay(body, receive), send)

    async def _refusal(self, scope, body: bytes) -> str | None:
        """Why the body gets a 400, if it does: a form or JSON that does not parse (BentoML
        answers those with a 500), a file name no file system takes, or a file field sent as a
        value (text, JSON, a form field without a filename), which BentoML would fetch as a URL."""
        content_type = header(scope, b"content-type") or ""
        if content_type.startswith("multipart/form-data"):
            try:  # Starlette's parser, the one BentoML and the web app run next
                form = await Request(scope, _replay(body, None)).form()
            except (MultiPartException, HTTPException) as error:
                return f"malformed multipart/form-data: {getattr(error, 'detail', error)}"
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
            await form.close()
            if any(len(file.filename or "") > MAX_FILENAME for file in files):
                return f"a file name is over {MAX_FILENAME} characters"
        elif content_type.startswith("application/x-www-form-urlencoded"):
            fields = parse_qs(body.decode("latin-1"))
        elif content_type.startswith("application/json") and body.strip():
            try:
                fields = json.loads(body)
            except (ValueError, RecursionError) as error:
                return f"malformed JSON: {type(error).__name__}"
        else:
            return None
        text = next((name for name in self.file_fields if isinstance(fields, dict) and name in fields), None)
        return text and f"{text!r} must be an uploaded file, not text"


async def _read(receive, limit: int) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:  # stop reading: the rest is never taken in
            raise BodyTooLargeError
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()  # the server's disconnect, when the client goes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
