"""voicepipe-client: a small Python client for OpenAI-Realtime-compatible voice servers.

Speak a WAV file to a voicepipe server and get the reply, with latency::

    import asyncio
    import voicepipe_client

    async def main() -> None:
        async with voicepipe_client.connect(
            "ws://localhost:8000/v1/realtime", session={"voicepipe": {"latency_events": True}}
        ) as rt:
            turn = await rt.talk("question.wav")
            print(turn.user_transcript, "->", turn.reply_text)
            print(f"voice to voice: {turn.client_voice_to_voice * 1000:.0f} ms", turn.timings)
            voicepipe_client.save_wav("reply.wav", turn.reply_audio, turn.sample_rate)

    asyncio.run(main())

Lower level: `await rt.send_audio(...)`, `rt.commit()`, `rt.create_response()`,
`rt.update_session(...)`, `rt.send_event({...})`, and `async for ev in rt.events(): ...`.
Depends only on websockets and numpy.
"""

from .audio import load_wav, resample, save_wav
from .realtime import Event, Realtime, RealtimeError, SendReport, TurnResult, connect

__version__ = "0.1.0"

__all__ = [
    "Event",
    "Realtime",
    "RealtimeError",
    "SendReport",
    "TurnResult",
    "connect",
    "load_wav",
    "resample",
    "save_wav",
]
