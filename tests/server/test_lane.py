"""The conversation lane: a session's updates run one at a time, in order, off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from voicepipe.server.connection import Lane


async def test_functions_run_in_order_one_at_a_time_off_the_loop() -> None:
    pool = ThreadPoolExecutor(4)
    lane = Lane(pool, asyncio.get_running_loop())
    log: list[int] = []
    running = threading.Semaphore(1)
    loop_thread = threading.get_ident()

    def step(i: int) -> int:
        assert running.acquire(blocking=False), "two lane functions ran at once"
        assert threading.get_ident() != loop_thread
        time.sleep(0.002 if i % 3 else 0.0)
        log.append(i)
        running.release()
        return i * i

    futures = [lane.submit(lambda i=i: step(i)) for i in range(30)]
    assert await asyncio.gather(*futures) == [i * i for i in range(30)]
    assert log == list(range(30))
    pool.shutdown()


async def test_a_failure_reaches_its_caller_and_the_lane_goes_on() -> None:
    pool = ThreadPoolExecutor(2)
    lane = Lane(pool, asyncio.get_running_loop())

    def fail() -> None:
        raise ValueError("no")

    bad, good = lane.submit(fail), lane.submit(lambda: "yes")
    with pytest.raises(ValueError):
        await bad
    assert await good == "yes"
    pool.shutdown()
    with pytest.raises(RuntimeError):  # the server is closing: said, not hung
        await lane.submit(lambda: "late")
