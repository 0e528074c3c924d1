"""A Realtime API connection: send audio and client events, receive typed, timestamped events.

One background task reads the socket, stamps every message with `time.perf_counter()` the
moment it arrives, and queues it; `events()` and `talk()` consume that queue. Stamping on
arrival rather than on consumption keeps latency measurements honest while the caller is busy
sending audio.

Server event names are normalized to the GA names (`response.audio.delta` arrives as
`response.output_audio.delta`); the original name stays in `event.data["type"]`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from .audio import float_to_pcm16, from_wire, load_wav, resample, to_float, to_wire

__all__ = ["Event", "Realtime", "RealtimeError", "SendReport", "TurnResult", "connect"]

# Beta server event names -> GA names.
_GA_NAMES = {
    "conversation.item.created": "conversation.item.added",
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
}
AUDIO_DELTA = "response.output_audio.delta"
BINARY_AUDIO = "voicepipe.binary_audio"  # marker in Event.data for binary reply frames

_GA_ENCODINGS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}


def _event_id() -> str:
    return "event_" + secrets.token_hex(10)


@dataclass
class Event:
    """One server event. `type` is the GA name; `data` is the event as received."""

    type: str
    data: dict[str, Any]
    received_at: float  # time.perf_counter() when the message arrived
    audio: bytes | None = None  # decoded reply audio of an audio delta (base64 or binary)

    @property
    def binary(self) -> bool:
        """True for a voicepipe binary audio frame (raw PCM16 at the output rate)."""
        return bool(self.data.get(BINARY_AUDIO))

    @property
    def delta(self) -> str | None:
        return self.data.get("delta")

    @property
    def transcript(self) -> str | None:
        return self.data.get("transcript")

    @property
    def text(self) -> str | None:
        return self.data.get("text")

    @property
    def error(self) -> dict[str, Any] | None:
        return self.data.get("error")

    @property
    def response_id(self) -> str | None:
        rid = self.data.get("response_id")
        if rid is None and isinstance(self.data.get("response"), dict):
            rid = self.data["response"].get("id")
        return rid

    @property
    def item_id(self) -> str | None:
        iid = self.data.get("item_id")
        if iid is None and isinstance(self.data.get("item"), dict):
            iid = self.data["item"].get("id")
        return iid


class RealtimeError(Exception):
    """An `error` event from the server, raised by helpers that wait for a result."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        self.code: str | None = error.get("code")
        self.message: str = error.get("message", "")
        self.param: str | None = error.get("param")
        self.event_id: str | None = error.get("event_id")
        super().__init__(f"{self.code}: {self.message}" + (f" ({self.param})" if self.param else ""))


@dataclass
class SendReport:
    frames: int
    audio_seconds: float  # including trailing silence
    started_at: float  # perf_counter() before the first frame
    finished_at: float  # perf_counter() after the last frame
    last_speech_sent_at: float | None  # after the last frame above the speech threshold


@dataclass
class TurnResult:
    user_transcript: str | None
    reply_text: str
    reply_audio: np.ndarray  # int16 at sample_rate
    sample_rate: int
    response_status: str | None  # "completed", "cancelled", "incomplete", "failed"
    timings: dict[str, Any]  # {"marks", "derived_ms", "llm"} of voicepipe.latency, or {}
    client_voice_to_voice: float | None  # seconds: last speech frame sent -> first reply audio
    events: list[Event] = field(default_factory=list)
    response_id: str | None = None


def _wire_format(session: dict[str, Any], direction: str) -> tuple[str, int]:
    """(encoding, rate) of the session's input or output audio, GA or beta shape."""
    audio = session.get("audio")
    if isinstance(audio, dict):
        fmt = (audio.get(direction) or {}).get("format") or {}
        enc = _GA_ENCODINGS.get(fmt.get("type", "audio/pcm"), "pcm16")
        return enc, int(fmt.get("rate", 24000)) if enc == "pcm16" else 8000
    name = session.get(f"{direction}_audio_format", "pcm16")
    return (name, 24000) if name == "pcm16" else (name, 8000)


