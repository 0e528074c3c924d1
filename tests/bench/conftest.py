"""An in-process voicepipe server with the real VAD and scripted ASR/LLM/TTS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from voicepipe.server.app import App, bound_port

from voicepipe.config import ServerConfig
from voicepipe.stages.base import Stages
from voicepipe.stages.scripted import ScriptedASR, ScriptedLLM, ScriptedTTS


@pytest.fixture
async def scripted_url() -> AsyncIterator[str]:
    from voicepipe.stages.silero_vad import SileroVAD

    app = App(ServerConfig(port=0))
    app.stages = Stages(vad=SileroVAD(), asr=ScriptedASR(), llm=ScriptedLLM(token_delay=0.02),
                        tts=ScriptedTTS(), info={"stages": "scripted"})
    app.status = "ready"
    server = await app.start()
    try:
        yield f"ws://127.0.0.1:{bound_port(server)}/v1/realtime"
    finally:
        server.close()
        await server.wait_closed()
        app.close()
