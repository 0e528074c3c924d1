"""The browser demo against `voicepipe serve` with the real default models: one spoken turn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import browser_page, speech, write_wav
from .test_demo import wait_for

pytestmark = [pytest.mark.models, pytest.mark.slow]
READY = re.compile(r"voicepipe is ready: open (http://\S+)")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "voicepipe.server.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if m := READY.search(line):
                url.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(900)
    if not url:
        proc.kill()
        pytest.fail("voicepipe serve did not become ready:\n" + "".join(lines[-40:]))
    try:
        yield url[0]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


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
