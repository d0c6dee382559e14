"""The service's database and S3 calls, kept apart from classification.

Storage calls run on a small pool of their own threads, so a slow or dead database or bucket
holds those threads and nothing else: classification keeps answering. Every call is bounded in
time (`storage_timeout_s`); a storage error is the client's 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import sqlalchemy as sa
from bentoml.exceptions import ServiceUnavailable
from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger("bentoml.insect")
T = TypeVar("T")
# What an outage looks like from here: refused or dropped connections, timeouts, a full pool.
OUTAGES = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, BotoCoreError, ClientError, OSError)


class StorageLane:
    """`await lane(fn, *args)` runs `fn` on the storage threads, for at most `timeout_s`.
    `available` is False while the monitor last found a store down, and for `retry_s` after a
    call failed: callers that can do without storage (a prediction) skip it then instead of
    each waiting for the outage's timeout. The monitor probes each of `checks` every `retry_s`
    on a thread of its own: a store that hangs (a stopped, not killed, server) holds that one
    thread, never a storage thread or a request. `close()` stops the monitor and the threads."""

    def __init__(
        self,
        threads: int,
        retry_s: float,
        timeout_s: float = 10.0,
        checks: dict[str, Callable[[], None]] | None = None,
    ):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="storage")
        self.retry_s, self.timeout_s, self.checks = retry_s, timeout_s, checks or {}
        self.health = dict.fromkeys(self.checks, True)  # what the monitor found last (its first look is at once)
        self._probes: dict[str, threading.Thread] = {}
        self._failed_at = -float("inf")
        self._closed = threading.Event()
        if self.checks:
            threading.Thread(target=self._monitor, name="storage-monitor", daemon=True).start()

    @property
    def available(self) -> bool:
        return all(self.health.values()) and time.monotonic() - self._failed_at >= self.retry_s

    async def __call__(self, fn: Callable[..., T], *args, **kwargs) -> T:
        call = asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except OUTAGES as error:  # a timeout is an OSError too
            self._failed_at = time.monotonic()
            logger.warning("feedback storage failed: %s: %s", type(error).__name__, (str(error).splitlines() or [""])[0])
            raise ServiceUnavailable(f"feedback storage is unavailable, retry later ({type(error).__name__})") from error

    def close(self) -> None:
        self._closed.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> StorageLane:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _monitor(self) -> None:
        while not self._closed.is_set():
            for name, check in self.checks.items():
                self.health[name] = self._probe(name, check)
            self._closed.wait(self.retry_s)

    def _probe(self, name: str, check: Callable[[], None]) -> bool:
        """Whether `check` returned within the timeout. A probe still hanging from before counts
        as down, and no other is started beside it: a hung store holds one thread, not one a probe."""
        if (running := self._probes.get(name)) is not None and running.is_alive():
            return False
        answered = []

        def probe() -> None:
            try:
                check()
                answered.append(True)
            except Exception as error:  # any failure is "down"; what it was goes to the log, not to callers
                logger.info("storage probe %s: %s", name, type(error).__name__)

        self._probes[name] = thread = threading.Thread(target=probe, name=f"probe-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        return bool(answered)
