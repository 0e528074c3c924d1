"""Servers for the tests: in-process with scripted stages, or the real `voicepipe serve`."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from voicepipe.server.app import App, bound_port

from voicepipe.config import ServerConfig
from voicepipe.stages.base import Stages
from voicepipe.stages.scripted import ScriptedASR, ScriptedLLM, ScriptedTTS


@functools.cache
def silero():  # type: ignore[no-untyped-def]
    from voicepipe.stages.silero_vad import SileroVAD

    return SileroVAD()


@dataclasses.dataclass
class Running:
    app: App
    url: str
    http: str
    llm: ScriptedLLM

    async def wait_sessions(self, n: int, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(self.app.sessions) != n:
            if loop.time() > end:
                raise AssertionError(f"{len(self.app.sessions)} sessions open, expected {n}")
            await asyncio.sleep(0.02)


async def start_scripted(**config: Any) -> tuple[Running, Any]:
    llm = ScriptedLLM(token_delay=config.pop("token_delay", 0.0))
    app = App(ServerConfig(port=0, **config))
    app.stages = Stages(vad=silero(), asr=ScriptedASR(), llm=llm, tts=ScriptedTTS(),
                        info={"stages": "scripted"})
    app.status = "ready"
    server = await app.start()
    port = bound_port(server)
    return Running(app, f"ws://127.0.0.1:{port}/v1/realtime", f"http://127.0.0.1:{port}",
                   llm), server


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    marker = request.node.get_closest_marker("server_config")
    running, server = await start_scripted(**(marker.kwargs if marker else {}))
    try:
        yield running
    finally:
        server.close()
        await server.wait_closed()
        running.app.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "server_config(**kw): ServerConfig of the scripted server")
