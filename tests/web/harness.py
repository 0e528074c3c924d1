"""Harness for the browser demo tests: the server, the browser and the fake microphone.

The server runs in-process with scripted stages and the real Silero VAD. Chromium (Debian's
package) is driven headless by Playwright with a WAV file as its fake microphone, so a test
speaks to the page exactly as a user would.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from voicepipe.server.app import App, bound_port

from voicepipe.config import ServerConfig
from voicepipe.stages.base import Stages
from voicepipe.stages.scripted import ScriptedASR, ScriptedLLM, ScriptedTTS
from voicepipe.testing import unavailable
from voicepipe.testing.speech import espeak_pcm
from voicepipe.testing.speech import write_wav as speech_wav

RATE = 24000
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
