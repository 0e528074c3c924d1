"""The browser demo in headless Chromium: a spoken turn, barge-in, and the JS unit tests.

The server is in-process with the real Silero VAD and scripted ASR/LLM/TTS; the page's
microphone is a WAV file of espeak-ng speech. `window.voicepipeDemo` exposes the page's counters.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from voicepipe.testing import unavailable

from .harness import (
    ARTIFACTS,
    barge_in_server,
    barge_in_wav,
    browser_page,
    check_barge_in,
    check_first_turn,
    closed_port,
    drop_and_check_reconnect,
    scripted_server,
    spy_on_truncates,
    two_questions_wav,
    wait_for,
)

WEB = Path(__file__).resolve().parents[2] / "clients" / "web"


async def test_spoken_turns_show_transcript_reply_and_waterfall(tmp_path: Path) -> None:
    wav = two_questions_wav(tmp_path / "two-questions.wav")
    async with scripted_server() as (_, url):
        async with browser_page(wav) as page:
            await page.goto(url)
            await page.click("#connect")
            await wait_for(page, "voicepipeDemo.state === 'listening'")
            await check_first_turn(page)
            waterfall = page.locator(".turn").first.locator(".waterfall")
            assert await waterfall.is_visible()
            names = await waterfall.locator(".name").all_inner_texts()
            assert names[0] == "endpoint" and names[-1] == "mic → speaker"
            assert await page.locator(".turn .summary").first.inner_text() != ""

            second = await wait_for(page, """(() => { const t = voicepipeDemo.turns()[1];
                return t && t.latency && t.gapMs !== null && t.agent.length > 50 && t; })()""")
            assert second["latency"]["llm"]["cached_tokens"] > 0
            assert await page.locator(".turn .waterfall:visible").count() == 2
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "demo-two-turns.png"), full_page=True)
            gaps = [t["gapMs"] for t in await page.evaluate("voicepipeDemo.turns()")]
            print("mic-to-speaker gaps (ms):", gaps)
            await page.set_viewport_size({"width": 390, "height": 844})  # a phone
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            await page.screenshot(path=str(ARTIFACTS / "demo-phone.png"), full_page=True)
            assert page.errors == []


async def test_speech_over_the_reply_stops_playback_and_truncates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    received = spy_on_truncates(monkeypatch)
    async with barge_in_server() as (_, url), browser_page(barge_in_wav(tmp_path / "b.wav")) as page:
        await page.goto(url)
        await page.click("#connect")
        await check_barge_in(page, received)


async def test_unreachable_server_and_dropped_connection_are_explained() -> None:
    async with scripted_server() as (app, url):
        async with browser_page(None) as page:
            await page.goto(url)
            await page.click("summary")
            good = await page.input_value("#url")
            await page.fill("#url", f"ws://127.0.0.1:{closed_port()}/v1/realtime")
            await page.click("#connect")
            await wait_for(page, "voicepipeDemo.state === 'disconnected' && voicepipeDemo.status")
            assert "Cannot reach the voicepipe server" in await page.inner_text("#status")
            assert await page.is_visible("#status.error")

            await page.fill("#url", good)
            await page.click("#connect")
            await wait_for(page, "voicepipeDemo.state === 'listening'")
            await drop_and_check_reconnect(page, app)
            assert await page.evaluate("voicepipeDemo.counters.reconnects") == 1
            assert len(app.sessions) == 1


async def test_denied_microphone_is_explained() -> None:
    async with scripted_server() as (app, url):
        async with browser_page(None, deny_microphone=True) as page:
            await page.goto(url)
            await page.click("#connect")
            await wait_for(page, "voicepipeDemo.state === 'disconnected' && voicepipeDemo.status")
            assert "Microphone access was denied" in await page.inner_text("#status")
            assert await page.inner_text("#connect") == "Connect"
            await asyncio.sleep(0.2)
            assert len(app.sessions) == 0  # the socket opened for the attempt was closed


def test_client_module_unit_tests_under_node() -> None:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed")
    files = sorted(str(p) for p in (WEB / "test").glob("*.test.mjs"))
    proc = subprocess.run([node, "--test", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
