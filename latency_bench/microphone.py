"""A microphone for one Realtime session: 20 ms frames at real-time pace, silence in between.

Like a real microphone it never stops: between utterances it sends silence, so the server's
turn detection and barge-in see the same stream they would see from a person. Frames are sent
on an absolute schedule (frame k at start + k * 20 ms); a late event loop catches up instead of
drifting. `say()` returns when the utterance's last frame has left, with the times its first and
last loud frames were sent (`time.perf_counter()`, the clock the client stamps events with).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from voicepipe_client.audio import resample, to_wire

from .speech import Utterance

SPEECH_DBFS = -45.0  # a frame at least this loud (RMS) counts as speech


@dataclass
class Spoken:
    """When an utterance went out. None for an utterance without a loud frame."""

    first_loud_at: float | None = None
    last_loud_at: float | None = None
    ended_at: float | None = None
    frames_sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Microphone:
    def __init__(self, rt: Any, frame_ms: int = 20, speed: float = 1.0) -> None:
        self.rt = rt
        self.encoding, self.rate = rt.input_format
        self.frame = self.rate * frame_ms // 1000
        self.period = frame_ms / 1000.0 / speed
        self.binary = bool((rt.session.get("voicepipe") or {}).get("binary_audio"))
        self._queue: deque[tuple[np.ndarray, np.ndarray, Spoken]] = deque()
        self._silence = to_wire(np.zeros(self.frame), self.encoding)
        self._task: asyncio.Task[None] | None = None
        self.frames_sent = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def say(self, utt: Utterance) -> Spoken:
        """Queue `utt` after whatever is being said and wait until it has been sent."""
        x = resample(utt.audio, utt.rate, self.rate) if utt.rate != self.rate else utt.audio
        n = -(-len(x) // self.frame) * self.frame
        padded = np.zeros(n, np.float32)
        padded[: len(x)] = x
        frames = padded.reshape(-1, self.frame)
        threshold = 10 ** (SPEECH_DBFS / 20)
        loud = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) >= threshold
        spoken = Spoken()
        self._queue.append((frames, loud, spoken))
        if self._task is None:
            self.start()
        await spoken.done.wait()
        return spoken

    async def _run(self) -> None:
        start = time.perf_counter()
        k = 0
        while True:
            delay = start + k * self.period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._queue:
                frames, loud, spoken = self._queue[0]
                i = spoken.frames_sent
                await self._send(to_wire(frames[i], self.encoding))
                now = time.perf_counter()
                if loud[i]:
                    if spoken.first_loud_at is None:
                        spoken.first_loud_at = now
                    spoken.last_loud_at = now
                spoken.frames_sent = i + 1
                if i + 1 == len(frames):
                    self._queue.popleft()
                    spoken.ended_at = now
                    spoken.done.set()
            else:
                await self._send(self._silence)
            k += 1
            self.frames_sent = k

    async def _send(self, chunk: bytes) -> None:
        if self.binary:
            await self.rt.ws.send(chunk)
            return
        await self.rt.ws.send(json.dumps({
            "type": "input_audio_buffer.append", "event_id": "event_" + secrets.token_hex(8),
            "audio": base64.b64encode(chunk).decode("ascii")}))
