"""Soak: 20 sessions of real-time speech for 60 s against the scripted stages, then leaks."""

from __future__ import annotations

import asyncio

import pytest
from voicepipe.bench.soak import soak

from voicepipe.testing.server import voicepipe_serve


@pytest.mark.slow
def test_twenty_sessions_for_a_minute_leave_nothing_behind() -> None:
    with voicepipe_serve(["--stages", "scripted"]) as url:
        result = asyncio.run(soak(url, sessions=20, duration=60.0))
    print(result.table())
    assert not result.errors, result.errors[:5]
    assert result.turns >= 20 * 5  # every session kept talking
    assert result.sessions_end == 0
    assert result.tasks_end <= result.tasks_before
    # allocator noise on a busy 2-core machine: the report's target is 5%
    assert result.rss_growth < 0.10, result.table()
    assert result.overhead_ms and min(result.overhead_ms) < 50
