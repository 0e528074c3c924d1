"""Everything the server says on one session, sorted into replies as it arrives.

One task reads the connection; each event carries its arrival time (`perf_counter()`, stamped by
the client SDK when the message came off the socket). Scenario code waits for conditions on the
replies ("the reply created after this utterance is done") instead of reading events itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .playback import Playback, play

BYTES_PER_SAMPLE = {"pcm16": 2, "g711_ulaw": 1, "g711_alaw": 1}


@dataclass
class Reply:
    id: str
    created_at: float
    item_id: str | None = None
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (arrival, seconds)
    text: str = ""  # transcript deltas received
    transcript: str | None = None  # the final transcript the server keeps
    status: str | None = None
    reason: str | None = None
    done_at: float | None = None
    truncated_ms: int | None = None  # audio_end_ms of a conversation.item.truncated
    latency: dict[str, Any] | None = None  # voicepipe.latency, when the server sends it

    @property
    def first_audio_at(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    @property
    def last_audio_at(self) -> float | None:
        return self.chunks[-1][0] if self.chunks else None

    def playback(self) -> Playback:
        return play(self.chunks)


class Listener:
    def __init__(self, rt: Any) -> None:
        self.rt = rt
        encoding, self.out_rate = rt.output_format
        self.width = BYTES_PER_SAMPLE.get(encoding, 2)
        self.replies: list[Reply] = []
        self.speech_started: list[float] = []
        self.errors: list[dict[str, Any]] = []
        self.closed = False
        self._by_id: dict[str, Reply] = {}
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def wait(self, pred: Callable[[], Any], timeout: float) -> Any:
        """Wait until `pred()` is truthy and return it; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while not (value := pred()):
                if self.closed:
                    raise ConnectionError("the server closed the connection")
                self._changed.clear()
                await self._changed.wait()
        return value

    def replies_after(self, t: float) -> list[Reply]:
        return [r for r in self.replies if r.created_at >= t]

    async def _run(self) -> None:
        try:
            while True:
                self._take(await self.rt.recv())
                self._changed.set()
        except ConnectionError:
            self.closed = True
            self._changed.set()

    def _reply(self, rid: str | None, at: float) -> Reply | None:
        if rid is None:
            return None
        if rid not in self._by_id:  # some servers send deltas before response.created
            self._by_id[rid] = Reply(rid, at)
            self.replies.append(self._by_id[rid])
        return self._by_id[rid]

    def _take(self, ev: Any) -> None:
        kind, at, data = ev.type, ev.received_at, ev.data
        if kind == "response.output_audio.delta" and ev.audio:
            r = self._reply(ev.response_id, at) if ev.response_id else (
                self.replies[-1] if self.replies else None)
            if r is not None:
                width = 2 if ev.binary else self.width
                r.chunks.append((at, len(ev.audio) / width / self.out_rate))
                r.item_id = r.item_id or ev.item_id
        elif kind == "response.created":
            self._reply(ev.response_id, at)
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            r = self._reply(ev.response_id, at)
            if r is not None:
                r.text += ev.delta or ""
        elif kind in ("response.output_audio_transcript.done", "response.output_text.done"):
            r = self._reply(ev.response_id, at)
            if r is not None:
                r.transcript = data.get("transcript", data.get("text"))
        elif kind == "response.done":
            r = self._reply(ev.response_id, at)
            if r is not None:
                resp = data.get("response") or {}
                r.status = resp.get("status")
                r.reason = (resp.get("status_details") or {}).get("reason")
                r.done_at = at
        elif kind == "conversation.item.truncated":
            for r in self.replies:
                if r.item_id == data.get("item_id"):
                    r.truncated_ms = data.get("audio_end_ms")
        elif kind == "voicepipe.latency":
            r = self._reply(data.get("response_id"), at)
            if r is not None:
                r.latency = data
        elif kind == "input_audio_buffer.speech_started":
            self.speech_started.append(at)
        elif kind == "error":
            self.errors.append(ev.error or {})
