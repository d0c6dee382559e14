"""The service's process under load: its request timers, its heap, its model thread."""

from __future__ import annotations

import asyncio
import gc
import io
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from PIL import Image

from bentos.batching import Batcher
from bentos.patches import disarm_answered_timers


async def _answer(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _hang(scope, receive, send) -> None:
    await asyncio.sleep(10)


async def _call(app, timeout: float) -> list[dict]:
    sent = []

    async def send(message):
        sent.append(message)

    await TimeoutMiddleware(app, timeout=timeout)({"type": "http"}, None, send)
    return sent


def _armed_timers() -> list[asyncio.TimerHandle]:
    return [o for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle) and not o.cancelled()]


def test_an_answered_request_leaves_no_timer_armed_and_a_slow_one_still_times_out():
    disarm_answered_timers()

    async def scenario():
        armed_before = len(_armed_timers())
        answers = [await _call(_answer, timeout=60) for _ in range(50)]
        assert len(_armed_timers()) == armed_before  # BentoML's own middleware leaves 50, alive for 60 s
        timed_out = await _call(_hang, timeout=0.05)
        return answers, timed_out

    answers, timed_out = asyncio.run(scenario())
    assert all(answer[0]["status"] == 200 for answer in answers)
    assert timed_out[0]["status"] == 504


def test_settling_the_heap_freezes_what_lives_and_collects_what_does_not():
    from bentos.service import settle_heap

    class Node:
        pass

    garbage, kept = Node(), Node()
    garbage.cycle = garbage  # freed only by the collector
    gone = weakref.ref(garbage)
    del garbage
    try:
        settle_heap()
        assert gone() is None
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: out of every collection's walk
    finally:
        gc.unfreeze()


def test_a_batch_runs_while_every_shared_worker_thread_is_busy():
    """The model has a thread of its own: decoding and other `to_thread` work that fills the
    event loop's default executor must not hold a batch back."""
    release = threading.Event()
    batcher = Batcher(lambda images: (images.sum(axis=(1, 2, 3))[:, None], "v1"), max_batch_size=8)

    async def scenario():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        busy = loop.run_in_executor(None, release.wait, 10)
        try:
            scored = await asyncio.wait_for(batcher(np.ones((3, 2, 2), np.float32)), timeout=2)
        finally:
            release.set()
            await busy
        return scored

    scored = asyncio.run(scenario())
    assert scored.logits.tolist() == [12.0]
    assert scored.result == "v1"


def _jpeg(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 60)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize(("side", "hops"), [(64, 0), (256, 0), (257, 1), (1024, 1)])
def test_small_photos_are_decoded_on_the_event_loop_and_larger_ones_on_a_thread(monkeypatch, side, hops):
    """A thread hop costs more than decoding a small photo under load; a large one would stall
    every request the event loop serves."""
    from bentos import service

    threaded = []
    to_thread = asyncio.to_thread

    async def counting_to_thread(fn, *args, **kwargs):
        threaded.append(fn)
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(service.asyncio, "to_thread", counting_to_thread)
    model = SimpleNamespace(image_size=32, classes=["aphid", "weevil"])
    served = SimpleNamespace(model=model)
    classifier = SimpleNamespace(
        _model=lambda: served,
        _pixels=service.InsectClassifier.inner._pixels,
        batcher=Batcher(lambda images: (np.tile([0.0, 1.0], (len(images), 1)), served), max_batch_size=8),
    )
    _, decoded, _, top = asyncio.run(service.InsectClassifier.inner.rank_species(classifier, _jpeg(side), 1))
    assert len(threaded) == hops
    assert decoded.size == (side, side)
    assert [score.species for score in top] == ["weevil"]


def test_threads_get_the_interpreter_lock_back_within_the_configured_interval(monkeypatch):
    from bentos import service

    monkeypatch.setattr(service.settings.serve, "gil_switch_interval_ms", 0.5)
    default = sys.getswitchinterval()
    try:
        service.shorten_lock_turns()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(default)


def test_the_bentoml_patches_refuse_a_bentoml_they_were_not_written_for(monkeypatch):
    """They replace BentoML internals verbatim: under another version they may break it silently."""
    import importlib
    import importlib.metadata

    import bentos.patches

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.5.0" if name == "bentoml" else "0")
    with pytest.raises(ImportError, match=r"patches BentoML 1\.4\.39's internals; this is 1\.5\.0"):
        importlib.reload(bentos.patches)
    monkeypatch.undo()
    importlib.reload(bentos.patches)
