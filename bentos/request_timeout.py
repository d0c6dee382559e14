"""BentoML 1.4's request timeout (`traffic.timeout`), without its leak.

BentoML's `TimeoutMiddleware` arms a timer per request and never disarms it: each answered
request's timer, with its future and the request's context (its tracing span among them), lives
on for the whole timeout. At 180 requests/s and 60 s that is ~11k requests' worth of objects that
survive into the garbage collector's oldest generation, whose every full walk then stopped a
worker for 60-100 ms even with the model's heap frozen (measured: the README's "Under load").
`disarm_answered_timers()` makes the middleware cancel the timer once the request is over: the
method below is BentoML 1.4.39's, with that `finally` added (the timer's handle is local to it).
"""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.responses import JSONResponse


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


def disarm_answered_timers() -> None:
    TimeoutMiddleware.__call__ = _call
