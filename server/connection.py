"""One WebSocket connection: the asyncio adapter around a Sans-I/O `Session`.

It decodes client messages, runs the VAD on incoming audio, carries out the session's actions
(sending events, running transcriptions and responses on worker threads) and feeds results
back. Model calls never run on the event loop. Changes to the LLM's conversation and the
generation itself run one after another on the session's conversation lane, so a truncation
requested during a reply applies to that reply once it has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np
from websockets.protocol import State

from voicepipe import audio as au
from voicepipe import protocol as p
from voicepipe import session as s
from voicepipe.config import ServerConfig
from voicepipe.phrases import PhraseChunker
from voicepipe.stages.base import SamplingParams, Stages
from voicepipe.stages.batching import VADBatcher
from voicepipe.turns import RATE

from .metrics import ServerMetrics

log = logging.getLogger("voicepipe.session")
T = TypeVar("T")


class StageFailure(Exception):
    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(f"{stage}: {type(exc).__name__}: {exc}")
        self.stage = stage
        self.exc = exc


class Lane:
    """Runs a session's conversation updates one at a time, in order, on the shared thread pool.

    There is no task of its own: the pool thread that finishes one function takes the next, and
    each result reaches the event loop with one `call_soon_threadsafe`. (A queue drained by a
    task would cost a loop wake-up for every item, on the path from end of turn to reply.)"""

    def __init__(self, executor: Executor, loop: asyncio.AbstractEventLoop) -> None:
        self._executor = executor
        self._loop = loop
        self._items: deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn`; called on the event loop. The future gets its result or exception."""
        fut: asyncio.Future[T] = self._loop.create_future()
        with self._lock:
            self._items.append((fn, fut))
            if self._running:
                return fut
            self._running = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError as exc:  # the pool is shut down: the server is closing
            with self._lock:
                items, self._running = list(self._items), False
                self._items.clear()
            for _, f in items:
                if not f.done():
                    f.set_exception(exc)
        return fut

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._items:
                    self._running = False
                    return
                fn, fut = self._items.popleft()
            try:
                outcome: tuple[Any, BaseException | None] = (fn(), None)
            except Exception as exc:  # reported to whoever waits on it
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(_resolve, fut, *outcome)


