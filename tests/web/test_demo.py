"""The browser demo in headless Chromium: a spoken turn, barge-in, and the JS unit tests.

The server is in-process with the real Silero VAD and scripted ASR/LLM/TTS; the page's
microphone is a WAV file of espeak-ng speech. `window.voicepipeDemo` exposes the page's counters.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from voicepipe import session as vs
from voicepipe.stages.scripted import REPLY, ScriptedLLM, ScriptedTTS
from voicepipe.testing import unavailable

from .harness import ARTIFACTS, RATE, browser_page, scripted_server, speech, write_wav

WEB = Path(__file__).resolve().parents[2] / "clients" / "web"
FIRST = "What is the capital of France?"
SECOND = "And how far away is the moon?"


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(page: Any, js: str, timeout: float = 20.0) -> Any:
    """Poll a JavaScript expression until it is truthy; returns its value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await page.evaluate(js)
        if value:
            return value
        if loop.time() > end:
            state = await page.evaluate(
                "({c: voicepipeDemo.counters, t: voicepipeDemo.turns(), s: voicepipeDemo.status})")
            raise AssertionError(f"timed out waiting for {js}; page: {state}")
        await asyncio.sleep(0.1)


async def test_spoken_turns_show_transcript_reply_and_waterfall(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "two-questions.wav",
                    [0.5, speech(FIRST), 2.5, speech(SECOND), 6.0])
    async with scripted_server() as (_, url):
        async with browser_page(wav) as page:
            await page.goto(url)
            await page.click("#connect")
            await wait_for(page, "voicepipeDemo.state === 'listening'")
            first = await wait_for(page, """(() => { const t = voicepipeDemo.turns()[0];
                return t && t.userFinal && t.latency && t.gapMs !== null && t; })()""")
            assert first["user"] == "Hello from the scripted transcriber."
            counters = await page.evaluate("voicepipeDemo.counters")
            assert counters["playedSamples"] > 0
            assert counters["framesSent"] > 0
            assert counters["truncatesSent"] == 0
            assert set(first["latency"]["marks"]) >= {"speech_end", "endpoint", "first_byte_sent"}
            # the mic-to-speaker gap: at least the VAD's end-of-turn silence, and not absurd
            assert first["latency"]["derived_ms"]["endpoint_delay"] <= first["gapMs"] < 5000
            # the reply text appears as its audio is played, all of it once played
            await wait_for(page, f"voicepipeDemo.turns()[0].agent === {REPLY!r}")
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
    received: list[tuple[str, int]] = []
    handler = vs.Session._on_ConversationItemTruncate

    def spy(self: vs.Session, ev: Any, now: float) -> None:
        received.append((ev.item_id, ev.audio_end_ms))
        handler(self, ev, now)

    monkeypatch.setattr(vs.Session, "_on_ConversationItemTruncate", spy)
    wav = write_wav(tmp_path / "barge-in.wav",
                    [0.5, speech(FIRST), 1.6, speech("Stop, wait a moment."), 5.0])
    # 3 s of audio per phrase: the reply lasts 6 s, the second utterance comes 1.6 s after the first
    async with scripted_server(llm=ScriptedLLM(token_delay=0.05), tts=ScriptedTTS(3.0)) as (_, url):
        async with browser_page(wav) as page:
            await page.goto(url)
            await page.click("#connect")
            await wait_for(page, "voicepipeDemo.counters.truncatesSent >= 1")
            assert await page.evaluate("voicepipeDemo.counters.turns") >= 2
            await wait_for(page, "voicepipeDemo.counters.events['conversation.item.truncated']")
            cut = await page.evaluate("voicepipeDemo.turns()[0]")
            items = await page.evaluate("voicepipeDemo.items()")
            item = items[cut["assistantItem"]]
            assert item["cut"]
            assert 0 < item["played"] < item["queued"] <= 2 * 3 * RATE
            await asyncio.sleep(0.5)  # playback of the cut item stays stopped
            after = (await page.evaluate("voicepipeDemo.items()"))[cut["assistantItem"]]
            assert after["played"] == item["played"]
            # the server got the client's truncate, with the milliseconds played
            assert received and received[0][0] == cut["assistantItem"]
            assert received[0][1] == item["played"] * 1000 // RATE
            assert cut["cut"] and cut["agent"] != REPLY  # the text shown is what was heard
            assert await page.evaluate("voicepipeDemo.counters.events.error || 0") == 0
            assert page.errors == []


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
            for conn in list(app.sessions):  # the server side goes away abruptly
                conn.ws.transport.abort()
            await wait_for(page, "voicepipeDemo.state === 'reconnecting'", timeout=5)
            assert "dropped" in await page.inner_text("#status")
            await wait_for(page, "voicepipeDemo.state === 'listening'", timeout=10)
            assert "Reconnected" in await page.inner_text("#status")
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
