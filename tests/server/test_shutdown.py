"""Graceful shutdown: replies in flight finish, sessions close with 1001, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from typing import Any as Running

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

TEXT_ITEM = json.dumps({"type": "conversation.item.create", "item": {
    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}})


@pytest.mark.server_config(token_delay=0.05)
async def test_reply_in_flight_finishes_then_sessions_close_with_1001(scripted: Running) -> None:
    async with connect(scripted.url) as ws, connect(scripted.url) as idle:
        await ws.send(TEXT_ITEM)
        await ws.send(json.dumps({"type": "response.create"}))
        async with asyncio.timeout(5):
            while json.loads(await ws.recv())["type"] != "response.output_audio.delta":
                pass
        shutdown = asyncio.create_task(scripted.app.shutdown(grace_s=10))
        await asyncio.sleep(0.05)
        with pytest.raises(InvalidStatus) as refused:  # no new sessions while draining
            async with connect(scripted.url):
                pass
        assert refused.value.response.status_code == 503
        types = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    msg = await ws.recv()
                    types.append(json.loads(msg)["type"] if isinstance(msg, str) else "binary")
        assert "response.done" in types  # the reply ended before the close
        assert ws.close_code == 1001 and idle.close_code in (None, 1001)
        await shutdown
        assert idle.close_code == 1001


def test_sigterm_exits_zero() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "voicepipe.server.cli", "serve", "--stages", "scripted",
         "--port", "0", "--shutdown-grace-s", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    url = None
    for line in proc.stdout:
        if m := re.search(r"ready: open (http://\S+)", line):
            url = m.group(1).replace("http", "ws", 1) + "v1/realtime"
            break
    assert url, "server did not start"

    async def session_then_term() -> int | None:
        async with connect(url) as ws:
            await ws.recv()  # session.created
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            return ws.close_code

    assert asyncio.run(session_then_term()) == 1001
    assert proc.wait(20) == 0
