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
    check = {"images": LocalImageStore(tmp_path / "images").check}
    with StorageLane(threads=1, retry_s=0.1, timeout_s=1.0, checks=check) as lane:
        assert _health_after(lane, 0.5) == {"images": True} and lane.available


def test_the_monitor_finds_a_failing_store_down_and_a_hanging_one_down_on_one_thread():
    release = threading.Event()
    calls = {"hanging": 0}

    def failing() -> None:
        raise ConnectionRefusedError("refused")

    def hanging() -> None:
        calls["hanging"] += 1
        release.wait(30)

    with StorageLane(threads=1, retry_s=0.1, timeout_s=0.3, checks={"failing": failing, "hanging": hanging}) as lane:
        try:
            assert _health_after(lane, 1.5) == {"failing": False, "hanging": False} and not lane.available
            assert calls["hanging"] == 1  # a hung probe is not joined by another while it hangs
        finally:
            release.set()
        assert _health_after(lane, 1.0)["hanging"] is True  # back once it answers


def test_a_closed_lane_stops_probing():
    """Lanes left probing kept logging, and spending CPU, until the process ended."""
    calls = []
    with StorageLane(threads=1, retry_s=0.05, timeout_s=0.3, checks={"counted": lambda: calls.append(1)}):
        time.sleep(0.3)
    time.sleep(0.1)  # a probe already started when it closed
    probed = len(calls)
    time.sleep(0.3)
    assert probed >= 2 and len(calls) == probed
