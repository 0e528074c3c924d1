"""Limits, backpressure, stage faults, disconnects and auth: one session's trouble stays its own."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.request
from typing import Any as Running

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voicepipe.stages.scripted import ScriptedTTS
from voicepipe.testing.server import recv_type

TEXT_ITEM = json.dumps({"type": "conversation.item.create", "item": {
    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}})
RESPOND = json.dumps({"type": "response.create"})


async def one_reply(ws) -> dict:  # type: ignore[no-untyped-def]
    await ws.send(TEXT_ITEM)
    await ws.send(RESPOND)
    return (await recv_type(ws, "response.done"))["response"]


def healthz(http: str) -> dict:
    try:
        return json.loads(urllib.request.urlopen(http + "/healthz").read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


@pytest.mark.server_config(allowed_origins=("https://good.example",))
async def test_origin_allow_list(scripted: Running) -> None:
    with pytest.raises(InvalidStatus) as exc:
        async with connect(scripted.url, origin="https://evil.example"):
            pass
    assert exc.value.response.status_code == 403
    async with connect(scripted.url, origin="https://good.example") as ws:
        await recv_type(ws, "session.created")
    async with connect(scripted.url) as ws:  # no Origin: not a browser
        await recv_type(ws, "session.created")


@pytest.mark.server_config(api_keys=("k1", "k2"), max_sessions_per_key=1)
async def test_sessions_per_key(scripted: Running) -> None:
    h1 = {"Authorization": "Bearer k1"}
    async with connect(scripted.url, additional_headers=h1) as ws:
        await recv_type(ws, "session.created")
        with pytest.raises(InvalidStatus) as exc:
            async with connect(scripted.url, additional_headers=h1):
                pass
        assert exc.value.response.status_code == 429
        async with connect(scripted.url, additional_headers={"Authorization": "Bearer k2"}):
            pass


@pytest.mark.server_config(max_sessions=2)
async def test_server_wide_session_limit(scripted: Running) -> None:
    async with connect(scripted.url), connect(scripted.url):
        with pytest.raises(InvalidStatus) as exc:
            async with connect(scripted.url):
                pass
        assert exc.value.response.status_code == 503


@pytest.mark.server_config(max_events_per_s=20)
async def test_event_rate_limit(scripted: Running) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        for _ in range(100):
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        err = await recv_type(ws, "error")
        assert err["error"]["code"] == "rate_limit_exceeded"
        await asyncio.sleep(1.0)  # the bucket refills
        assert (await one_reply(ws))["status"] == "completed"


@pytest.mark.server_config(max_conversation_items=4)
async def test_conversation_length_is_bounded_and_llm_follows(scripted: Running) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        for _ in range(3):
            await one_reply(ws)  # 6 items: 2 per turn
        conv = next(iter(scripted.llm.open_conversations))
        assert len(conv.messages) == 1 + 4  # system prompt + the 4 newest
        assert conv.messages[0][0] == "system"


@pytest.mark.server_config(idle_timeout_s=0.5)
async def test_idle_sessions_are_closed(scripted: Running) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        err = await recv_type(ws, "error", timeout=5)
        assert err["error"]["code"] == "session_idle_timeout"
        with pytest.raises(ConnectionClosed):
            await recv_type(ws, "never")
        assert ws.close_code == 1000
    await scripted.wait_sessions(0)


@pytest.mark.server_config(max_send_buffer_bytes=256 * 1024, max_response_tokens=2000)
async def test_client_that_stops_reading_is_closed_without_delaying_others(
        scripted: Running) -> None:
    # 256 KB of base64 per phrase, 500 phrases: far beyond what the kernel's socket buffers
    # absorb, so the server's own bound must act (uncompressed: deflate would shrink the
    # scripted tone's frames to a few hundred bytes each)
    scripted.app.stages.tts = ScriptedTTS(seconds=4.0)
    scripted.llm.reply = " ".join(["A sentence of speech."] * 500)
    async with connect(scripted.url) as other:
        await recv_type(other, "session.created")
        slow = await connect(scripted.url, max_queue=1,  # reads nothing after the first frames
                             compression=None)
        await slow.send(TEXT_ITEM)
        await slow.send(RESPOND)
        await scripted.wait_sessions(1, timeout=30)  # the server gave up on it
        scripted.llm.reply = "Short."
        scripted.app.stages.tts = ScriptedTTS()
        assert (await one_reply(other))["status"] == "completed"
        await slow.close()


async def test_messages_go_straight_to_the_socket_when_nothing_waits(
        scripted: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the writer task idle and nothing queued before it, a message is written where it
    is made rather than after a wake-up of the writer: here the writer never runs at all, and
    a whole reply still arrives, in order. (When the transport is paused, messages queue for
    the writer: the test above depends on that.)"""
    from voicepipe.server.connection import Connection

    async def no_writer(self: Connection) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(Connection, "_writer", no_writer)
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        await ws.send(TEXT_ITEM)
        await ws.send(RESPOND)
        types: list[str] = []
        while not types or types[-1] != "response.done":
            types.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
    first_audio = types.index("response.output_audio.delta")
    assert types.index("response.created") < first_audio < types.index("response.done")


