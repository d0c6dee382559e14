"""ASGI middleware in front of the service's routes: it refuses a request before BentoML parses
it. Each refusal is a JSON `{"error": "..."}` with its 4xx status.

- `ApiKeys`: every route but health, metrics and the API documentation needs an API key
  (`Authorization: Bearer KEY` or `X-API-Key: KEY`) whose role may call it: 401 without a known
  key, 403 for a role that may not, 429 with Retry-After over the key's rate limit (per role,
  a moving window), 404 for a route that is not public. `/classify` is internal:
  BentoML's batching calls it through the service's own ASGI app, with this process's token.
- `UploadLimits`: 413 for a body over the limit, from Content-Length or while it streams in,
  without reading the rest; 400 for a text value where a file belongs (BentoML would fetch it as
  a URL).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs

from feedback.keys import Caller

OPEN_PATHS = {
    "/",
    "/docs",
    "/docs.json",
    "/schema.json",
    "/livez",
    "/readyz",
    "/healthz",
    "/metrics",
}  # BentoML clients read /schema.json
OPEN_PREFIXES = ("/static_content/",)  # the Swagger UI's files
# Held in this process's memory only: what the service's calls to its own internal routes carry.
INTERNAL_HEADER, INTERNAL_TOKEN = "x-insect-internal", secrets.token_urlsafe(32)
MAX_CACHED_KEYS = 10_000
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
        internal_routes: set[str],
        rate_limits: dict[str, str],
    ):
        from limits import parse
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self.app, self.authenticate, self.route_roles, self.internal_routes = app, authenticate, route_roles, internal_routes
        self.rates = {role: parse(rate) for role, rate in rate_limits.items()}  # e.g. "120/minute"
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self._known: dict[str, tuple[Caller | None, float]] = {}

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        if path in self.internal_routes and hmac.compare_digest(header(scope, INTERNAL_HEADER.encode()) or "", INTERNAL_TOKEN):
            return await self.app(scope, receive, send)
        needed = self.route_roles.get(path)
        if needed is None:
            return await reply(send, 404, f"no route {path}; see /docs")
        key = presented_key(scope)
        if not key:
            return await reply(send, 401, "send an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        caller = await self._caller(key)
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
        rate = self.rates[caller.role]
        if await self.limiter.hit(rate, caller.name):
            return 0
        stats = await self.limiter.get_window_stats(rate, caller.name)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def _caller(self, key: str) -> Caller | None:
        cached = self._known.get(key)
        if cached is None or cached[1] < time.monotonic():
            if len(self._known) > MAX_CACHED_KEYS:  # a flood of made-up keys must not grow it without bound
                self._known.clear()
            cached = (await asyncio.to_thread(self.authenticate, key), time.monotonic() + KEY_CACHE_S)
            self._known[key] = cached
        return cached[0]


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
        if text_field := self._text_in_file_field(scope, body):
            return await reply(send, 400, f"{text_field!r} must be an uploaded file, not text")
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

    def _text_in_file_field(self, scope, body: bytes) -> str | None:
        """A file field sent as a value (text, JSON, a form field without a filename): its name."""
        content_type = header(scope, b"content-type") or ""
        if content_type.startswith("multipart/form-data"):
            return next(_multipart_values(content_type, body, self.file_fields), None)
        if content_type.startswith("application/x-www-form-urlencoded"):
            fields = parse_qs(body.decode("latin-1"))
        elif content_type.startswith("application/json"):
            try:
                fields = json.loads(body)
            except ValueError:
                return None  # BentoML answers malformed JSON itself
        else:
            return None
        return next((name for name in self.file_fields if isinstance(fields, dict) and name in fields), None)


def _multipart_values(content_type: str, body: bytes, file_fields: set[str]) -> Iterator[str]:
    """The names of multipart parts in `file_fields` that carry no filename."""
    boundary = re.search(r"boundary=\"?([^\";]+)", content_type)
    if not boundary:
        return
    for part in body.split(b"--" + boundary.group(1).encode()):
        headers = part.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        name = re.search(r'content-disposition:[^\r\n]*\bname="([^"]*)"', headers)
        if name and name.group(1) in file_fields and "filename=" not in headers:
            yield name.group(1)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()  # the server's disconnect, when the client goes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
