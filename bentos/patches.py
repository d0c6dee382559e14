"""Every change this project makes to BentoML's internals, in one module, each written against
BentoML 1.4.39: importing it under another version is refused, since the internals
it replaces may have changed (check each patch against the new version, then raise the pin).

- `disarm_answered_timers`: the request timeout (`traffic.timeout`) without its leak.
- `label_metrics_by_route`: request metrics labelled by known route, not by raw path.
- `describe_openapi`: the API's own title, version and description in its OpenAPI document.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version as package_version

import attr
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from bentoml._internal.service.openapi.specification import Info
from starlette.responses import JSONResponse

PATCHED_VERSION = "1.4.39"
if package_version("bentoml") != PATCHED_VERSION:
    raise ImportError(f"bentos/patches.py patches BentoML {PATCHED_VERSION}'s internals; this is {package_version('bentoml')}")


def disarm_answered_timers() -> None:
    """Make BentoML's request timeout (`traffic.timeout`) cancel a request's timer once it is
    answered. Its `TimeoutMiddleware` never does: each answered request's timer, with its future
    and the request's context (its tracing span among them), lived on for the whole timeout; at
    180 requests/s and 60 s, ~11k requests' worth of objects reached the garbage collector's
    oldest generation, whose every full walk then stopped a worker for 60-100 ms. `_call` is
    BentoML 1.4.39's method with that `finally` added (the timer's handle is local to it)."""
    TimeoutMiddleware.__call__ = _call


async def _call(self: TimeoutMiddleware, scope, receive, send) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    answer = asyncio.ensure_future(self.app(scope, receive, _send))
    try:
        await waiter
    except TimeoutError:
        if answer.cancel():
            timed_out = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504)
            await timed_out(scope, receive, send)
    else:
        await answer
    finally:
        timer.cancel()


def label_metrics_by_route(routes: set[str], prefixes: tuple[str, ...]) -> None:
    """BentoML labels its request metrics with each request's raw path: 2,000 made-up paths grew
    /metrics from 27.6 KB to 8.5 MB, memory that never comes back. From here on its metrics
    middleware labels a request by its route when it is one of `routes`, by the first of
    `prefixes` it starts with, else as "other"; the app behind it still sees the real path."""
    from bentoml._internal.server.http import instruments

    bentoml_metrics = instruments.RunnerTrafficMetricsMiddleware
    if getattr(bentoml_metrics, "routes", None) is not None:  # already in place (a module imported twice)
        bentoml_metrics = bentoml_metrics.__base__

    class RouteLabelledMetrics(bentoml_metrics):
        def __init__(self, app, **options):
            super().__init__(_with_real_path(app), **options)

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http":
                path = scope["path"]
                label = path if path in routes else next((p + "*" for p in prefixes if path.startswith(p)), "other")
                scope = {**scope, "path": label, "insect.real_path": path}
            await super().__call__(scope, receive, send)

    RouteLabelledMetrics.routes = routes
    # BentoML's app factory imports the class by name when it builds the app, after this ran
    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics


def _with_real_path(app):
    async def with_real_path(scope, receive, send) -> None:
        if "insect.real_path" in scope:
            scope = {**scope, "path": scope.pop("insect.real_path")}
        await app(scope, receive, send)

    return with_real_path


def describe_openapi(service, *, title: str, version: str, description: str) -> None:
    """Give `service` (a BentoML service class) its own title, version and description in its
    OpenAPI document: BentoML fills them in with its boilerplate unless it serves a built Bento."""
    info = Info(title=title, version=version, description=description)

    class DescribedService(type(service)):
        __slots__ = ()  # the same layout as its base, so the service object can take this class

        @property
        def openapi_spec(self):
            return attr.evolve(super().openapi_spec, info=info)

    service.__class__ = DescribedService
