"""End to end with the real default models: `voicepipe serve` on loopback, spoken turns."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import voicepipe_client as vc

from voicepipe.audio import resample
from voicepipe.testing.server import voicepipe_serve
from voicepipe.testing.speech import espeak_pcm

pytestmark = [pytest.mark.models, pytest.mark.slow]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with voicepipe_serve([]) as url:
        yield url


@pytest.fixture(scope="module")
def asr():  # type: ignore[no-untyped-def]
    from voicepipe.stages.whisper_asr import WhisperASR

    return WhisperASR(cpu_threads=2)


def speech(text: str) -> np.ndarray:
    return espeak_pcm(text, 24000)


async def until(rt: vc.Realtime, kind: str, timeout: float = 120.0) -> vc.Event:
    async with asyncio.timeout(timeout):
        while (ev := await rt.recv()).type != kind:
            pass
    return ev


def test_capital_of_france_then_a_cached_second_turn(server: str, asr) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[vc.TurnResult, vc.TurnResult]:
        async with vc.connect(server, session={"voicepipe": {"latency_events": True}}) as rt:
            first = await rt.talk(speech("What is the capital of France?"), sample_rate=24000,
                                  timeout=180)
            # a listener hears the reply out before asking again (else it is a barge-in)
            await asyncio.sleep(len(first.reply_audio) / first.sample_rate)
            second = await rt.talk(speech("And what is the capital of Germany?"),
                                   sample_rate=24000, timeout=180)
            return first, second

    first, second = asyncio.run(run())
    transcript = (first.user_transcript or "").lower()
    assert "capital" in transcript and "france" in transcript, first.user_transcript
    assert first.response_status == "completed"
    assert "paris" in first.reply_text.lower(), first.reply_text
    # the reply audio is real speech: our ASR hears Paris in it
    audio = first.reply_audio.astype(np.float32) / 32768.0
    heard = asr.transcribe(resample(audio, first.sample_rate, 16000), final=True).text
    assert "paris" in heard.lower(), heard
    assert first.client_voice_to_voice is not None and first.client_voice_to_voice > 0
    # the second turn runs only its own new tokens through the model
    llm1, llm2 = first.timings["llm"], second.timings["llm"]
    total1 = llm1["prefill_tokens"] + llm1["cached_tokens"] + llm1["generated_tokens"]
    assert llm2["cached_tokens"] >= total1 - 2
    assert 0 < llm2["prefill_tokens"] <= 40, llm2
    assert "berlin" in second.reply_text.lower(), second.reply_text


def test_barge_in_cancels_and_keeps_only_what_was_played(server: str) -> None:
    async def run() -> tuple[str, str, dict]:
        async with vc.connect(server) as rt:
            await rt.send_audio(speech("Tell me a long story about a brave knight and a dragon."),
                                sample_rate=24000, trailing_silence_ms=900)
            sent = ""
            interrupt = None
            async with asyncio.timeout(180):
                while (ev := await rt.recv()).type != "response.done":
                    if ev.type == "response.output_audio_transcript.delta":
                        sent += ev.data["delta"]
                    if ev.type == "response.output_audio.delta" and interrupt is None:
                        interrupt = asyncio.create_task(rt.send_audio(
                            speech("Wait, stop please."), sample_rate=24000,
                            trailing_silence_ms=200))
            assert interrupt is not None
            await interrupt
            kept = ev.data["response"]["output"][0]["content"][0]["transcript"]
            return sent, kept, ev.data["response"]

    sent, kept, response = asyncio.run(run())
    assert response["status"] == "cancelled", response
    assert response["usage"]["output_tokens"] > 0
    assert len(kept) < len(sent) or (not kept and sent)
    assert sent.startswith(kept)
