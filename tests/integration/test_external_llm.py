"""Spoken turns through voicepipe with the LLM on llama-cpp-python's server (real VAD, ASR, TTS).

Every request to the LLM passes through a recording proxy, so the tests see the prompts byte
for byte and whether a stream was cut by voicepipe.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import numpy as np
import pytest
import voicepipe_client as vc

from voicepipe.testing.speech import espeak_pcm

from .conftest import LlamaServer, RecordingProxy, Voicepipe

pytestmark = [pytest.mark.models, pytest.mark.slow]
INSTRUCTIONS = "You are a voice assistant. Answer in one short sentence."


@pytest.fixture(scope="module")
def server(proxy: RecordingProxy) -> Iterator[Voicepipe]:
    vp = Voicepipe("--llm-url", f"http://127.0.0.1:{proxy.port}/v1", "--threads", "1",
                   "--max-response-tokens", "40", "--llm-timeout-s", "15",
                   "--llm-retries", "1").wait_ready()
    try:
        yield vp
    finally:
        vp.stop()


def speech(text: str) -> np.ndarray:
    return espeak_pcm(text, 24000)


def messages(body: bytes) -> bytes:
    """The raw bytes of a request's messages array (the last field of the body)."""
    head, sep, tail = body.partition(b'"messages":')
    assert sep and tail.endswith(b"}"), body[:200]
    return tail[:-1]


async def until(rt: vc.Realtime, kind: str, timeout: float = 120.0) -> vc.Event:
    async with asyncio.timeout(timeout):
        while (ev := await rt.recv()).type != kind:
            pass
    return ev


async def listen(rt: vc.Realtime, result: vc.TurnResult) -> None:
    """Hear the reply out before speaking again (else it is a barge-in)."""
    await asyncio.sleep(len(result.reply_audio) / result.sample_rate + 0.2)


def test_spoken_turns_keep_the_prompt_byte_stable(server: Voicepipe,
                                                  proxy: RecordingProxy) -> None:
    async def run() -> tuple[vc.TurnResult, vc.TurnResult]:
        async with vc.connect(server.ws, session={"instructions": INSTRUCTIONS}) as rt:
            first = await rt.talk(speech("What is the capital of France?"),
                                  sample_rate=24000, timeout=120)
            await listen(rt, first)
            second = await rt.talk(speech("And what is the capital of Germany?"),
                                   sample_rate=24000, timeout=120)
            return first, second

    before = len(proxy.chat_requests())
    first, second = asyncio.run(run())
    assert "france" in (first.user_transcript or "").lower(), first.user_transcript
    assert "germany" in (second.user_transcript or "").lower(), second.user_transcript
    for turn in (first, second):
        assert turn.response_status == "completed", turn.events[-1].data
        assert turn.reply_text.strip() and len(turn.reply_audio) > 0
        assert turn.timings == {} or turn.timings["derived_ms"]["llm_ttft"] > 0
    one, two = proxy.chat_requests()[before:]
    m1, m2 = messages(one.body), messages(two.body)
    assert json.loads(m1)[0] == {"role": "system", "content": INSTRUCTIONS}
    # The second prompt is the first one plus the reply as streamed, byte for byte.
    reply = json.dumps({"role": "assistant", "content": first.reply_text},
                       ensure_ascii=False, separators=(",", ":")).encode()
    assert m2.startswith(m1[:-1] + b"," + reply + b","), (m1, m2)
    assert json.loads(m2)[-1]["content"] == second.user_transcript


def test_barge_in_cuts_the_stream_and_the_cut_reply_is_sent_next(
        server: Voicepipe, proxy: RecordingProxy) -> None:
    async def run() -> tuple[dict, str, vc.TurnResult]:  # type: ignore[type-arg]
        async with vc.connect(server.ws, session={"instructions": INSTRUCTIONS}) as rt:
            proxy.delay_s = 0.15  # a slow stream: the barge-in lands while it still runs
            try:
                await rt.send_audio(speech("Tell me a long story about a brave knight."),
                                    sample_rate=24000, trailing_silence_ms=900)
                interrupt = None
                async with asyncio.timeout(120):
                    while (ev := await rt.recv()).type != "response.done":
                        if ev.type == "response.output_audio.delta" and interrupt is None:
                            interrupt = asyncio.create_task(rt.send_audio(
                                speech("Wait, stop please."), sample_rate=24000,
                                trailing_silence_ms=1200))  # silence ends that turn too
                assert interrupt is not None
                await interrupt
            finally:
                proxy.delay_s = 0.0
            response = ev.data["response"]
            kept = response["output"][0]["content"][0]["transcript"]
            # the interruption itself is a user turn: its reply carries the cut one
            after = await until(rt, "response.done", 60)
            return response, kept, after

    before = len(proxy.chat_requests())
    response, kept, after = asyncio.run(run())
    assert response["status"] == "cancelled", response
    cut, nxt = proxy.chat_requests()[before:before + 2]
    assert cut.client_closed_first and not cut.completed  # voicepipe hung up mid-stream
    sent = json.loads(messages(nxt.body))
    assistant = [m for m in sent if m["role"] == "assistant"]
    assert assistant[-1]["content"] == kept, (assistant, kept)
    assert after.data["response"]["status"] in ("completed", "cancelled")


def test_llm_server_killed_mid_reply_then_back(server: Voicepipe, proxy: RecordingProxy,
                                               llama: LlamaServer) -> None:
    async def run() -> tuple[list[vc.Event], vc.TurnResult]:
        async with vc.connect(server.ws, session={"instructions": INSTRUCTIONS}) as rt:
            proxy.on_reply = llama.kill  # killed as its reply starts to stream
            await rt.send_audio(speech("Tell me about the moon."), sample_rate=24000,
                                trailing_silence_ms=900)
            events = []
            async with asyncio.timeout(120):
                while (ev := await rt.recv()).type != "response.done":
                    events.append(ev)
            events.append(ev)
            await asyncio.to_thread(llama.start)
            again = await rt.talk(speech("What is the capital of France?"),
                                  sample_rate=24000, timeout=120)
            return events, again

    events, again = asyncio.run(run())
    errors = [e for e in events if e.type == "error"]
    assert errors and errors[0].data["error"]["code"] == "stage_failed", errors
    assert "llm" in errors[0].data["error"]["message"]
    assert events[-1].data["response"]["status"] == "failed"
    assert again.response_status == "completed" and again.reply_text.strip()
    assert "france" in (again.user_transcript or "").lower()