def _turn_detection(session: dict[str, Any]) -> dict[str, Any] | None:
    # A session object that does not mention turn detection gets the API default, server VAD.
    audio = session.get("audio")
    where = (audio.get("input") or {}) if isinstance(audio, dict) else session
    return where.get("turn_detection", {"type": "server_vad"})  # type: ignore[no-any-return]


def _transcription_on(session: dict[str, Any]) -> bool:
    audio = session.get("audio")
    if isinstance(audio, dict):
        return (audio.get("input") or {}).get("transcription") is not None
    return session.get("input_audio_transcription") is not None


def _realtime_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/realtime"
    return urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment))


_CLOSED = object()

AudioInput = bytes | np.ndarray | str | os.PathLike[str]


class Realtime:
    """An open Realtime session. Make one with `connect()`."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.session: dict[str, Any] = {}  # the latest session object from the server
        self.session_id: str | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        self._closed = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    # -- receiving ------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                now = time.perf_counter()
                if isinstance(msg, bytes):
                    ev = Event(AUDIO_DELTA, {"type": AUDIO_DELTA, BINARY_AUDIO: True}, now, msg)
                else:
                    try:
                        data = json.loads(msg)
                    except ValueError:
                        continue
                    if not isinstance(data, dict):
                        continue
                    ev = self._event(data, now)
                self._dispatch(ev)
        except ConnectionClosed:
            pass
        finally:
            self._closed = True
            for _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
            self._waiters.clear()
            self._queue.put_nowait(_CLOSED)

    @staticmethod
    def _event(data: dict[str, Any], now: float) -> Event:
        raw = data.get("type")
        kind = _GA_NAMES.get(raw, raw) if isinstance(raw, str) else ""
        audio = None
        if kind == AUDIO_DELTA and isinstance(data.get("delta"), str):
            try:
                audio = base64.b64decode(data["delta"])
            except (binascii.Error, ValueError):
                audio = None
        return Event(kind, data, now, audio)

    def _dispatch(self, ev: Event) -> None:
        if ev.type in ("session.created", "session.updated") and isinstance(
            ev.data.get("session"), dict
        ):
            self.session = ev.data["session"]
            self.session_id = self.session.get("id", self.session_id)
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(ev):
                fut.set_result(ev)
        self._queue.put_nowait(ev)

    def _expect(self, pred: Callable[[Event], bool]) -> asyncio.Future[Event]:
        """A future for the next event matching `pred`; register it before sending."""
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_exception(ConnectionError("connection closed"))
            return fut
        entry = (pred, fut)
        self._waiters.append(entry)
        fut.add_done_callback(lambda _: self._waiters.remove(entry) if entry in self._waiters else None)
        return fut

    async def events(self) -> AsyncIterator[Event]:
        """Every server event, in order of arrival, until the connection closes."""
        while True:
            ev = await self._queue.get()
            if ev is _CLOSED:
                self._queue.put_nowait(_CLOSED)
                return
            yield ev

    async def recv(self, timeout: float | None = None) -> Event:
        """The next server event; ConnectionError once the connection is closed."""
        ev = await asyncio.wait_for(self._queue.get(), timeout)
        if ev is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            raise ConnectionError("connection closed")
        return ev  # type: ignore[no-any-return]

    def drain(self) -> list[Event]:
        """Remove and return the events queued so far without waiting."""
        out = []
        while not self._queue.empty():
            ev = self._queue.get_nowait()
            if ev is _CLOSED:
                self._queue.put_nowait(_CLOSED)
                break
            out.append(ev)
        return out

    # -- session --------------------------------------------------------------------------

    @property
    def input_format(self) -> tuple[str, int]:
        """(encoding, sample rate) of the audio the server expects from us."""
        return _wire_format(self.session, "input")

    @property
    def output_format(self) -> tuple[str, int]:
        """(encoding, sample rate) of the reply audio."""
        return _wire_format(self.session, "output")

    async def update_session(
        self,
        session: dict[str, Any] | None = None,
        /,
        *,
        wait: bool = True,
        timeout: float = 10.0,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send `session.update` (a dict and/or keyword fields, GA shape) and, with `wait`,
        return the session from `session.updated` or raise RealtimeError on an `error`."""
        patch = dict(session or {})
        patch.update(fields)
        patch.setdefault("type", "realtime")
        eid = _event_id()
        fut = self._expect(
            lambda ev: ev.type == "session.updated"
            or (ev.type == "error" and (ev.error or {}).get("event_id") == eid)
        )
        try:
            await self.send_event({"type": "session.update", "event_id": eid, "session": patch})
            if not wait:
                return patch
            ev = await asyncio.wait_for(fut, timeout)
        finally:
            fut.cancel()
        if ev.type == "error":
            raise RealtimeError(ev.error or {})
        return self.session

    # -- sending --------------------------------------------------------------------------

    async def send_event(self, event: dict[str, Any]) -> str:
        """Send any client event; fills in `event_id` if missing and returns it."""
        if "event_id" not in event:
            event = {"event_id": _event_id(), **event}
        await self.ws.send(json.dumps(event))
        return str(event["event_id"])

    async def commit(self) -> str:
        return await self.send_event({"type": "input_audio_buffer.commit"})

    async def clear(self) -> str:
        return await self.send_event({"type": "input_audio_buffer.clear"})

    async def create_response(self, **response: Any) -> str:
        event: dict[str, Any] = {"type": "response.create"}
        if response:
            event["response"] = response
        return await self.send_event(event)

    async def cancel_response(self, response_id: str | None = None) -> str:
        event: dict[str, Any] = {"type": "response.cancel"}
        if response_id is not None:
            event["response_id"] = response_id
        return await self.send_event(event)

    async def truncate(self, item_id: str, audio_end_ms: int, content_index: int = 0) -> str:
        return await self.send_event({
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": content_index,
            "audio_end_ms": int(audio_end_ms),
        })

    async def clear_output_audio(self) -> str:
        return await self.send_event({"type": "output_audio_buffer.clear"})

    async def add_message(self, text: str, role: str = "user") -> str:
        """Add a text message to the conversation (`conversation.item.create`)."""
        part = "output_text" if role == "assistant" else "input_text"
        return await self.send_event({
            "type": "conversation.item.create",
            "item": {"type": "message", "role": role, "content": [{"type": part, "text": text}]},
        })

    def _wire_audio(self, data: AudioInput, sample_rate: int | None) -> tuple[bytes, np.ndarray]:
        """(bytes in the session's input format, the same as int16) for any accepted input."""
        encoding, rate = self.input_format
        if isinstance(data, (bytes, bytearray, memoryview)):
            wire = bytes(data)
            return wire, from_wire(wire, encoding)
        if isinstance(data, np.ndarray):
            x, src = to_float(data), sample_rate or rate
        else:
            x, src = load_wav(data)
        x = resample(x, src, rate)
        pcm = float_to_pcm16(x)
        return to_wire(x, encoding), pcm

    async def send_audio(
        self,
        data: AudioInput,
        *,
        sample_rate: int | None = None,
        realtime: bool | float = True,
        trailing_silence_ms: int = 0,
        chunk_ms: int = 20,
        speech_threshold_dbfs: float = -45.0,
    ) -> SendReport:
        """Stream audio as `input_audio_buffer.append` events of `chunk_ms` each.

        `data` is bytes already in the session's input format, a numpy array (int16, or float
        in [-1, 1]) at `sample_rate` (default: the session's input rate), or a WAV file path
        (any rate, width and channel count). Arrays and WAVs are resampled to the input rate.
        `realtime=True` paces frames at real time, a number is a speed factor (2.0 = twice as
        fast), False sends as fast as possible. When the session has `voicepipe.binary_audio`
        on, frames are sent as binary messages instead of base64 events. The report's `last_speech_sent_at` is the time
        the last frame louder than `speech_threshold_dbfs` (RMS) left, before any trailing
        silence.
        """
        encoding, rate = self.input_format
        wire, pcm = self._wire_audio(data, sample_rate)
        width = 2 if encoding == "pcm16" else 1
        frame = max(1, rate * chunk_ms // 1000)
        n_speech = len(pcm)
        silence = int(rate * trailing_silence_ms / 1000)
        if silence:
            wire += to_wire(np.zeros(silence), encoding)
        total = len(wire) // width
        n_frames = -(-total // frame)

        # Index of the last frame (within the utterance proper) loud enough to count as speech.
        threshold = 32768.0 * 10 ** (speech_threshold_dbfs / 20)
        last_speech = -1
        if n_speech:
            padded = np.zeros(-(-n_speech // frame) * frame)
            padded[:n_speech] = pcm
            rms = np.sqrt(np.mean(padded.reshape(-1, frame) ** 2, axis=1))
            loud = np.nonzero(rms >= threshold)[0]
            last_speech = int(loud[-1]) if len(loud) else -1

        # With voicepipe's binary_audio on, frames go as binary messages of raw input-format audio.
        binary = bool((self.session.get("voicepipe") or {}).get("binary_audio"))
        speed = 0.0 if realtime is False else (1.0 if realtime is True else float(realtime))
        period = frame / rate / speed if speed > 0 else 0.0
        started = time.perf_counter()
        last_speech_at = None
        for k in range(n_frames):
            if period:
                delay = started + k * period - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            chunk = wire[k * frame * width : (k + 1) * frame * width]
            if binary:
                await self.ws.send(chunk)
            else:
                await self.ws.send(json.dumps({
                    "type": "input_audio_buffer.append",
                    "event_id": _event_id(),
                    "audio": base64.b64encode(chunk).decode("ascii"),
                }))
            if k == last_speech:
                last_speech_at = time.perf_counter()
        return SendReport(n_frames, total / rate, started, time.perf_counter(), last_speech_at)

    # -- one turn ---------------------------------------------------------------------------

    async def talk(
        self,
        audio: AudioInput,
        *,
        sample_rate: int | None = None,
        realtime: bool | float = True,
        trailing_silence_ms: int | None = None,
        timeout: float = 60.0,
        speech_threshold_dbfs: float = -45.0,
        linger: float = 0.5,
        raise_on_error: bool = True,
    ) -> TurnResult:
        """Speak one utterance and collect the reply until `response.done`.

        With server VAD, trailing silence (default: the session's silence_duration_ms + 300)
        lets the server end the turn; with turn detection off, the buffer is committed and a
        response requested. Events queued before the call are dropped. After `response.done`
        it waits up to `linger` seconds for a user transcript or `voicepipe.latency` event
        that the session promises but that has not arrived yet. Raises RealtimeError on an
        `error` event (unless `raise_on_error` is False) and TimeoutError after `timeout`.
        Do not iterate `events()` concurrently: both consume the same queue.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        self.drain()
        turn = _turn_detection(self.session)
        manual = turn is None
        if trailing_silence_ms is None:
            trailing_silence_ms = 0 if manual else int((turn or {}).get("silence_duration_ms", 500)) + 300
        report = await asyncio.wait_for(
            self.send_audio(
                audio,
                sample_rate=sample_rate,
                realtime=realtime,
                trailing_silence_ms=trailing_silence_ms,
                speech_threshold_dbfs=speech_threshold_dbfs,
            ),
            timeout,
        )
        if manual:
            await self.commit()
            await self.create_response()

        out_encoding, out_rate = self.output_format
        events: list[Event] = []
        chunks: list[np.ndarray] = []
        text_parts: list[str] = []
        full_text: str | None = None
        transcript: str | None = None
        latency: dict[str, Any] | None = None
        response: dict[str, Any] | None = None
        first_audio_at: float | None = None

        def take(ev: Event) -> None:
            nonlocal full_text, transcript, latency, response, first_audio_at
            events.append(ev)
            kind = ev.type
            if kind == "error" and raise_on_error:
                raise RealtimeError(ev.error or {})
            if kind == AUDIO_DELTA and ev.audio:
                if first_audio_at is None:
                    first_audio_at = ev.received_at
                chunks.append(from_wire(ev.audio, "pcm16" if ev.binary else out_encoding))
            elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
                text_parts.append(ev.delta or "")
            elif kind == "response.output_audio_transcript.done" and ev.transcript is not None:
                full_text = ev.transcript
            elif kind == "response.output_text.done" and ev.text is not None:
                full_text = ev.text
            elif kind == "conversation.item.input_audio_transcription.completed":
                transcript = ev.transcript
            elif kind == "voicepipe.latency":
                latency = ev.data
            elif kind == "response.done":
                response = ev.data.get("response") or {}

        loop = asyncio.get_running_loop()
        while response is None:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no response.done within {timeout} s")
            try:
                take(await self.recv(left))
            except (asyncio.TimeoutError, TimeoutError):  # distinct before 3.11
                raise TimeoutError(f"no response.done within {timeout} s") from None

        latency_on = bool((self.session.get("voicepipe") or {}).get("latency_events"))
        linger_until = loop.time() + linger
        while (transcript is None and _transcription_on(self.session)) or (
            latency is None and latency_on
        ):
            left = min(linger_until, deadline) - loop.time()
            if left <= 0:
                break
            try:
                take(await self.recv(left))
            except (asyncio.TimeoutError, TimeoutError, ConnectionError):
                break

        timings: dict[str, Any] = {}
        if latency is not None:
            timings = {k: latency.get(k, {}) for k in ("marks", "derived_ms", "llm")}
        v2v = None
        if first_audio_at is not None and report.last_speech_sent_at is not None:
            v2v = first_audio_at - report.last_speech_sent_at
        reply = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        return TurnResult(
            user_transcript=transcript,
            reply_text=full_text if full_text is not None else "".join(text_parts),
            reply_audio=reply,
            sample_rate=out_rate,
            response_status=response.get("status"),
            timings=timings,
            client_voice_to_voice=v2v,
            events=events,
            response_id=response.get("id"),
        )

    async def close(self) -> None:
        await self.ws.close()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass


class _Connect:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        session: dict[str, Any] | None,
        open_timeout: float,
        ws_options: dict[str, Any],
    ) -> None:
        self.url = _realtime_url(url)
        self.api_key = api_key
        self.session = session
        self.open_timeout = open_timeout
        self.ws_options = ws_options
        self.rt: Realtime | None = None

    async def _open(self) -> Realtime:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        options = {"max_size": 16 * 1024 * 1024, "compression": None, **self.ws_options}
        ws = await ws_connect(
            self.url, additional_headers=headers, open_timeout=self.open_timeout, **options
        )
        rt = Realtime(ws)
        try:
            created = rt._expect(lambda ev: ev.type in ("session.created", "error"))
            ev = await asyncio.wait_for(created, self.open_timeout)
            if ev.type == "error":
                raise RealtimeError(ev.error or {})
            if self.session:
                await rt.update_session(self.session, timeout=self.open_timeout)
        except BaseException:
            await rt.close()
            raise
        return rt

    async def __aenter__(self) -> Realtime:
        self.rt = await self._open()
        return self.rt

    async def __aexit__(self, *exc: object) -> None:
        if self.rt is not None:
            await self.rt.close()

    def __await__(self) -> Generator[Any, None, Realtime]:
        return self._open().__await__()


def connect(
    url: str,
    api_key: str | None = None,
    *,
    session: dict[str, Any] | None = None,
    open_timeout: float = 10.0,
    **ws_options: Any,
) -> _Connect:
    """Open a Realtime session: `async with connect(url) as rt:` (or `rt = await connect(url)`).

    `url` may be `ws://host:port` (the path defaults to /v1/realtime); http(s) become ws(s).
    `api_key` is sent as `Authorization: Bearer`. Waits for `session.created`, then applies
    `session` (GA shape, e.g. {"voicepipe": {"latency_events": True}}) and waits for
    `session.updated`. Extra keyword arguments go to `websockets.asyncio.client.connect`.
    """
    return _Connect(url, api_key, session, open_timeout, ws_options)
