"""The service's database and S3 calls, kept apart from classification.

Storage calls run on a small pool of their own threads, so a slow or dead database or bucket
holds those threads and nothing else: classification keeps answering. Every call is bounded in
time (`storage_timeout_s`); a storage error is the client's 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
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
    """`await lane(fn, *args)` runs `fn` on the storage threads. `available` is False for
    `retry_s` after a failure: callers that can do without storage (a prediction) skip it then
    instead of each waiting for the outage's timeout."""

    def __init__(self, threads: int, retry_s: float):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="storage")
        self.retry_s = retry_s
        self._failed_at = -float("inf")

    @property
    def available(self) -> bool:
        return time.monotonic() - self._failed_at >= self.retry_s

    async def __call__(self, fn: Callable[..., T], *args, **kwargs) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))
        except OUTAGES as error:
            self._failed_at = time.monotonic()
            logger.warning("feedback storage failed: %s: %s", type(error).__name__, str(error).splitlines()[0])
            raise ServiceUnavailable(f"feedback storage is unavailable, retry later ({type(error).__name__})") from error
