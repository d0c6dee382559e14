"""The service's door (bentos/guards.py), as ASGI apps: what a request without a valid key costs,
body limits before anything is read, the web app's sessions, and bounded metric labels."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from bentos import guards
from bentos.guards import ApiKeys, BodyLimits
from feedback.keys import Caller, key_digest

GOOD = "insect_good-key"


async def ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"caller": str(scope.get("state", {}).get("caller"))}).encode()})


class KeyDatabase:
    """The key lookups a door makes, counted; knows GOOD (a client) and an admin key."""

    def __init__(self):
        self.lookups: list[str] = []

    def __call__(self, digest: str) -> Caller | None:
        self.lookups.append(digest)
        return {key_digest(GOOD): Caller("good", "client"), key_digest("admin-key"): Caller("boss", "admin")}.get(digest)


def door(database: KeyDatabase, unknown_key_limit: str = "5/minute", client_rate: str = "1000/minute", **options) -> ApiKeys:
    return ApiKeys(
        ok,
        authenticate=database,
        route_roles={"/predict": "client"},
        rate_limits={"client": client_rate, "admin": "1000/minute"},
        unknown_key_limit=unknown_key_limit,
        **options,
    )


async def post(
    app, path: str, key: str | None = None, client: str = "10.0.0.1", headers: dict | None = None, **kwargs
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client, 1234))
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    async with httpx.AsyncClient(transport=transport, base_url="http://bento") as http:
        return await http.post(path, headers=headers, **kwargs)


def statuses(app, keys: list[str], client: str = "10.0.0.1", path: str = "/predict") -> list[int]:
    async def run() -> list[int]:
        return [(await post(app, path, key, client)).status_code for key in keys]

    return asyncio.run(run())


def test_made_up_keys_cost_their_address_a_small_budget_and_no_lookup_past_it():
    database = KeyDatabase()
    answers = statuses(door(database), [f"insect_made-up-{i}" for i in range(20)])
    assert answers == [401] * 5 + [429] * 15
    assert len(database.lookups) == 5  # the other 15 never reached the database


def test_an_unknown_key_is_answered_from_memory_when_it_comes_again():
    database = KeyDatabase()
    assert statuses(door(database), ["insect_made-up"] * 4) == [401] * 4
    assert len(database.lookups) == 1


def test_a_good_key_is_served_beside_a_flood_of_made_up_ones_and_never_evicted_by_them(monkeypatch):
    monkeypatch.setattr(guards, "KEY_CACHE_S", 3600.0)  # the flood takes seconds: no answer expires meanwhile
    database = KeyDatabase()
    app = door(database, unknown_key_limit="100000/minute")
    assert statuses(app, [GOOD]) == [200]
    flood = [f"insect_made-up-{i}" for i in range(guards.MAX_CACHED_KEYS + 500)]
    assert set(statuses(app, flood, client="10.6.6.6")) == {401}
    assert statuses(app, [GOOD]) == [200]
    assert database.lookups.count(key_digest(GOOD)) == 1  # still cached: the flood cleared nothing


def test_a_known_good_key_is_checked_again_past_its_addresss_budget(monkeypatch):
    monkeypatch.setattr(guards, "KEY_CACHE_S", 0.0)  # every request asks the database again
    database = KeyDatabase()
    app = door(database, unknown_key_limit="2/minute")
    # GOOD's first lookup and x1 spend the budget of 2
    assert statuses(app, [GOOD, "insect_x1", "insect_x2", "insect_x3", GOOD, GOOD]) == [200, 401, 429, 429, 200, 200]


def test_metrics_are_an_admins():
    app = door(KeyDatabase())
    assert statuses(app, [None], path="/metrics") == [401]
    assert statuses(app, [GOOD], path="/metrics") == [403]
    assert statuses(app, ["admin-key"], path="/metrics") == [200]


class Body:
    """A request body that records how much of it was read."""

    def __init__(self, size: int):
        self.size, self.sent = size, 0

    async def __aiter__(self):
        while self.sent < self.size:
            self.sent += 65536
            yield b"x" * 65536


def test_a_web_page_without_a_session_goes_to_sign_in_and_its_body_is_never_read():
    app, body = door(KeyDatabase()), Body(20_000_000)
    response = asyncio.run(post(app, "/app/identify", content=body, headers={"Content-Length": "20000000"}))
    assert response.status_code == 303 and response.headers["location"] == "/app/sign-in?next=/app/"
    assert body.sent <= 65536
    page = asyncio.run(_get(app, "/app/history?page=2"))
    assert page.status_code == 303 and page.headers["location"] == "/app/sign-in?next=/app/history%3Fpage%3D2"


async def _get(app, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bento") as http:
        return await http.get(path)


def test_a_session_whose_key_was_revoked_goes_to_sign_in():
    app = door(KeyDatabase(), session_digest=lambda scope: key_digest("insect_revoked"))
    answer = asyncio.run(post(app, "/app/review/decide"))
    assert answer.status_code == 303 and answer.headers["location"] == "/app/sign-in?next=/app/"


def test_a_signed_in_session_is_checked_as_its_key_and_counts_against_its_limits():
    database = KeyDatabase()
    app = door(database, client_rate="2/minute", session_digest=lambda scope: key_digest(GOOD))
    answers = [asyncio.run(post(app, "/app/identify")) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert "good" in answers[0].json()["caller"]


def limits(app=ok) -> BodyLimits:
    return BodyLimits(app, route_bytes={"/predict": 100_000}, default_bytes=16_384, file_fields={"image"})


@pytest.mark.parametrize("path", ["/app/sign-in", "/app/review/decide", "/model"])
def test_every_post_route_has_a_body_limit_enforced_before_it_is_read(path):
    body = Body(200_000_000)
    declared = asyncio.run(post(limits(), path, content=body, headers={"Content-Length": "200000000"}))
    assert declared.status_code == 413 and body.sent <= 65536
    streamed = Body(200_000_000)  # no Content-Length: refused once the limit has streamed in
    assert asyncio.run(post(limits(), path, content=streamed)).status_code == 413 and streamed.sent < 100_000
    assert asyncio.run(post(limits(), path, data={"api_key": "k"})).status_code == 200


def test_a_deeply_nested_json_body_and_an_overlong_file_name_are_400s():
    nested = b"[" * 5000 + b"]" * 5000
    answer = asyncio.run(post(limits(), "/app/identify", content=nested, headers={"Content-Type": "application/json"}))
    assert answer.status_code == 400 and "malformed JSON" in answer.json()["error"]
    upload = {"image": ("a" * 300 + ".jpg", b"\xff\xd8", "image/jpeg")}
    answer = asyncio.run(post(limits(), "/predict", files=upload))
    assert answer.status_code == 400 and "over 255 characters" in answer.json()["error"]


async def _timed_posts(app, keys: list[str | None]) -> list[tuple[int, float]]:
    async def timed(key: str | None) -> tuple[int, float]:
        started = time.monotonic()
        answer = await post(app, "/predict", key)
        return answer.status_code, time.monotonic() - started

    return await asyncio.gather(*(timed(key) for key in keys))


def test_a_strangers_refusal_waits_and_a_good_key_does_not():
    app = door(KeyDatabase(), unknown_key_limit="1/minute", stranger_delay_s=0.4)
    answers = asyncio.run(_timed_posts(app, [None, "insect_x1", "insect_x2"]))  # no key, unknown, over the budget
    assert [status for status, _ in answers] == [401, 401, 429] and min(s for _, s in answers) >= 0.2
    assert statuses(app, [GOOD], client="10.0.0.2") == [200]
    (status, seconds), *_ = asyncio.run(_timed_posts(app, [GOOD]))
    assert status == 200 and seconds < 0.2


def test_no_more_than_so_many_refusals_wait_at_once(monkeypatch):
    monkeypatch.setattr(guards, "MAX_HELD_STRANGERS", 2)
    app = door(KeyDatabase(), stranger_delay_s=0.6)
    answers = asyncio.run(_timed_posts(app, [None] * 5))
    assert sorted(seconds < 0.2 for _, seconds in answers) == [False, False, True, True, True]


def test_pages_asked_for_without_a_session_go_to_sign_in_at_once_within_their_addresss_budget():
    app = door(KeyDatabase(), unknown_key_limit="3/minute", stranger_delay_s=0.6)

    async def timed_pages() -> list[float]:
        times = []
        for _ in range(5):
            started = time.monotonic()
            assert (await _get(app, "/app/")).status_code == 303
            times.append(time.monotonic() - started)
        return times

    assert [seconds < 0.2 for seconds in asyncio.run(timed_pages())] == [True, True, True, False, False]


def test_a_burst_of_one_key_costs_one_lookup_and_none_of_its_addresss_budget():
    """32 clients sharing a key, all at once after a restart, got 429s: each counted as unknown."""
    database = KeyDatabase()
    app = door(database, unknown_key_limit="2/minute")

    async def burst() -> list[int]:
        return [answer.status_code for answer in await asyncio.gather(*(post(app, "/predict", GOOD) for _ in range(32)))]

    assert asyncio.run(burst()) == [200] * 32
    assert database.lookups == [key_digest(GOOD)]
