"""A scripted Realtime server with known delays, to test the benchmark's measurements.

It answers every utterance (a run of loud frames) `v2v_s` after the last loud frame arrived,
with reply audio chunks sent at fixed offsets, and records when it actually did so
(`time.perf_counter()`, the clock the bench uses too, since both run in the test's process).
Loud frames during a reply are a barge-in: audio stops `stop_s` later and the reply ends
cancelled. Frames at or below `threshold` RMS are silence and never get a reply.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve

RATE = 24000


@dataclass
class Script:
    v2v_s: float = 0.3
    chunks: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.1)])
    stop_s: float = 0.2  # barge-in: audio stops this long after the interruption began
    threshold: float = 0.01  # RMS of a loud frame
    marks: dict[str, float] = field(default_factory=lambda: {"speech_end": 0.0,
                                                             "endpoint": 0.2})


@dataclass
class Truth:
    """What the server did, per reply."""

    last_loud_at: float  # arrival of the last loud frame before the reply
    sent: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds)
    interrupted_at: float | None = None  # arrival of the first loud frame over the reply
    cancelled: bool = False


class FakeRealtime:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.truths: list[Truth] = []
        self.url = ""
        self._server: Any = None

    async def __aenter__(self) -> FakeRealtime:
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None)
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/realtime"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        await Session(self, ws).run()


class Session:
    def __init__(self, fake: FakeRealtime, ws: ServerConnection) -> None:
        self.fake, self.ws, self.s = fake, ws, fake.script
        self.timer: asyncio.TimerHandle | None = None
        self.reply: asyncio.Task[None] | None = None
        self.truth: Truth | None = None
        self.n = 0

    async def send(self, **ev: Any) -> None:
        await self.ws.send(json.dumps(ev))

    async def run(self) -> None:
        session = {"id": "sess_fake", "audio": {"input": {"format": {"type": "audio/pcm",
                                                                        "rate": RATE}},
                                                 "output": {"format": {"type": "audio/pcm",
                                                                       "rate": RATE}}}}
        await self.send(type="session.created", session=session)
        async for msg in self.ws:
            now = time.perf_counter()
            ev = json.loads(msg)
            if ev["type"] == "session.update":
                await self.send(type="session.updated", session={**session, **ev["session"]})
            elif ev["type"] == "input_audio_buffer.append":
                pcm = np.frombuffer(base64.b64decode(ev["audio"]), np.int16) / 32768.0
                if np.sqrt(np.mean(pcm ** 2)) > self.s.threshold:
                    self.loud(now)
            elif ev["type"] == "conversation.item.truncate":
                await self.send(type="conversation.item.truncated", item_id=ev["item_id"],
                                content_index=0, audio_end_ms=ev["audio_end_ms"])
        if self.reply is not None:
            self.reply.cancel()

    def loud(self, now: float) -> None:
        loop = asyncio.get_running_loop()
        if self.reply is not None and not self.reply.done():
            t = self.truth
            if t is not None and t.interrupted_at is None:
                t.interrupted_at = now
                loop.create_task(self.send(type="input_audio_buffer.speech_started",
                                           audio_start_ms=0, item_id="item_user"))
            return
        if self.timer is not None:
            self.timer.cancel()
        # fire v2v_s after this frame's arrival, unless another loud frame comes first
        self.timer = loop.call_at(loop.time() + self.s.v2v_s - (time.perf_counter() - now),
                                  self.start_reply, now)

    def start_reply(self, last_loud_at: float) -> None:
        self.truth = Truth(last_loud_at)
        self.fake.truths.append(self.truth)
        self.reply = asyncio.get_running_loop().create_task(self.speak(self.truth))

    async def speak(self, t: Truth) -> None:
        self.n += 1
        rid, item = f"resp_{self.n}", f"item_{self.n}"
        start = time.perf_counter()
        await self.send(type="response.created", response={"id": rid, "status": "in_progress"})
        for offset, seconds in self.s.chunks:
            due = start + offset
            if t.interrupted_at is not None:
                due = min(due, t.interrupted_at + self.s.stop_s)
                if time.perf_counter() >= t.interrupted_at + self.s.stop_s:
                    break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if t.interrupted_at is not None and time.perf_counter() >= (
                    t.interrupted_at + self.s.stop_s):
                break
            audio = np.full(int(seconds * RATE), 1000, np.int16).tobytes()
            await self.send(type="response.output_audio.delta", response_id=rid, item_id=item,
                            delta=base64.b64encode(audio).decode())
            t.sent.append((time.perf_counter(), seconds))
            await self.send(type="response.output_audio_transcript.delta", response_id=rid,
                            item_id=item, delta="word ")
        t.cancelled = t.interrupted_at is not None
        status = "cancelled" if t.cancelled else "completed"
        await self.send(type="response.output_audio_transcript.done", response_id=rid,
                        item_id=item, transcript="word " * (len(t.sent) - t.cancelled))
        await self.send(type="response.done", response={
            "id": rid, "status": status,
            "status_details": {"reason": "turn_detected"} if t.cancelled else None})
        base = 1000.0
        marks = {k: base + v for k, v in self.s.marks.items()}
        await self.send(type="voicepipe.latency", response_id=rid, marks=marks,
                        derived_ms={"endpoint_delay": 1000 * (marks["endpoint"]
                                                               - marks["speech_end"])},
                        llm={"prefill_tokens": 7, "cached_tokens": 70})
