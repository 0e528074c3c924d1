"""Spoken turns through the real server and VAD, with scripted ASR/LLM/TTS (fast, exact)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any as Running

import numpy as np
import pytest
import voicepipe_client as vc

from voicepipe.testing.speech import espeak_pcm


async def until(rt: vc.Realtime, kind: str, timeout: float = 10.0) -> vc.Event:
    async with asyncio.timeout(timeout):
        while (ev := await rt.recv()).type != kind:
            pass
    return ev


@functools.cache
def utterance(text: str = "What is the capital of France?", rate: int = 24000) -> np.ndarray:
    return espeak_pcm(text, rate)


async def test_spoken_turn_events_and_timings(scripted: Running) -> None:
    async with vc.connect(scripted.url, session={"voicepipe": {"latency_events": True}}) as rt:
        result = await rt.talk(utterance(), sample_rate=24000, realtime=4.0)
        types = [ev.type for ev in result.events]
        for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "conversation.item.input_audio_transcription.completed",
                     "response.created", "response.output_audio.delta",
                     "response.output_audio_transcript.delta", "response.done"):
            assert kind in types, kind
        assert types.index("input_audio_buffer.speech_stopped") < types.index("response.created")
        assert result.user_transcript == "Hello from the scripted transcriber."
        assert result.reply_text == "This is a scripted reply from voicepipe. It has two sentences."
        assert result.response_status == "completed"
        assert len(result.reply_audio) == 2 * 2400  # two phrases of 100 ms at 24 kHz
        marks = result.timings["marks"]
        assert list(marks) == ["speech_end", "endpoint", "asr_final", "llm_first_token",
                               "tts_first_audio", "first_byte_sent"] or set(marks) == {
            "speech_end", "endpoint", "asr_final", "llm_first_token", "tts_first_audio",
            "first_byte_sent"}
        assert marks["speech_end"] <= marks["endpoint"] <= marks["first_byte_sent"]
        d = result.timings["derived_ms"]
        assert 0 <= d["endpoint_delay"] < 1500
        # a second turn: the history is cached, only the new message is prefilled
        second = await rt.talk(utterance(), sample_rate=24000, realtime=4.0)
        llm = second.timings["llm"]
        assert llm["cached_tokens"] > llm["prefill_tokens"] > 0


@pytest.mark.parametrize("fmt, rate", [
    ({"type": "audio/pcm", "rate": 16000}, 16000),
    ({"type": "audio/pcmu"}, 8000),
    ({"type": "audio/pcma"}, 8000),
])
async def test_other_input_and_output_formats(scripted: Running, fmt: dict, rate: int) -> None:
    session = {"audio": {"input": {"format": fmt}, "output": {"format": fmt}}}
    async with vc.connect(scripted.url, session=session) as rt:
        result = await rt.talk(utterance(rate=rate), sample_rate=rate, realtime=4.0)
        assert result.response_status == "completed"
        assert result.sample_rate == rate
        assert len(result.reply_audio) == 2 * rate // 10


@pytest.mark.server_config(token_delay=0.3)
async def test_barge_in_cancels_and_cuts_the_kept_reply(scripted: Running) -> None:
    async with vc.connect(scripted.url) as rt:
        await rt.send_audio(utterance(), sample_rate=24000, realtime=4.0,
                            trailing_silence_ms=800)
        first_audio = await until(rt, "response.output_audio.delta")
        item_id = first_audio.data["item_id"]
        await asyncio.sleep(0.05)
        await rt.send_audio(utterance("Stop, wait a moment."), sample_rate=24000, realtime=4.0,
                            trailing_silence_ms=100)
        done = await until(rt, "response.done")
        assert done.data["response"]["status"] == "cancelled"
        assert done.data["response"]["status_details"]["reason"] == "turn_detected"
        kept = done.data["response"]["output"][0]["content"][0]["transcript"]
        assert len(kept) < len("This is a scripted reply from voicepipe. It has two sentences.")
        # the LLM's copy of the conversation was cut the same way
        await asyncio.sleep(0.2)
        conv = next(iter(scripted.llm.open_conversations))
        assistant = [text for role, text in conv.messages if role == "assistant"]
        assert assistant[0] == kept
        assert item_id == done.data["response"]["output"][0]["id"]


async def test_a_reply_made_during_the_endpoint_wait_goes_out_at_the_endpoint(
        scripted: Running) -> None:
    """The scripted transcript is final at the first silent frame, so the reply is generated
    and synthesized while the VAD still waits for the end of the turn, and the endpoint only
    releases it. A pause shorter than that wait starts a reply too, which the speech after it
    drops: the conversation keeps one question and one answer."""
    # espeak ends with about 300 ms of silence; with 100 ms more the pause stays under the
    # 500 ms of silence that end a turn
    pause = np.zeros(int(0.1 * 24000), np.float32)
    speech = np.concatenate([utterance(), pause, utterance()])
    async with vc.connect(scripted.url, session={"voicepipe": {"latency_events": True}}) as rt:
        result = await rt.talk(speech, sample_rate=24000, realtime=4.0)
        assert result.response_status == "completed"
        assert len(result.reply_audio) == 2 * 2400
        marks = result.timings["marks"]
        assert marks["llm_first_token"] < marks["tts_first_audio"] < marks["endpoint"]
        assert marks["endpoint"] <= marks["first_byte_sent"]
        (conv,) = scripted.llm.open_conversations
        assert [role for role, _ in conv.messages] == ["system", "user", "assistant"]
    metrics = scripted.app.metrics.speculative_replies
    assert metrics.labels("adopted")._value.get() == 1
    assert metrics.labels("dropped")._value.get() >= 1


@pytest.mark.server_config(speculative_reply=False)
async def test_without_speculative_replies_the_reply_starts_at_the_endpoint(
        scripted: Running) -> None:
    async with vc.connect(scripted.url, session={"voicepipe": {"latency_events": True}}) as rt:
        result = await rt.talk(utterance(), sample_rate=24000, realtime=4.0)
        marks = result.timings["marks"]
        assert marks["endpoint"] <= marks["llm_first_token"] <= marks["first_byte_sent"]
