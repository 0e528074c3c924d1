"""The browser demo in headless Firefox (Debian's firefox-esr, driven over WebDriver BiDi).

The same page, server and checks as test_demo.py's Chromium tests, in the other engine: a
spoken turn shows its transcript, reply audio is played and the waterfall is drawn; speech over
the reply stops playback and sends `conversation.item.truncate`.

One thing is substituted. Firefox's fake microphone is a tone and cannot play a file, so a
preload script (`FAKE_MICROPHONE`, run before the page's own scripts) replaces
`navigator.mediaDevices.getUserMedia` for audio: it decodes the test WAV (espeak-ng speech,
embedded as base64) with `decodeAudioData` in an AudioContext of its own, starts playing it
when getUserMedia is called, and returns that context's `MediaStreamAudioDestinationNode`
stream, which is silent once the WAV has played. Everything after getUserMedia is the real
code path: the page's MediaStreamSource and capture AudioWorklet, resampling and framing, the
JS client and its WebSocket, the server (real Silero VAD, scripted ASR/LLM/TTS), the playback
worklet and the page's counters. (The speakers are Firefox's mock audio device, set up by
firefox.py, as headless Chromium has a fake audio output; it runs at 48 kHz here.)
"""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import pytest

from .firefox import Page, firefox_page
from .harness import (
    ARTIFACTS,
    barge_in_server,
    barge_in_wav,
    check_barge_in,
    check_first_turn,
    closed_port,
    drop_and_check_reconnect,
    scripted_server,
    spy_on_truncates,
    two_questions_wav,
    wait_for,
    write_wav,
)

pytestmark = pytest.mark.timeout(110)

# The audio device's rate: 48 kHz, the usual hardware rate (headless Chromium runs at 44.1 kHz),
# so between the two browsers both of the page's resampling paths are covered.
DEVICE_RATE = 48000

FAKE_MICROPHONE = """() => {
  // The test's microphone: getUserMedia({audio}) plays a WAV instead of the device.
  const WAV = "%s";
  const devices = navigator.mediaDevices;
  if (!devices) return;
  const real = devices.getUserMedia.bind(devices);
  devices.getUserMedia = async (constraints) => {
    if (!constraints || !constraints.audio) return real(constraints);
    const ctx = new AudioContext();
    const bytes = Uint8Array.from(atob(WAV), (c) => c.charCodeAt(0));
    const speech = await ctx.decodeAudioData(bytes.buffer);
    const source = new AudioBufferSourceNode(ctx, { buffer: speech });
    const out = new MediaStreamAudioDestinationNode(ctx, { channelCount: 1 });
    source.connect(out);
    await ctx.resume();
    source.start();
    return out.stream;
  };
}"""


async def open_demo(page: Page, url: str, mic_wav: Path) -> None:
    """Load the demo with `mic_wav` as the microphone and press Connect."""
    wav = base64.b64encode(mic_wav.read_bytes()).decode()
    await page.add_init_script(FAKE_MICROPHONE % wav)
    await page.goto(url)
    assert await page.evaluate("navigator.userAgent.includes('Firefox')")
    await page.click("#connect")
    await wait_for(page, "voicepipeDemo.state === 'listening'")
    assert await page.evaluate("voicepipeDemo.client.player.ctx.sampleRate") == DEVICE_RATE


def firefox() -> contextlib.AbstractAsyncContextManager[Page]:
    """A headless Firefox tab (see firefox.py) whose audio device runs at DEVICE_RATE."""
    return firefox_page(prefs={"media.cubeb.force_sample_rate": DEVICE_RATE})


def visible(selector: str) -> str:
    """JS: how many elements matching `selector` are rendered (not hidden)."""
    return (f"[...document.querySelectorAll({json.dumps(selector)})]"
            ".filter((e) => e.getClientRects().length > 0).length")


async def test_spoken_turns_show_transcript_reply_and_waterfall_in_firefox(
        tmp_path: Path) -> None:
    wav = two_questions_wav(tmp_path / "two-questions.wav")
    async with scripted_server() as (_, url), firefox() as page:
        await open_demo(page, url, wav)
        await check_first_turn(page, timeout=30)
        assert await page.evaluate(visible(".turn:first-child .waterfall")) == 1
        names = await page.evaluate("""[...document.querySelectorAll(
            '.turn:first-child .waterfall .name')].map((e) => e.textContent)""")
        assert names[0] == "endpoint" and names[-1] == "mic → speaker"
        assert await page.inner_text(".turn .summary") != ""

        second = await wait_for(page, """(() => { const t = voicepipeDemo.turns()[1];
            return t && t.latency && t.gapMs !== null && t.agent.length > 50 && t; })()""",
                                timeout=30)
        assert second["latency"]["llm"]["cached_tokens"] > 0
        assert await page.evaluate(visible(".turn .waterfall")) == 2
        ARTIFACTS.mkdir(exist_ok=True)
        shot = await page.screenshot(ARTIFACTS / "firefox-demo.png", full_page=True)
        assert shot.read_bytes().startswith(b"\x89PNG")
        gaps = [t["gapMs"] for t in await page.evaluate("voicepipeDemo.turns()")]
        print("firefox mic-to-speaker gaps (ms):", gaps)
        assert page.errors == []


async def test_speech_over_the_reply_stops_playback_and_truncates_in_firefox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    received = spy_on_truncates(monkeypatch)
    async with barge_in_server() as (_, url), firefox() as page:
        await open_demo(page, url, barge_in_wav(tmp_path / "barge-in.wav"))
        await check_barge_in(page, received)


async def test_dropped_connection_reconnects_and_a_new_connect_is_not_retried_in_firefox(
        tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "silence.wav", [1.0])
    async with scripted_server() as (app, url), firefox() as page:
        await open_demo(page, url, wav)
        await drop_and_check_reconnect(page, app)
        await page.click("#connect")  # disconnect
        await wait_for(page, "voicepipeDemo.state === 'disconnected'")
        # a fresh Connect to a server that is not there is explained, not retried: the
        # reconnect of the earlier session is over
        await page.evaluate("document.querySelector('#url').value = "
                            f"'ws://127.0.0.1:{closed_port()}/v1/realtime'")
        await page.click("#connect")
        await wait_for(page, "voicepipeDemo.state === 'disconnected' && voicepipeDemo.status")
        assert "Cannot reach the voicepipe server" in await page.inner_text("#status")
        assert await page.evaluate("voicepipeDemo.counters.reconnects") == 1
        assert page.errors == []
