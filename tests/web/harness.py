"""Harness for the browser demo tests: the server, the browser and the fake microphone.

The server runs in-process with scripted stages and the real Silero VAD. Chromium (Debian's
package) is driven headless by Playwright with a WAV file as its fake microphone, so a test
speaks to the page exactly as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from voicepipe.server.app import App, bound_port

from voicepipe import session as vs
from voicepipe.config import ServerConfig
from voicepipe.stages.base import Stages
from voicepipe.stages.scripted import REPLY, ScriptedASR, ScriptedLLM, ScriptedTTS
from voicepipe.testing import unavailable
from voicepipe.testing.speech import espeak_pcm
from voicepipe.testing.speech import write_wav as speech_wav

RATE = 24000
FIRST = "What is the capital of France?"
SECOND = "And how far away is the moon?"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-component-update",
    "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


def chromium_path() -> str | None:
    return os.environ.get("VOICEPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")


@functools.cache
def silero():  # type: ignore[no-untyped-def]
    from voicepipe.stages.silero_vad import SileroVAD

    return SileroVAD()


def write_wav(path: Path, parts: list[np.ndarray | float]) -> Path:
    """A mono PCM16 WAV of speech arrays and silences (floats, in seconds)."""
    audio = np.concatenate([np.zeros(int(p * RATE), np.float32) if isinstance(p, float) else p
                            for p in parts])
    return speech_wav(path, audio, RATE)


@functools.cache
def speech(text: str) -> np.ndarray:
    return espeak_pcm(text, RATE)


@contextlib.asynccontextmanager
async def scripted_server(llm: ScriptedLLM | None = None, tts: ScriptedTTS | None = None,
                          **config: Any) -> AsyncIterator[tuple[App, str]]:
    app = App(ServerConfig(host="127.0.0.1", port=0, **config))
    app.stages = Stages(vad=silero(), asr=ScriptedASR(), llm=llm or ScriptedLLM(),
                        tts=tts or ScriptedTTS(), info={"stages": "scripted"})
    app.status = "ready"
    server = await app.start()
    try:
        yield app, f"http://127.0.0.1:{bound_port(server)}/"
    finally:
        server.close()
        await server.wait_closed()
        app.close()


@contextlib.asynccontextmanager
async def browser_page(mic_wav: Path | None, *, loop: bool = False,
                       deny_microphone: bool = False) -> AsyncIterator[Any]:
    """A fresh headless Chromium whose microphone plays `mic_wav` (once, unless `loop`).

    Without a WAV the fake microphone beeps; `deny_microphone` answers the permission prompt
    with "block"."""
    import playwright.async_api as playwright  # the dev extra installs it
    exe = chromium_path()
    if exe is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    args = list(CHROMIUM_ARGS)
    if deny_microphone:
        args = [a for a in args if a != "--use-fake-ui-for-media-stream"]
        args.append("--deny-permission-prompts")
    if mic_wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={mic_wav}{'' if loop else '%noloop'}")
    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=exe, args=args, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 720, "height": 900})
            page.errors = []  # uncaught exceptions and failed loads, for the tests to check
            page.on("pageerror", lambda e: page.errors.append(f"exception: {e}"))
            page.on("response", lambda r: r.status >= 400 and page.errors.append(
                f"HTTP {r.status} {r.url}"))
            page.on("console", lambda m: m.type == "error" and print("console:", m.text))
            yield page
        finally:
            await browser.close()


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(page: Any, js: str, timeout: float = 20.0) -> Any:
    """Poll a JavaScript expression until it is truthy; returns its value. Works with a
    Playwright page and with the Firefox driver's page."""
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


# ---- the scenarios every browser runs ---------------------------------------------------------

def two_questions_wav(path: Path) -> Path:
    return write_wav(path, [0.5, speech(FIRST), 2.5, speech(SECOND), 6.0])


async def check_first_turn(page: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The first turn's transcript, played reply and latency marks; returns the turn."""
    first: dict[str, Any] = await wait_for(page, """(() => { const t = voicepipeDemo.turns()[0];
        return t && t.userFinal && t.latency && t.gapMs !== null && t; })()""", timeout)
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
    return first


async def drop_and_check_reconnect(page: Any, app: App) -> None:
    """The server side of the session goes away abruptly; the page says so and reconnects."""
    for conn in list(app.sessions):
        conn.ws.transport.abort()
    await wait_for(page, "voicepipeDemo.state === 'reconnecting'", timeout=5)
    assert "dropped" in await page.inner_text("#status")
    await wait_for(page, "voicepipeDemo.state === 'listening'", timeout=10)
    assert "Reconnected" in await page.inner_text("#status")


# ---- barge-in ---------------------------------------------

def spy_on_truncates(monkeypatch: Any) -> list[tuple[str, int]]:
    """Record each `conversation.item.truncate` the server receives: (item id, audio_end_ms)."""
    received: list[tuple[str, int]] = []
    handler = vs.Session._on_ConversationItemTruncate

    def spy(self: vs.Session, ev: Any, now: float) -> None:
        received.append((ev.item_id, ev.audio_end_ms))
        handler(self, ev, now)

    monkeypatch.setattr(vs.Session, "_on_ConversationItemTruncate", spy)
    return received


def barge_in_server() -> contextlib.AbstractAsyncContextManager[tuple[App, str]]:
    """3 s of audio per phrase: the reply lasts 6 s, and the second utterance of
    `barge_in_wav` comes 1.6 s after the first."""
    return scripted_server(llm=ScriptedLLM(token_delay=0.05), tts=ScriptedTTS(3.0))


def barge_in_wav(path: Path) -> Path:
    return write_wav(path, [0.5, speech(FIRST), 1.6, speech("Stop, wait a moment."), 5.0])


async def check_barge_in(page: Any, received: list[tuple[str, int]]) -> None:
    """Playback of the reply stopped, and the server got a truncate with what was played."""
    await wait_for(page, "voicepipeDemo.counters.truncatesSent >= 1", timeout=30)
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