async def test_a_full_server_streams_every_reply_at_once(scripted: Running,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies hold a thread while they stream; none may wait for another to finish."""
    from voicepipe.stages.scripted import ScriptedConversation

    n = scripted.app.config.max_sessions
    together = threading.Barrier(n, timeout=20)
    generate = ScriptedConversation.generate

    def all_at_once(self, params, cancel):  # type: ignore[no-untyped-def]
        together.wait()  # passes only when every session's reply is streaming
        yield from generate(self, params, cancel)

    monkeypatch.setattr(ScriptedConversation, "generate", all_at_once)

    async def one() -> str:
        async with connect(scripted.url) as ws:
            await recv_type(ws, "session.created")
            return (await one_reply(ws))["status"]

    statuses = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 40)
    assert statuses == ["completed"] * n


async def test_llm_fault_fails_the_response_and_the_next_turn_works(scripted: Running) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        scripted.llm.failures = [RuntimeError("boom")]
        await ws.send(TEXT_ITEM)
        await ws.send(RESPOND)
        err = await recv_type(ws, "error")
        assert err["error"]["code"] == "stage_failed" and "boom" in err["error"]["message"]
        done = await recv_type(ws, "response.done")
        assert done["response"]["status"] == "failed"
        assert (await one_reply(ws))["status"] == "completed"
    assert (await asyncio.to_thread(healthz, scripted.http))["status"] == "ready"


async def test_tts_fault_fails_the_response_and_the_next_turn_works(scripted: Running) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        scripted.app.stages.tts.failures = [RuntimeError("voice broke")]
        response = await one_reply(ws)
        assert response["status"] == "failed"
        assert "voice broke" in response["status_details"]["error"]["message"]
        assert (await one_reply(ws))["status"] == "completed"


async def test_asr_fault_reports_failed_transcription_and_the_next_turn_works(
        scripted: Running) -> None:
    import voicepipe_client as vc

    from voicepipe.testing.speech import espeak_pcm

    speech = espeak_pcm("What is the capital of France?", 24000)
    manual = {"audio": {"input": {"turn_detection": None}}}  # one final pass per commit
    async with vc.connect(scripted.url, session=manual) as rt:
        scripted.app.stages.asr.failures = [RuntimeError("deaf")]
        await rt.send_audio(speech, sample_rate=24000, realtime=False)
        await rt.commit()
        async with asyncio.timeout(10):
            while (ev := await rt.recv()).type != (
                    "conversation.item.input_audio_transcription.failed"):
                assert ev.type != "response.created"
        assert ev.data["error"]["message"] == "RuntimeError: deaf"
        result = await rt.talk(speech, sample_rate=24000, realtime=False)
        assert result.user_transcript == "Hello from the scripted transcriber."
        assert result.response_status == "completed"


async def test_out_of_memory_marks_health_degraded_once(scripted: Running,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        for _ in range(2):
            scripted.llm.failures = [MemoryError("out of memory")]
            assert (await one_reply(ws))["status"] == "failed"
    body = await asyncio.to_thread(healthz, scripted.http)
    assert body["status"] == "degraded" and "llm" in body["degraded"]
    assert sum("cannot recover" in r.message for r in caplog.records) == 1


@pytest.mark.server_config(token_delay=0.01)
async def test_disconnects_at_random_points_leak_nothing(scripted: Running) -> None:
    rng = random.Random(7)
    baseline = (await asyncio.to_thread(healthz, scripted.http))["process"]["tasks"]
    for _ in range(12):
        ws = await connect(scripted.url)
        await recv_type(ws, "session.created")
        await ws.send(TEXT_ITEM)
        await ws.send(RESPOND)
        await asyncio.sleep(rng.uniform(0, 0.15))
        if rng.random() < 0.5:
            await ws.close()
        else:
            ws.transport.abort()  # vanish without a close frame
    await scripted.wait_sessions(0, timeout=10)
    for _ in range(100):
        if not scripted.llm.open_conversations:
            break
        await asyncio.sleep(0.05)
    assert not scripted.llm.open_conversations
    await asyncio.sleep(0.2)
    tasks = (await asyncio.to_thread(healthz, scripted.http))["process"]["tasks"]
    assert tasks <= baseline
