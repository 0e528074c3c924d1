"""The browser demo against `voicepipe serve` with the real default models: one spoken turn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from voicepipe.testing.server import http_url, voicepipe_serve

from .harness import browser_page, speech, write_wav
from .test_demo import wait_for

pytestmark = [pytest.mark.models, pytest.mark.slow]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with voicepipe_serve([]) as url:
        yield http_url(url)


async def test_a_spoken_question_is_answered_in_the_browser(server: str, tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "question.wav",
                    [0.5, speech("What is the capital of France?"), 20.0])
    async with browser_page(wav) as page:
        await page.goto(server)
        await page.click("#connect")
        turn = await wait_for(page, """(() => { const t = voicepipeDemo.turns()[0];
            return t && t.userFinal && t.latency && t.gapMs !== null && t.agent && t; })()""",
                              timeout=60)
        assert "capital" in turn["user"].lower() and "france" in turn["user"].lower()
        assert await page.evaluate("voicepipeDemo.counters.playedSamples") > 0
        assert await page.locator(".turn .waterfall").first.is_visible()
        print("real models: mic-to-speaker", turn["gapMs"], "ms; server",
              turn["latency"]["derived_ms"])
        assert page.errors == []