def _resolve(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # cancelled meanwhile
        if exc is not None:
            log.error("conversation update failed", exc_info=exc)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def is_fatal(exc: BaseException) -> bool:
    """Failures that will not heal by themselves: out of memory, on the host or a device."""
    return isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__


class _Reply:
    """A reply being generated on the lane. Until it belongs to a response (a speculative
    reply before its endpoint) its first-token time and phrases are held here, in order."""

    def __init__(self, response_id: str | None) -> None:
        self.response_id = response_id
        self.cancel = threading.Event()
        self.first_token: float | None = None
        self.held: list[tuple[str, bytes | None, float, float]] = []
        self.generation: asyncio.Future[None] | None = None
        self.speculative = 0  # tokens of its turn prefilled before the endpoint


class Connection:
    def __init__(self, ws: Any, stages: Stages, config: ServerConfig, *, executor: Executor,
                 vad_batcher: VADBatcher, dialect: p.Dialect,
                 on_fatal: Callable[[str, BaseException], None] | None = None) -> None:
        self.ws = ws
        self.stages = stages
        self.config = config
        self.executor = executor
        self.vad_batcher = vad_batcher
        self.on_fatal = on_fatal
        self.api_key: str | None = None
        self.metrics = ServerMetrics()  # the App sets its own
        self.session = s.Session(dialect=dialect, max_buffer_s=config.max_input_buffer_s,
                                 partial_interval_ms=config.partial_interval_ms,
                                 max_response_tokens=config.max_response_tokens,
                                 max_items=config.max_conversation_items,
                                 speculative_reply=config.speculative_reply)
        self.conversation = stages.llm.new_conversation(self.session.config.instructions)
        self.vad = stages.vad.new_stream()
        self._frame = stages.vad.frame_samples
        self._pending = np.zeros(0, np.float32)
        self._resampler = au.Resampler(self.session.config.input_format.rate, RATE)
        self._outbox: asyncio.Queue[tuple[str | bytes, str | None]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._lane = Lane(executor, self._loop)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancels: dict[str, threading.Event] = {}
        self._spec_replies: dict[str, _Reply] = {}  # speculative replies, by key
        self._queued_bytes = 0  # bytes waiting in the outbox: bounded by max_send_buffer_bytes
        self._writer_busy = False  # the writer task is inside ws.send
        self._direct = _can_send_now(ws)  # see _send_now
        self._rate_tokens = 2.0 * config.max_events_per_s  # token bucket of client events
        self._rate_at = time.monotonic()
        self._rate_warned = 0.0
        self._last_message = time.monotonic()
        self._speculative: tuple[str, int] | None = None  # (item id, tokens) prefilled early

    # ---- main loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        watchdog = asyncio.create_task(self._idle_watchdog())
        self.session.start()
        self._process()
        try:
            async for message in self.ws:
                await self._receive(message)
        except Exception as exc:  # a dead socket ends the session quietly
            if not _is_closed_error(exc):
                raise
        finally:
            for ev in self._cancels.values():
                ev.set()
            for reply in self._spec_replies.values():
                reply.cancel.set()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            writer.cancel()
            watchdog.cancel()
            await self._run_in_lane(self.conversation.close)
            await asyncio.gather(writer, watchdog, return_exceptions=True)
            self._pending = np.zeros(0, np.float32)

    def _admit(self) -> bool:
        """Token bucket over client events: `max_events_per_s` sustained, bursts of twice."""
        rate = self.config.max_events_per_s
        t = time.monotonic()
        self._rate_tokens = min(2.0 * rate, self._rate_tokens + (t - self._rate_at) * rate)
        self._rate_at = t
        if self._rate_tokens >= 1.0:
            self._rate_tokens -= 1.0
            return True
        if t - self._rate_warned >= 1.0:  # one error a second, not one per dropped event
            self._rate_warned = t
            self._send_error("rate_limit_exceeded", f"more than {rate:g} events per second; "
                             "events are being dropped")
        return False

    async def _idle_watchdog(self) -> None:
        limit = self.config.idle_timeout_s
        if not limit:
            return
        while True:
            left = self._last_message + limit - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(left)
        self._send_error("session_idle_timeout", f"no client message for {limit:g}s; closing")
        await asyncio.sleep(0.1)  # let the writer deliver it
        await self.ws.close(1000, "idle timeout")

    async def _receive(self, message: str | bytes) -> None:
        now = time.time()
        self._last_message = time.monotonic()
        if not self._admit():
            return
        if isinstance(message, bytes) and not self.session.config.voicepipe.binary_audio:
            self._send_error("unsupported", "binary frames are not enabled; send "
                             "input_audio_buffer.append, or enable session.voicepipe.binary_audio")
            return
        if len(message) > self.config.max_message_bytes:
            self._send_error("message_too_large", f"message of {len(message)} bytes exceeds "
                             f"the limit of {self.config.max_message_bytes} bytes")
            return
        if isinstance(message, bytes):
            await self._audio(message, None, now)
            return
        try:
            event = p.parse_client_event(message, max_bytes=self.config.max_message_bytes)
        except p.ProtocolError as exc:
            self.metrics.error(exc.code)
            self._queue_send(json.dumps(exc.to_event()), None)
            return
        if isinstance(event, p.InputAudioBufferAppend):
            await self._audio(event.audio, event.event_id, now)
        self.session.receive(event, now)
        self._process()

    async def _audio(self, raw: bytes, event_id: str | None, arrival: float) -> None:
        fmt = self.session.config.input_format
        try:
            samples = au.decode_input(raw, fmt.encoding, fmt.rate)
        except ValueError as exc:
            self._send_error("invalid_audio", f"{exc} (session input format: {fmt.encoding} "
                             f"at {fmt.rate} Hz)", event_id)
            return
        x = self._resampler.process(samples) if fmt.rate != RATE else samples
        x = np.concatenate([self._pending, x]) if len(self._pending) else x
        n = len(x) // self._frame * self._frame
        self._pending = x[n:]
        if n == 0:
            return
        frames = x[:n].reshape(-1, self._frame)
        probs: list[float | None]
        if self.session.vad_enabled:
            probs = (await self.vad_batcher.submit(self.vad, frames)).tolist()
        else:
            probs = [None] * len(frames)
        now = time.time()
        for frame, prob in zip(frames, probs, strict=True):
            self.session.audio(frame, prob, arrival, now)
        self._process()

    # ---- actions -----------------------------------------------------------------------------

    def _process(self) -> None:
        """Carry out the session's actions. Stage work starts first and the events are encoded
        after it, so a reply's LLM is already running while its events are serialized; both
        kinds keep their own order (the lane's order, and what the client receives). Actions
        that sending produces (the first audio byte's mark) are carried out in the next round."""
        while actions := self.session.actions():
            outgoing: list[s.SendEvent | s.SendAudio] = []
            for action in actions:
                if isinstance(action, (s.SendEvent, s.SendAudio)):
                    outgoing.append(action)
                else:
                    self._start(action)
            for action in outgoing:
                if isinstance(action, s.SendEvent):
                    ev = action.event
                    audio_of = (ev.get("response_id") if ev["type"].endswith("audio.delta")
                                else None)
                    self.metrics.event(ev)
                    self._queue_send(json.dumps(ev), audio_of)
                else:
                    self._queue_send(action.data, action.response_id)

    def _start(self, action: s.Action) -> None:
        if isinstance(action, s.Transcribe):
            self._spawn(self._transcribe(action))
        elif isinstance(action, s.StartResponse):
            self._spawn(self._respond(action))  # starts or adopts the LLM before it returns
        elif isinstance(action, s.SpeculateResponse):
            reply = _Reply(None)
            self._spec_replies[action.key] = reply
            self._generate(reply, action.max_tokens, action.audio)
        elif isinstance(action, s.CancelSpeculation):
            dropped = self._spec_replies.pop(action.key, None)
            if dropped is not None:
                dropped.cancel.set()
                self.metrics.speculative_replies.labels("dropped").inc()
        elif isinstance(action, s.CancelResponse):
            if action.response_id in self._cancels:
                self._cancels[action.response_id].set()
        elif isinstance(action, s.AddMessage):
            self._lane_nowait(lambda a=action, c=self.conversation: c.add_message(a.role, a.text))
        elif isinstance(action, s.Prefill):
            self._lane_nowait(lambda a=action: self._prefill(a))
        elif isinstance(action, s.TruncateMessage):
            self._lane_nowait(lambda a=action, c=self.conversation: c.truncate_last_assistant(a.kept_text))
        elif isinstance(action, s.DeleteMessage):
            self._lane_nowait(lambda a=action: self._forget_speculation(a.item_id))
            self._lane_nowait(lambda a=action, c=self.conversation: c.delete_message(a.index))
        elif isinstance(action, s.SetInstructions):
            self._lane_nowait(lambda a=action, c=self.conversation: c.set_instructions(a.text))
        elif isinstance(action, s.SessionChanged):
            rate = self.session.config.input_format.rate
            self._resampler = au.Resampler(rate, RATE)
            self._pending = np.zeros(0, np.float32)
            self.vad.reset()
        elif isinstance(action, s.TurnFinished):
            log.info("turn %s %s %s", action.response_id, action.status,
                     action.timings.log_line())
            self.metrics.turn_finished(action.timings, action.status, action.response_id)

    def _send_error(self, code: str, message: str, event_id: str | None = None) -> None:
        err = p.ProtocolError(code, message, event_id=event_id)
        self.metrics.error(code)
        self._queue_send(json.dumps(err.to_event()), None)

    def _queue_send(self, data: str | bytes, audio_of: str | None) -> None:
        if self._queued_bytes < 0:
            return  # closing: the client stopped reading
        if self._send_now(data):
            if audio_of is not None:  # its actions are carried out by the _process under way
                self.session.audio_sent(audio_of, time.time())
            return
        self._queued_bytes += len(data)
        if self._queued_bytes > self.config.max_send_buffer_bytes:
            log.warning("session %s: client is not reading (%d bytes queued); closing",
                        self.session.id, self._queued_bytes)
            self._queued_bytes = -1
            for ev in self._cancels.values():
                ev.set()
            self._spawn(self.ws.close(1008, "client is not reading: send buffer limit reached"))
            return
        self._outbox.put_nowait((data, audio_of))

    def _send_now(self, data: str | bytes) -> bool:
        """Write a message to the socket at once when nothing is waiting to be written before
        it; False leaves it to the writer task.

        Waking the writer costs an event-loop iteration, which on a loaded server is most of
        the time from a reply's first audio to the socket. This is what `ws.send` does when
        it need not wait, minus the wait: the frame goes through the connection's Sans-I/O
        protocol and straight to the transport. It is taken only while the connection is open,
        the writer is idle with nothing queued, no other send is in progress and the transport
        is not paused; a slow reader pauses the transport, so from then on messages queue
        (and count against max_send_buffer_bytes) exactly as before."""
        ws = self.ws
        if (not self._direct or self._writer_busy or not self._outbox.empty()
                or ws.paused or ws.send_in_progress is not None
                or ws.protocol.state is not State.OPEN):
            return False
        if isinstance(data, str):
            ws.protocol.send_text(data.encode())
        else:
            ws.protocol.send_binary(data)
        try:
            ws.send_data()
        except Exception as exc:  # as websockets does: the connection is finished
            log.info("session %s: write failed: %s", self.session.id, exc)
            ws.transport.abort()
        return True

    async def _writer(self) -> None:
        while True:
            data, audio_of = await self._outbox.get()
            self._writer_busy = True
            if self._queued_bytes >= 0:
                self._queued_bytes -= len(data)
            try:
                await self.ws.send(data)
            finally:
                self._writer_busy = False
            if audio_of is not None:
                self.session.audio_sent(audio_of, time.time())
                self._process()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: task failed", self.session.id, exc_info=task.exception())

    # ---- the conversation lane ---------------------------------------------------------------

    def _lane_nowait(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        return self._lane.submit(fn)

    async def _run_in_lane(self, fn: Callable[[], T]) -> T:
        return await self._lane_nowait(fn)

    # ---- stage work --------------------------------------------------------------------------

    async def _transcribe(self, a: s.Transcribe) -> None:
        try:
            result = await self._loop.run_in_executor(
                self.executor, lambda: self.stages.asr.transcribe(a.audio, final=a.final))
        except Exception as exc:
            self._stage_failed(StageFailure("asr", exc))
            self.session.transcription_failed(a.item_id, f"{type(exc).__name__}: {exc}",
                                              final=a.final, key=a.key, now=time.time())
        else:
            self.session.transcript(a.item_id, result.text, final=a.final, key=a.key,
                                    now=time.time())
        self._process()

    def _prefill(self, a: s.Prefill) -> None:
        """Runs on the conversation lane: the speculative user message, through the LLM."""
        self.conversation.add_message("user", a.text)
        self._speculative = (a.item_id, 0)
        try:
            self._speculative = (a.item_id, self.conversation.prefill())
        except Exception as exc:  # speculation is an optimisation: the reply will redo it
            self._stage_failed(StageFailure("llm", exc))

    def _forget_speculation(self, item_id: str) -> None:
        if self._speculative is not None and self._speculative[0] == item_id:
            self._speculative = None

    def _stage_failed(self, failure: StageFailure) -> None:
        if is_fatal(failure.exc) and self.on_fatal is not None:
            self.on_fatal(failure.stage, failure.exc)  # logs once, marks /healthz degraded
        else:
            log.error("session %s: %s", self.session.id, failure)

    def _respond(self, a: s.StartResponse) -> Awaitable[None]:
        """Start the reply on the conversation lane, or adopt the speculative one the session
        names (releasing what it holds, at once), and return the coroutine that ends it."""
        reply = self._spec_replies.pop(a.speculation, None) if a.speculation else None
        if reply is None:
            reply = _Reply(a.response_id)
            self._generate(reply, a.max_tokens, a.audio)
        else:
            self.metrics.speculative_replies.labels("adopted").inc()
            reply.response_id = a.response_id
            if reply.first_token is not None:
                self.session.token(a.response_id, reply.first_token)
            for held in reply.held:  # carried out by the _process under way
                self.session.phrase(a.response_id, *held)
            reply.held.clear()
        self._cancels[a.response_id] = reply.cancel
        return self._end_reply(a, reply)

    def _generate(self, reply: _Reply, max_tokens: int | None, audio: bool) -> None:
        """Queue the reply's generation on the conversation lane.

        One lane function streams the LLM, cuts the text into phrases and synthesizes each
        phrase, so the path from the endpoint to the first audio crosses from the event loop to
        a thread once and back once (and not at all for a speculative reply that is ready by
        the endpoint). The TTS runs in the thread that reads the LLM's tokens: the engine's
        scheduler keeps decoding (for every session) meanwhile, and the first phrase's audio
        goes before more text, as the priorities in DESIGN.md ask."""
        cancel = reply.cancel
        conv = self.conversation
        params = SamplingParams(max_tokens=max_tokens or 256,
                                temperature=self.session.config.temperature)
        fmt = self.session.config.output_format  # fixed for the whole reply
        tts = self.stages.tts
        loop = self._loop

        def post(fn: Callable[..., None], *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(fn, *args)

        def speak(text: str, transcript: str) -> None:
            """One phrase; `transcript` is its exact slice of the reply text."""
            if cancel.is_set():
                return
            if not audio or not text:
                post(self._phrase_ready, reply, transcript, None, 0.0, time.time())
                return
            try:
                wave = tts.synthesize(text)
                if tts.sample_rate != fmt.rate:
                    wave = au.resample(wave, tts.sample_rate, fmt.rate)
                data = au.encode_output(wave, fmt.encoding)
            except Exception as exc:
                raise StageFailure("tts", exc) from exc
            post(self._phrase_ready, reply, transcript, data, len(wave) * 1000.0 / fmt.rate,
                 time.time())

        def run() -> None:
            if self._speculative is not None:
                reply.speculative, self._speculative = self._speculative[1], None
            chunker = PhraseChunker()
            # The chunker trims whitespace; the transcript sent must stay a prefix of the text
            # the LLM holds (a barge-in cuts both at the same place), so phrases are mapped
            # back onto the raw reply text.
            text, consumed = "", 0

            def raw(phrase: str) -> str:
                nonlocal consumed
                i = text.find(phrase, consumed)
                if i < 0:
                    return phrase
                piece, consumed = text[consumed:i + len(phrase)], i + len(phrase)
                return piece

            last: float | None = None
            deltas = conv.generate(params, cancel)
            try:
                while True:
                    try:
                        delta = next(deltas, None)
                    except Exception as exc:
                        raise StageFailure("llm", exc) from exc
                    if delta is None:
                        break
                    last = self.metrics.token(last)
                    if not text:
                        post(self._first_token, reply, time.time())
                    text += delta
                    for phrase in chunker.push(delta):
                        speak(phrase, raw(phrase))
            finally:  # a failed TTS ends the LLM's request now, not when the generator is freed
                close = getattr(deltas, "close", None)
                if close is not None:
                    close()
            if not cancel.is_set():
                for phrase in chunker.flush():
                    speak(phrase, raw(phrase))

        reply.generation = self._lane_nowait(run)
        if reply.response_id is None:  # nobody may ever await it: a dropped speculation
            reply.generation.add_done_callback(_quiet)

    def _first_token(self, reply: _Reply, when: float) -> None:
        if reply.response_id is None:
            reply.first_token = when
        else:
            self.session.token(reply.response_id, when)

    def _phrase_ready(self, reply: _Reply, transcript: str, data: bytes | None, ms: float,
                      when: float) -> None:
        if reply.response_id is None:  # speculative: held until the endpoint adopts it
            if not reply.cancel.is_set():
                reply.held.append((transcript, data, ms, when))
            return
        self.session.phrase(reply.response_id, transcript, data, ms, when)
        self._process()

    async def _end_reply(self, a: s.StartResponse, reply: _Reply) -> None:
        assert reply.generation is not None
        error: str | None = None
        try:
            await reply.generation  # its phrases reached the session before this resumes
        except asyncio.CancelledError:
            reply.cancel.set()
            raise
        except StageFailure as failure:
            self._stage_failed(failure)
            error = str(failure)
            reply.cancel.set()
        stats = self.conversation.stats
        speculative = reply.speculative  # set by the generation, which has ended
        self._cancels.pop(a.response_id, None)
        # A turn's figures count its speculatively prefilled tokens as prefilled, not cached.
        self.session.response_finished(
            a.response_id, prefill_tokens=stats.prefill_tokens + speculative,
            cached_tokens=max(0, stats.cached_tokens - speculative),
            generated_tokens=stats.generated_tokens, speculative_tokens=speculative,
            error=error, now=time.time())
        self._process()


def _quiet(fut: asyncio.Future[Any]) -> None:
    """Done-callback of a speculative reply's generation: if it was dropped, nobody awaits it,
    and a failure (reported if the reply is adopted) must not be logged as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def _can_send_now(ws: Any) -> bool:
    """Whether `ws` is a websockets asyncio connection with the parts `_send_now` uses."""
    return all(hasattr(ws, name) for name in ("paused", "send_in_progress", "protocol",
                                               "send_data", "transport"))


def _is_closed_error(exc: BaseException) -> bool:
    from websockets.exceptions import ConnectionClosed

    return isinstance(exc, ConnectionClosed)
