"""The four things a user does, each measured as one turn record.

- `ask`: say a question, wait for the reply, listen to it (single turns and conversations).
- `interrupt`: ask, then talk over the reply after a random delay; the record says how long the
  server kept sending audio after the interruption began and whether the kept reply was cut.
- `stay_quiet`: send only silence or noise; any reply is a false start.

A `Call` is one open Realtime session with its microphone and listener. Turn records are plain
dicts (they go to JSON as they are); times in them are milliseconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import voicepipe_client as vc

from .listener import Listener, Reply
from .microphone import Microphone, Spoken
from .playback import played_at
from .speech import Utterance

LATENCY_SESSION = {"voicepipe": {"latency_events": True}}


@dataclass
class Call:
    rt: Any
    mic: Microphone
    listener: Listener

    async def close(self) -> None:
        await self.mic.stop()
        await self.listener.close()
        await self.rt.close()


async def open_call(url: str, api_key: str | None, speed: float = 1.0,
                    open_timeout: float = 30.0) -> Call:
    """Connect, ask for voicepipe's latency events (a server that refuses them is fine)."""
    rt = await vc.connect(url, api_key, open_timeout=open_timeout)
    try:
        await rt.update_session(LATENCY_SESSION, timeout=open_timeout)
    except (vc.RealtimeError, TimeoutError):
        pass
    rt.drain()
    mic = Microphone(rt, speed=speed)
    mic.start()
    return Call(rt, mic, Listener(rt))


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((a - b) * 1000.0, 3)


def reply_record(reply: Reply | None, spoken: Spoken) -> dict[str, Any]:
    """The figures of one reply to one utterance."""
    if reply is None:
        return {"status": None, "client_voice_to_voice_ms": None}
    pb = reply.playback()
    lat = reply.latency or {}
    return {
        "response_id": reply.id,
        "status": reply.status,
        "client_voice_to_voice_ms": _ms(reply.first_audio_at, spoken.last_loud_at),
        "reply_audio_ms": round(pb.audio_s * 1000.0, 3),
        "underruns": pb.underruns,
        "gap_ms": round(pb.gap_s * 1000.0, 3),
        "max_gap_ms": round(pb.max_gap_s * 1000.0, 3),
        "reply_text": reply.transcript if reply.transcript is not None else reply.text,
        "server_marks": lat.get("marks", {}),
        "server_ms": lat.get("derived_ms", {}),
        "llm": lat.get("llm", {}),
    }


async def _reply_to(call: Call, spoken: Spoken, timeout: float, linger: float) -> Reply:
    """The last reply created after the utterance began, once it is done (and its latency
    event, if the server sends them, has arrived or `linger` has passed)."""
    start = spoken.first_loud_at or spoken.ended_at or 0.0

    def done() -> Reply | None:
        rs = call.listener.replies_after(start)
        return rs[-1] if rs and rs[-1].status is not None else None

    reply: Reply = await call.listener.wait(done, timeout)
    if reply.latency is None and reply.chunks:
        try:
            await call.listener.wait(lambda: reply.latency, linger)
        except TimeoutError:
            pass
    return reply


async def _listen(reply: Reply) -> None:
    """Wait until the reply has been played out, as a person would before speaking again."""
    end = reply.playback().ends_at
    if end is not None:
        await asyncio.sleep(max(0.0, end - time.perf_counter()))


async def ask(call: Call, utt: Utterance, *, timeout: float = 120.0,
              linger: float = 1.0) -> dict[str, Any]:
    spoken = await call.mic.say(utt)
    reply = await _reply_to(call, spoken, timeout, linger)
    await _listen(reply)
    return {"kind": "ask", "utterance": utt.name, **reply_record(reply, spoken)}


async def interrupt(call: Call, utt: Utterance, interruption: Utterance, *,
                    rng: random.Random, delay_s: tuple[float, float] = (0.3, 1.2),
                    timeout: float = 120.0, linger: float = 1.0) -> dict[str, Any]:
    """Ask, then talk over the reply `delay_s` (uniform) after its first audio arrived."""
    spoken = await call.mic.say(utt)
    start = spoken.first_loud_at or 0.0

    def first_audio() -> Reply | None:
        return next((r for r in call.listener.replies_after(start) if r.chunks), None)

    reply: Reply = await call.listener.wait(first_audio, timeout)
    delay = rng.uniform(*delay_s)
    await asyncio.sleep(max(0.0, reply.chunks[0][0] + delay - time.perf_counter()))
    heard = len(call.listener.speech_started)
    talking = asyncio.ensure_future(call.mic.say(interruption))
    # A client that plays audio tells the server how much it played once the server hears the
    # user (`conversation.item.truncate`), so the server can cut the reply it keeps.
    try:
        await call.listener.wait(lambda: len(call.listener.speech_started) > heard, timeout)
        if reply.item_id is not None:
            ms = int(played_at(reply.chunks, time.perf_counter()) * 1000)
            await call.rt.truncate(reply.item_id, ms)
        await call.listener.wait(lambda: reply.status is not None, timeout)
    finally:
        said = await talking
    record = {"kind": "interrupt", "utterance": utt.name,
              **reply_record(reply, spoken)}
    played_ms = reply.playback().audio_s * 1000.0
    record["interrupted_after_ms"] = round(delay * 1000.0, 3)
    # 0 when the server had sent the whole reply before the user began to talk over it
    stop = _ms(reply.last_audio_at, said.first_loud_at)
    record["barge_in_stop_ms"] = None if stop is None else max(0.0, stop)
    record["barge_in_cut"] = bool(
        reply.status in ("cancelled", "incomplete")
        or (reply.truncated_ms is not None and reply.truncated_ms < played_ms - 1))
    record["kept_audio_ms"] = reply.truncated_ms
    follow_up = await _reply_to(call, said, timeout, linger)  # the answer to the interruption
    await _listen(follow_up)
    return record


async def stay_quiet(call: Call, utt: Utterance, *, wait_s: float = 2.0) -> dict[str, Any]:
    """Send silence or noise; the server must not answer within `wait_s` after it ended."""
    spoken = await call.mic.say(utt)
    assert spoken.ended_at is not None
    began = spoken.ended_at - utt.seconds
    await asyncio.sleep(wait_s)
    replies = call.listener.replies_after(began)
    return {"kind": "quiet", "utterance": utt.name, "status": None,
            "false_reply": bool(replies),
            "false_speech_started": sum(t >= began for t in call.listener.speech_started)}
