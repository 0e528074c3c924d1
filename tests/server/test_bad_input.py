"""Bad input gets a clear error event, and neither the server nor other sessions notice."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from typing import Any as Running

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voicepipe.testing.server import recv_type


async def still_works(ws) -> None:  # type: ignore[no-untyped-def]
    await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Hi."}}))
    ev = await recv_type(ws, "session.updated")
    assert ev["session"]["instructions"] == "Hi."


@pytest.mark.parametrize("message, code", [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    (json.dumps({"type": "no.such.event", "event_id": "e1"}), "unknown_event"),
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "e1", "audio": 5}),
     "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "e1", "audio": "@@@"}),
     "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "e1",
                 "audio": base64.b64encode(b"\x01\x02\x03").decode()}), "invalid_audio"),
    (json.dumps({"type": "conversation.item.truncate", "event_id": "e1", "item_id": "x",
                 "content_index": 0, "audio_end_ms": -5}), "invalid_value"),
    (json.dumps({"type": "session.update", "event_id": "e1",
                 "session": {"audio": {"input": {"format": {"type": "audio/flac"}}}}}),
     "invalid_value"),
])
async def test_bad_event_gets_error_and_session_goes_on(scripted: Running, message: str,
                                                        code: str) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        await ws.send(message)
        err = await recv_type(ws, "error")
        assert err["error"]["code"] == code, err
        assert err["error"]["message"]
        if '"event_id": "e1"' in message:
            assert err["error"]["event_id"] == "e1"
        await still_works(ws)


async def test_binary_frames_rejected_unless_enabled(scripted: Running) -> None:
    async with connect(scripted.url) as ws:
        await recv_type(ws, "session.created")
        await ws.send(b"\0\0" * 480)
        err = await recv_type(ws, "error")
        assert "binary" in err["error"]["message"]
        await ws.send(json.dumps({"type": "session.update",
                                  "session": {"voicepipe": {"binary_audio": True}}}))
        await recv_type(ws, "session.updated")
        await ws.send(b"\0\0\1")  # odd length: not PCM16
        err = await recv_type(ws, "error")
        assert err["error"]["code"] == "invalid_audio"
        await still_works(ws)


@pytest.mark.server_config(max_message_bytes=4096)
async def test_oversized_message_is_refused_and_huge_one_closes_only_that_session(
        scripted: Running) -> None:
    async with connect(scripted.url) as other, connect(scripted.url, max_size=None) as ws:
        await recv_type(other, "session.created")
        await recv_type(ws, "session.created")
        big = json.dumps({"type": "input_audio_buffer.append",
                          "audio": base64.b64encode(b"\0" * 6000).decode()})
        await ws.send(big)
        err = await recv_type(ws, "error")
        assert err["error"]["code"] == "message_too_large"
        await still_works(ws)
        await ws.send("x" * (4 * 4096 + 10000))  # beyond the hard cap: the socket closes
        with pytest.raises(ConnectionClosed) as closed:
            await recv_type(ws, "never")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await still_works(other)
    await scripted.wait_sessions(0)


@pytest.mark.server_config(token_delay=0.05)
async def test_disconnect_mid_reply_frees_the_session(scripted: Running) -> None:
    async with connect(scripted.url) as other:
        await recv_type(other, "session.created")
        ws = await connect(scripted.url)
        await recv_type(ws, "session.created")
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_type(ws, "response.output_audio.delta")
        await ws.close()
        await scripted.wait_sessions(1)
        for _ in range(100):
            if len(scripted.llm.open_conversations) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(scripted.llm.open_conversations) == 1  # the other session's
        await still_works(other)


async def test_healthz_reports_ready_and_models(scripted: Running) -> None:
    body = await asyncio.to_thread(
        lambda: json.loads(urllib.request.urlopen(scripted.http + "/healthz").read()))
    assert body["status"] == "ready"
    assert body["models"] == {"stages": "scripted"}


async def test_not_ready_refuses_sessions_with_503(scripted: Running) -> None:
    scripted.app.stages, scripted.app.status = None, "loading"
    with pytest.raises(InvalidStatus) as exc:
        async with connect(scripted.url):
            pass
    assert exc.value.response.status_code == 503

    def get() -> int:
        try:
            return urllib.request.urlopen(scripted.http + "/healthz").status
        except urllib.error.HTTPError as err:
            return err.code

    assert await asyncio.to_thread(get) == 503


@pytest.mark.server_config(api_keys=("sekrit",))
async def test_api_key_from_header_or_subprotocol(scripted: Running) -> None:
    with pytest.raises(InvalidStatus) as exc:
        async with connect(scripted.url):
            pass
    assert exc.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        async with connect(scripted.url, additional_headers={"Authorization": "Bearer nope"}):
            pass
    async with connect(scripted.url, additional_headers={"Authorization": "Bearer sekrit"}) as ws:
        await recv_type(ws, "session.created")
    async with connect(scripted.url, subprotocols=["realtime",
                                                   "openai-insecure-api-key.sekrit"]) as ws:
        assert ws.subprotocol == "realtime"
        await recv_type(ws, "session.created")
