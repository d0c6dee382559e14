"""Rate limits per API key: counted once across the service's worker processes when the store is
shared, and still enforced, per process, while that store is down."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import ValidationError

from bentos.guards import ApiKeys
from config import ServeConfig
from feedback.keys import Caller
from tests.support import free_port

LIMIT = 5


async def ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def worker(store: str) -> ApiKeys:
    """What one Bento worker process puts in front of its routes."""
    return ApiKeys(
        ok,
        authenticate=lambda key: Caller(name=key, role="client"),
        route_roles={"/predict": "client"},
        rate_limits={"client": f"{LIMIT}/minute"},
        unknown_key_limit="1000/minute",
        rate_limit_store=store,
    )


async def statuses(workers: list[ApiKeys], calls: int, key: str) -> list[int]:
    """`calls` requests with `key`, spread over the workers in turn."""
    answers = []
    for call in range(calls):
        transport = httpx.ASGITransport(app=workers[call % len(workers)])
        async with httpx.AsyncClient(transport=transport, base_url="http://bento") as client:
            answers.append((await client.post("/predict", headers={"X-API-Key": key})).status_code)
    return answers


def test_two_workers_sharing_a_redis_store_count_a_key_once(redis_url):
    workers = [worker(redis_url), worker(redis_url)]
    assert asyncio.run(statuses(workers, 2 * LIMIT, "shared-key")) == [200] * LIMIT + [429] * LIMIT


def test_workers_counting_in_memory_would_each_let_the_limit_through():
    """Why more than one worker needs the shared store: the control for the test above."""
    workers = [worker("memory://"), worker("memory://")]
    assert asyncio.run(statuses(workers, 2 * LIMIT, "key")).count(200) == 2 * LIMIT


def test_a_down_store_still_limits_each_process_and_answers_no_error():
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    assert asyncio.run(statuses([worker(dead)], LIMIT + 2, "key")) == [200] * LIMIT + [429] * 2


def test_more_than_one_worker_with_limits_in_memory_is_refused():
    with pytest.raises(ValidationError, match="INSECT_SERVE__RATE_LIMIT_STORE"):
        ServeConfig(workers=2)
    assert ServeConfig(workers=2, rate_limit_store="redis://127.0.0.1:6380/1").workers == 2
