"""The service's storage lane and its monitor (bentos/storage.py), without a server."""

from __future__ import annotations

import threading
import time

from bentos.storage import StorageLane
from feedback.images import LocalImageStore


def _health_after(lane: StorageLane, seconds: float) -> dict[str, bool]:
    time.sleep(seconds)
    return dict(lane.health)


def test_a_local_image_store_with_no_image_yet_is_up(tmp_path):
    """The demo's first prediction found it 'down' (no directory yet) and was never stored."""
    lane = StorageLane(threads=1, retry_s=0.1, timeout_s=1.0, checks={"images": LocalImageStore(tmp_path / "images").check})
    assert _health_after(lane, 0.5) == {"images": True} and lane.available


def test_the_monitor_finds_a_failing_store_down_and_a_hanging_one_down_on_one_thread():
    release = threading.Event()
    calls = {"hanging": 0}

    def failing() -> None:
        raise ConnectionRefusedError("refused")

    def hanging() -> None:
        calls["hanging"] += 1
        release.wait(30)

    lane = StorageLane(threads=1, retry_s=0.1, timeout_s=0.3, checks={"failing": failing, "hanging": hanging})
    try:
        assert _health_after(lane, 1.5) == {"failing": False, "hanging": False} and not lane.available
        assert calls["hanging"] == 1  # a hung probe is not joined by another while it hangs
    finally:
        release.set()
    assert _health_after(lane, 1.0)["hanging"] is True  # back once it answers
