"""The conversation state machine of one Realtime session, Sans-I/O.

`Session` takes events — parsed client events, frames of 16 kHz input audio with their speech
probability, transcripts, reply tokens and synthesized phrases — and answers with actions for
its adapter to carry out: events to send, transcriptions and responses to start or cancel, and
changes to the LLM's copy of the conversation. It does no I/O, owns no models and reads no
clock: every input carries its `now` (wall-clock seconds), so tests drive it deterministically.

Audio positions are sample counts of the 16 kHz analysis stream since the session started.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voicepipe import protocol as p
from voicepipe.latency import TurnTimings
from voicepipe.turns import (
    RATE,
    SilenceBegan,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TurnDetector,
)

MIN_COMMIT_MS = 100
KEEP_BEFORE_SPEECH_S = 1.0


# ---- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendEvent:
    event: dict[str, Any]


@dataclass(frozen=True)
class SendAudio:
    """Reply audio as a raw binary frame (voicepipe's opt-in binary mode)."""

    response_id: str
    data: bytes


@dataclass(frozen=True)
class Transcribe:
    item_id: str
    audio: np.ndarray  # float32, 16 kHz
    final: bool
    key: int  # the speech end it was made for; results for stale keys are ignored


@dataclass(frozen=True)
class StartResponse:
    response_id: str
    item_id: str
    instructions: str | None
    max_tokens: int | None
    audio: bool
    speculation: str | None = None  # the key of the SpeculateResponse this response adopts


@dataclass(frozen=True)
class CancelResponse:
    response_id: str


@dataclass(frozen=True)
class SpeculateResponse:
    """Speculation, continued: start the reply to the speculatively prefilled message while
    the endpoint is still undecided, generating and synthesizing as usual but holding its
    output. A `StartResponse` naming `key` adopts it at the endpoint and releases what it holds
    at once; `CancelSpeculation` stops it, and a `DeleteMessage` for `key` then removes its
    reply from the LLM's messages."""

    key: str
    max_tokens: int
    audio: bool


@dataclass(frozen=True)
class CancelSpeculation:
    key: str


@dataclass(frozen=True)
class AddMessage:
    item_id: str
    role: str
    text: str


@dataclass(frozen=True)
class Prefill:
    """Speculation: append the user's message as transcribed at the first silent frame and run
    it through the LLM while the endpoint is still undecided. If the turn ends with the same
    text, the reply starts from a warm cache; if not, a `DeleteMessage` rolls it back."""

    item_id: str
    text: str


@dataclass(frozen=True)
class TruncateMessage:
    item_id: str
    kept_text: str


@dataclass(frozen=True)
class DeleteMessage:
    item_id: str
    index: int  # position among the messages the LLM holds


@dataclass(frozen=True)
class SetInstructions:
    text: str


@dataclass(frozen=True)
class SessionChanged:
    """Input/output audio format or turn detection changed: the adapter rebuilds its codecs."""


@dataclass(frozen=True)
class TurnFinished:
    response_id: str
    status: str
    timings: TurnTimings


Action = (SendEvent | SendAudio | Transcribe | StartResponse | CancelResponse | AddMessage
          | Prefill | SpeculateResponse | CancelSpeculation | TruncateMessage | DeleteMessage
          | SetInstructions | SessionChanged | TurnFinished)


# ---- state -----------------------------------------------------------------------------------


@dataclass(eq=False)  # items are found in lists (index, remove) by identity, not field by field
class Item:
    id: str
    role: str
    text: str
    audio: bool = False
    status: str = "completed"
    # assistant audio: phrases as (text, start_ms, end_ms) and the playback clock
    phrases: list[tuple[str, float, float]] = field(default_factory=list)
    audio_ms: float = 0.0
    first_audio_at: float | None = None

    def played_ms(self, now: float) -> float:
        if self.first_audio_at is None:
            return 0.0
        return max(0.0, min(self.audio_ms, (now - self.first_audio_at) * 1000.0))

    def text_at_ms(self, ms: float) -> str:
        """The part of the reply text spoken in the first `ms` of its audio."""
        kept = ""
        for text, start, end in self.phrases:
            if ms >= end:
                kept += text
                continue
            if ms > start and end > start:
                part = text[: int(len(text) * (ms - start) / (end - start))]
                cut = part.rfind(" ")  # only whole words
                kept += part[: cut + 1] if cut > 0 else ""
            break
        return kept


@dataclass
class UserTurn:
    item_id: str
    start: int
    timings: TurnTimings = field(default_factory=TurnTimings)
    committed: bool = False
    partial_busy: bool = False
    last_partial_end: int = 0
    partial_sent: str = ""
    final_key: int | None = None
    final_text: str | None = None
    final_at: float | None = None


@dataclass
class Response:
    id: str
    item: Item
    audio: bool
    timings: TurnTimings
    status: str = "in_progress"  # in_progress | cancelling
    cancel_reason: str = "client_cancelled"
    kept_text: str | None = None
    kept_ms: float = 0.0
    final_status: str = ""


class Session:
    def __init__(
        self,
        config: p.SessionConfig | None = None,
        *,
        dialect: p.Dialect = p.Dialect.GA,
        max_buffer_s: float = 120.0,
        partial_interval_ms: int = 600,
        max_response_tokens: int = 256,
        max_items: int = 200,
        speculative_reply: bool = True,
    ) -> None:
        self.id = p.new_id("sess")
        self.speculative_reply = speculative_reply
        self.config = config or p.SessionConfig()
        self.dialect = dialect
        self.max_buffer = int(max_buffer_s * RATE)
        self.partial_interval = partial_interval_ms * RATE // 1000
        self.max_response_tokens = max_response_tokens
        self.max_items = max(2, max_items)
        self.items: list[Item] = []
        self._out: list[Action] = []
        self._detector = self._make_detector()
        self._buf: list[np.ndarray] = []
        self._buf_start = 0  # position of the first buffered sample
        self._pos = 0  # position one past the last sample received
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=512)
        self._turn: UserTurn | None = None
        self._response: Response | None = None
        self._response_wanted: p.ResponseCreate | None = None
        self._pending_finals: list[UserTurn] = []
        self._speculated: tuple[str, str] | None = None  # (item id, text) prefilled early
        self._spec_reply: str | None = None  # key of the reply started before the endpoint
        # The item ids of the LLM's messages in its order (which can differ from the items':
        # a typed message can overtake a spoken one whose transcript is still coming).
        self._llm: list[str] = []
        self._unsent: dict[str, Response] = {}  # ended, but their first audio not yet written

    # ---- plumbing ----------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        """Take the actions produced since the last call, in order."""
        out, self._out = self._out, []
        return out

    def _send(self, ga_type: str, **fields: Any) -> None:
        name = p.server_event_type(ga_type, self.dialect)
        if name is None:  # the dialect has no such event
            return
        if (ga_type.startswith("conversation.item.input_audio_transcription.")
                and self.config.input_transcription is None):
            return
        event = {"type": name, "event_id": p.new_id("event")}
        event.update(fields)
        self._out.append(SendEvent(event))

    def _error(self, code: str, message: str, event_id: str | None = None,
               param: str | None = None) -> None:
        self._out.append(SendEvent(p.ProtocolError(code, message, event_id=event_id,
                                                   param=param).to_event()))

    def _make_detector(self) -> TurnDetector | None:
        td = self.config.turn_detection
        if td is None:
            return None
        return TurnDetector(threshold=td.threshold, silence_duration_ms=td.silence_duration_ms)

    @property
    def vad_enabled(self) -> bool:
        return self._detector is not None

    @property
    def busy(self) -> bool:
        return self._response is not None

    def start(self) -> None:
        self._send("session.created", session=self._session_object())

    def _session_object(self) -> dict[str, Any]:
        obj = self.config.to_dict(self.dialect)
        obj["id"] = self.id
        return obj

    # ---- client events -----------------------------------------------------------------------

    def receive(self, ev: p.ClientEvent, now: float) -> None:
        handler = getattr(self, "_on_" + type(ev).__name__, None)
        if handler is None:
            self._error("unsupported", f"event {type(ev).__name__} is not supported",
                        ev.event_id)
            return
        if not isinstance(ev, (p.InputAudioBufferAppend, p.InputAudioBufferCommit,
                               p.ConversationItemRetrieve)):
            self._drop_spec_reply()  # it was made for the conversation as it stood
        handler(ev, now)

    def _on_SessionUpdate(self, ev: p.SessionUpdate, now: float) -> None:
        before = (self.config.instructions, self.config.input_format,
                  self.config.output_format, self.config.turn_detection)
        try:
            self.config.apply(ev.session, self.dialect)
        except p.ProtocolError as exc:
            if exc.event_id is None:
                exc.event_id = ev.event_id
            self._out.append(SendEvent(exc.to_event()))
            return
        instructions, in_fmt, out_fmt, td = before
        if self.config.instructions != instructions:
            self._out.append(SetInstructions(self.config.instructions))
        if self.config.turn_detection != td:
            self._detector = self._make_detector()
            if self._turn is not None and not self._turn.committed:
                self._turn = None
                self._unspeculate()
        if (in_fmt, out_fmt, td) != (self.config.input_format, self.config.output_format,
                                     self.config.turn_detection):
            self._out.append(SessionChanged())
        self._send("session.updated", session=self._session_object())

    def _on_InputAudioBufferAppend(self, ev: p.InputAudioBufferAppend, now: float) -> None:
        # The adapter decodes the audio and calls `audio()`; nothing is left to do here.
        pass

    def _on_InputAudioBufferCommit(self, ev: p.InputAudioBufferCommit, now: float) -> None:
        start = self._turn.start if self._turn else self._buf_start
        if self._pos - start < MIN_COMMIT_MS * RATE // 1000:
            self._error("input_audio_buffer_commit_empty",
                        f"buffer too small: expected at least {MIN_COMMIT_MS}ms of audio, "
                        f"but buffer only has {(self._pos - start) * 1000 / RATE:.2f}ms",
                        ev.event_id)
            return
        turn = self._turn or UserTurn(p.new_id("item"), start)
        self._turn = turn
        if self._detector is not None:
            self._detector.reset()
        self._endpoint(turn, self._pos, now)

    def _on_InputAudioBufferClear(self, ev: p.InputAudioBufferClear, now: float) -> None:
        self._drop_buffer(self._pos)
        if self._turn is not None and not self._turn.committed:
            self._turn = None
            self._unspeculate()
        if self._detector is not None:
            self._detector.reset()
        self._send("input_audio_buffer.cleared")

    def _on_ConversationItemCreate(self, ev: p.ConversationItemCreate, now: float) -> None:
        if ev.previous_item_id not in (None, self.items[-1].id if self.items else None):
            self._error("unsupported", "items can only be appended to the conversation's end",
                        ev.event_id, "previous_item_id")
            return
        item_id = ev.item_id or p.new_id("item")
        if any(it.id == item_id for it in self.items):
            self._error("invalid_value", f"item id {item_id!r} already exists", ev.event_id,
                        "item.id")
            return
        item = self._add_item(Item(item_id, ev.role, ev.text))
        self._to_llm(item)
        self._send("conversation.item.done", previous_item_id=self._previous_id(item),
                   item=self._item_object(item))

    def _on_ConversationItemTruncate(self, ev: p.ConversationItemTruncate, now: float) -> None:
        item = self._find(ev.item_id)
        if item is None or item.role != "assistant" or not item.audio:
            self._error("invalid_value", f"no assistant audio item with id {ev.item_id!r}",
                        ev.event_id, "item_id")
            return
        if ev.audio_end_ms > item.audio_ms + 1:
            self._error("invalid_value", f"audio_end_ms {ev.audio_end_ms} is beyond the item's "
                        f"{item.audio_ms:.0f} ms of audio", ev.event_id, "audio_end_ms")
            return
        if self._response is not None and self._response.item is item:
            self._cancel(now, "turn_detected", played_ms=float(ev.audio_end_ms))
        else:
            self._truncate(item, float(ev.audio_end_ms))
        self._send("conversation.item.truncated", item_id=item.id,
                   content_index=ev.content_index, audio_end_ms=ev.audio_end_ms)

    def _on_ConversationItemDelete(self, ev: p.ConversationItemDelete, now: float) -> None:
        item = self._find(ev.item_id)
        if item is None:
            self._error("invalid_value", f"no item with id {ev.item_id!r}", ev.event_id,
                        "item_id")
            return
        if self._response is not None and self._response.item is item:
            self._error("invalid_value", "cannot delete the item of a response in progress",
                        ev.event_id, "item_id")
            return
        self._remove_item(item)

    def _on_ConversationItemRetrieve(self, ev: p.ConversationItemRetrieve, now: float) -> None:
        item = self._find(ev.item_id)
        if item is None:
            self._error("invalid_value", f"no item with id {ev.item_id!r}", ev.event_id,
                        "item_id")
            return
        self._send("conversation.item.retrieved", item=self._item_object(item))

    def _on_ResponseCreate(self, ev: p.ResponseCreate, now: float) -> None:
        if ev.conversation == "none":
            self._error("unsupported", "out-of-band responses (conversation: none) are not "
                        "supported; the reply would have to leave the cached conversation",
                        ev.event_id, "response.conversation")
            return
        if self._response is not None or self._response_wanted is not None:
            self._error("conversation_already_has_active_response",
                        "a response is already in progress", ev.event_id)
            return
        if self._pending_finals:
            self._response_wanted = ev  # starts once the transcript is in
            return
        self._start_response(TurnTimings(), ev)

    def _on_ResponseCancel(self, ev: p.ResponseCancel, now: float) -> None:
        r = self._response
        if r is None or (ev.response_id and ev.response_id != r.id):
            self._error("response_cancel_not_active", "there is no active response to cancel",
                        ev.event_id)
            return
        self._cancel(now, "client_cancelled")

    def _on_OutputAudioBufferClear(self, ev: p.OutputAudioBufferClear, now: float) -> None:
        if self._response is not None:
            self._cancel(now, "client_cancelled")
        self._send("output_audio_buffer.cleared")

    # ---- input audio -------------------------------------------------------------------------

    def audio(self, frame: np.ndarray, prob: float | None, arrival: float, now: float) -> None:
        """A frame of 16 kHz input audio, its speech probability (None without server VAD),
        and the wall time its bytes arrived."""
        self._buf.append(frame)
        self._pos += len(frame)
        self._arrivals.append((self._pos, arrival))
        if self._pos - self._buf_start > self.max_buffer:
            self._error("input_audio_buffer_overflow",
                        f"more than {self.max_buffer / RATE:.0f}s of input audio without a "
                        "commit; the buffer was cleared")
            self._drop_buffer(self._pos)
            self._turn = None
            self._unspeculate()
            if self._detector is not None:
                self._detector.reset()
            return
        if self._detector is None or prob is None:
            return
        for tev in self._detector.frame(prob, self._pos):
            if isinstance(tev, SpeechStarted):
                self._speech_started(tev.start, now)
            elif isinstance(tev, SilenceBegan) and self._turn is not None:
                self._turn.final_key = tev.speech_end
                self._transcribe(self._turn, self._pos, final=True, key=tev.speech_end)
            elif isinstance(tev, SpeechResumed) and self._turn is not None:
                self._turn.final_key = None
                self._turn.final_text = None
                self._unspeculate()
            elif isinstance(tev, SpeechStopped) and self._turn is not None:
                self._send("input_audio_buffer.speech_stopped",
                           audio_end_ms=tev.speech_end * 1000 // RATE, item_id=self._turn.item_id)
                self._endpoint(self._turn, tev.speech_end, now)
        turn = self._turn
        if (turn is not None and not turn.committed and self.partial_interval
                and not turn.partial_busy
                and self._pos - turn.last_partial_end >= self.partial_interval):
            turn.partial_busy = True
            turn.last_partial_end = self._pos
            self._transcribe(turn, self._pos, final=False, key=-1)
        if self._turn is None:  # bounded memory between turns
            td = self.config.turn_detection
            keep = (td.prefix_padding_ms if td else 0) * RATE // 1000 + int(
                KEEP_BEFORE_SPEECH_S * RATE)
            if self._pos - self._buf_start > 2 * keep:
                self._drop_buffer(self._pos - keep)

    def _speech_started(self, start: int, now: float) -> None:
        td = self.config.turn_detection
        assert td is not None
        start = max(self._buf_start, start - td.prefix_padding_ms * RATE // 1000)
        self._drop_buffer(start)
        if td.interrupt_response:
            self._barge_in(now)
        self._turn = UserTurn(p.new_id("item"), start, last_partial_end=start)
        self._send("input_audio_buffer.speech_started", audio_start_ms=start * 1000 // RATE,
                   item_id=self._turn.item_id)

    def _endpoint(self, turn: UserTurn, speech_end: int, now: float) -> None:
        turn.committed = True
        turn.timings.mark("speech_end", self._arrival_of(speech_end))
        turn.timings.mark("endpoint", now)
        prev = self.items[-1].id if self.items else None
        item = self._add_item(Item(turn.item_id, "user", "", audio=True, status="in_progress"))
        self._send("input_audio_buffer.committed", previous_item_id=prev, item_id=turn.item_id)
        self._send("conversation.item.added", previous_item_id=prev,
                   item=self._item_object(item))
        if turn.final_key != speech_end:
            turn.final_key = speech_end
            turn.final_text = None
            self._transcribe(turn, speech_end, final=True, key=speech_end)
        self._pending_finals.append(turn)
        self._turn = None
        self._drop_buffer(speech_end)
        if turn.final_text is not None:
            self._finish_transcript(turn)

    def transcript(self, item_id: str, text: str, *, final: bool, key: int, now: float) -> None:
        """The result of a `Transcribe` action."""
        turn = self._turn_of(item_id)
        if turn is None:
            return
        if not final:
            turn.partial_busy = False
            if turn.committed:
                return
            text = text.strip()
            if text.startswith(turn.partial_sent) and len(text) > len(turn.partial_sent):
                delta = text[len(turn.partial_sent):]
                if turn.partial_sent:
                    delta = delta if delta.startswith(" ") else " " + delta.lstrip()
                turn.partial_sent = text
                self._send("conversation.item.input_audio_transcription.delta",
                           item_id=item_id, content_index=0, delta=delta)
            return
        if key != turn.final_key:
            return  # made for a speech end that did not hold
        turn.final_text = text.strip()
        turn.final_at = now
        if turn.committed:
            self._finish_transcript(turn)
            return
        td = self.config.turn_detection
        if turn.final_text and self._response is None and td and td.create_response:
            self._speculate(turn.item_id, turn.final_text)
            if (self.speculative_reply and self._spec_reply is None
                    and self._response_wanted is None):
                spec = p.new_id("spec")
                self._spec_reply = spec
                self._llm.append(spec)  # generate() appends the reply, however far it gets
                self._out.append(SpeculateResponse(
                    spec, self._token_limit(None), "audio" in self.config.output_modalities))

    def transcription_failed(self, item_id: str, message: str, *, final: bool, key: int,
                             now: float) -> None:
        """A `Transcribe` action failed. A failed partial is forgotten; a failed final ends
        the user's item without a transcript and without a response."""
        turn = self._turn_of(item_id)
        if turn is None:
            return
        if not final:
            turn.partial_busy = False
            return
        if key != turn.final_key:
            return
        if not turn.committed:
            turn.final_key = None  # the endpoint will try again
            return
        self._pending_finals.remove(turn)
        item = self._find(turn.item_id)
        if item is not None:
            item.status = "incomplete"
            self._send("conversation.item.input_audio_transcription.failed", item_id=item.id,
                       content_index=0, error={"type": "server_error",
                                               "code": "transcription_failed",
                                               "message": message})
        self._response_wanted = None

    def _turn_of(self, item_id: str) -> UserTurn | None:
        """The user turn being captured or awaiting its transcript, by its item id."""
        if self._turn is not None and self._turn.item_id == item_id:
            return self._turn
        return next((t for t in self._pending_finals if t.item_id == item_id), None)

    def _finish_transcript(self, turn: UserTurn) -> None:
        assert turn.final_text is not None and turn.final_at is not None
        self._pending_finals.remove(turn)
        turn.timings.mark("asr_final", turn.final_at)
        item = self._find(turn.item_id)
        if item is None:  # deleted meanwhile
            return
        item.text = turn.final_text
        item.status = "completed"
        self._send("conversation.item.input_audio_transcription.completed",
                   item_id=item.id, content_index=0, transcript=item.text)
        self._send("conversation.item.done", previous_item_id=self._previous_id(item),
                   item=self._item_object(item))
        if not item.text:
            self._unspeculate()
            return  # noise or silence: nothing was said, nothing to answer
        self._to_llm(item)  # drops a speculative reply made for another text
        td = self.config.turn_detection
        wanted, self._response_wanted = self._response_wanted, None
        if self._response is None and (wanted is not None or (td and td.create_response)):
            self._start_response(turn.timings, wanted, adopt=wanted is None)

    def _transcribe(self, turn: UserTurn, end: int, *, final: bool, key: int) -> None:
        audio = self._slice(turn.start, end)
        self._out.append(Transcribe(turn.item_id, audio, final, key))

    # ---- responses ---------------------------------------------------------------------------

    def _start_response(self, timings: TurnTimings, req: p.ResponseCreate | None, *,
                        adopt: bool = False) -> None:
        """Start a response; with `adopt`, as the continuation of the speculative reply, if
        one is under way (else that one is dropped: it was made for other settings)."""
        spec = self._spec_reply if adopt else None
        if spec is None:
            self._drop_spec_reply()
        self._spec_reply = None
        modalities = (req.output_modalities if req and req.output_modalities
                      else self.config.output_modalities)
        audio = "audio" in modalities
        item = Item(p.new_id("item"), "assistant", "", audio=audio, status="in_progress")
        r = Response(p.new_id("resp"), item, audio, timings)
        self._response = r
        prev = self.items[-1].id if self.items else None
        self._add_item(item)
        self._send("response.created", response=self._response_object(r, "in_progress"))
        self._send("response.output_item.added", response_id=r.id, output_index=0,
                   item=self._item_object(item))
        self._send("conversation.item.added", previous_item_id=prev,
                   item=self._item_object(item))
        self._send("response.content_part.added", response_id=r.id, item_id=item.id,
                   output_index=0, content_index=0, part=self._part(r))
        limit = self._token_limit(req)
        if spec is not None:
            self._llm[self._llm.index(spec)] = item.id  # the reply it is generating
        else:
            self._llm.append(item.id)  # generate() appends the reply, however far it gets
        self._out.append(StartResponse(r.id, item.id, req.instructions if req else None,
                                       limit, audio, spec))

    def _token_limit(self, req: p.ResponseCreate | None) -> int:
        max_tokens = self.config.max_output_tokens
        if req is not None and req.max_output_tokens is not None:
            max_tokens = req.max_output_tokens
        if max_tokens in (None, "inf"):
            return self.max_response_tokens
        return min(int(max_tokens), self.max_response_tokens)

    def token(self, response_id: str, now: float) -> None:
        """The LLM produced a token of the response (only the first one is marked)."""
        if self._response and self._response.id == response_id:
            self._response.timings.mark("llm_first_token", now)

    def phrase(self, response_id: str, text: str, audio: bytes | None, audio_ms: float,
               now: float) -> None:
        """A phrase of the reply: its text and, for audio responses, its encoded audio."""
        r = self._response
        if r is None or r.id != response_id or r.status != "in_progress":
            return  # cancelled: nothing more reaches the client
        item = r.item
        kind = "output_audio_transcript" if r.audio else "output_text"
        self._send(f"response.{kind}.delta", response_id=r.id, item_id=item.id,
                   output_index=0, content_index=0, delta=text)
        if r.audio and audio:
            r.timings.mark("tts_first_audio", now)
            item.phrases.append((text, item.audio_ms, item.audio_ms + audio_ms))
            item.audio_ms += audio_ms
            if self.config.voicepipe.binary_audio:
                self._out.append(SendAudio(r.id, audio))
            else:
                self._send("response.output_audio.delta", response_id=r.id, item_id=item.id,
                           output_index=0, content_index=0,
                           delta=base64.b64encode(audio).decode("ascii"))
        item.text += text

    def audio_sent(self, response_id: str, now: float) -> None:
        """The adapter wrote audio of the response to the socket (possibly after the
        response ended: the adapter's writes lag behind the session's decisions)."""
        r = self._response
        ended = r is None or r.id != response_id
        if ended:
            r = self._unsent.pop(response_id, None)
        if r is None:
            return
        if r.item.first_audio_at is None:
            r.item.first_audio_at = now
            r.timings.mark("first_byte_sent", now)
        if ended:
            self._finish_turn(r)

    def _finish_turn(self, r: Response) -> None:
        t = r.timings
        if self.config.voicepipe.latency_events and t.marks:
            self._send("voicepipe.latency", response_id=r.id, item_id=r.item.id,
                       marks=dict(t.marks), derived_ms=t.derived_ms(),
                       llm={"prefill_tokens": t.prefill_tokens, "cached_tokens": t.cached_tokens,
                            "speculative_tokens": t.speculative_tokens,
                            "generated_tokens": t.generated_tokens})
        self._out.append(TurnFinished(r.id, r.final_status, t))

    def response_finished(self, response_id: str, *, prefill_tokens: int = 0,
                          cached_tokens: int = 0, generated_tokens: int = 0,
                          speculative_tokens: int = 0,
                          error: str | None = None, now: float) -> None:
        """The adapter's work for the response ended (done, cancelled or failed)."""
        r = self._response
        if r is None or r.id != response_id:
            return
        t = r.timings
        t.prefill_tokens, t.cached_tokens, t.generated_tokens = (
            prefill_tokens, cached_tokens, generated_tokens)
        t.speculative_tokens = speculative_tokens
        item = r.item
        if r.status == "cancelling":
            status = "cancelled"
            if r.kept_text is not None:
                item.text = r.kept_text
                item.audio_ms = min(item.audio_ms, r.kept_ms)
            details: dict[str, Any] = {"type": "cancelled", "reason": r.cancel_reason}
        elif error is not None:
            status = "failed"
            details = {"type": "failed", "error": {"type": "server_error", "code": "stage_failed",
                                                   "message": error}}
            self._error("stage_failed", error)
        else:
            status = "completed"
            details = {}
        item.status = "completed" if status == "completed" else "incomplete"
        if r.audio:
            self._send("response.output_audio.done", response_id=r.id, item_id=item.id,
                       output_index=0, content_index=0)
            self._send("response.output_audio_transcript.done", response_id=r.id,
                       item_id=item.id, output_index=0, content_index=0, transcript=item.text)
        else:
            self._send("response.output_text.done", response_id=r.id, item_id=item.id,
                       output_index=0, content_index=0, text=item.text)
        self._send("response.content_part.done", response_id=r.id, item_id=item.id,
                   output_index=0, content_index=0, part=self._part(r))
        self._send("response.output_item.done", response_id=r.id, output_index=0,
                   item=self._item_object(item))
        self._send("conversation.item.done", previous_item_id=self._previous_id(item),
                   item=self._item_object(item))
        obj = self._response_object(r, status)
        obj["status_details"] = details or None
        obj["usage"] = {"input_tokens": prefill_tokens + cached_tokens,
                        "output_tokens": generated_tokens,
                        "total_tokens": prefill_tokens + cached_tokens + generated_tokens,
                        "input_token_details": {"cached_tokens": cached_tokens}}
        self._send("response.done", response=obj)
        self._response = None
        r.final_status = status
        if item.audio_ms > 0 and item.first_audio_at is None:
            self._unsent[r.id] = r  # the turn's figures are complete once its audio left
        else:
            self._finish_turn(r)
        if self._response_wanted is not None and not self._pending_finals:
            wanted, self._response_wanted = self._response_wanted, None
            self._start_response(TurnTimings(), wanted)

    def _barge_in(self, now: float) -> None:
        r = self._response
        if r is not None:
            self._cancel(now, "turn_detected")
            return
        last = next((it for it in reversed(self.items) if it.role == "assistant"), None)
        if last is not None and last.audio and last.played_ms(now) < last.audio_ms - 40:
            played = last.played_ms(now)
            self._truncate(last, played)
            self._send("conversation.item.truncated", item_id=last.id, content_index=0,
                       audio_end_ms=int(played))

    def _cancel(self, now: float, reason: str, played_ms: float | None = None) -> None:
        r = self._response
        assert r is not None
        if r.status == "cancelling":
            return
        r.status = "cancelling"
        r.cancel_reason = reason
        played = r.item.played_ms(now) if played_ms is None else played_ms
        r.kept_text = r.item.text_at_ms(played) if r.audio else r.item.text
        r.kept_ms = played
        self._out.append(CancelResponse(r.id))
        self._out.append(TruncateMessage(r.item.id, r.kept_text))

    def _truncate(self, item: Item, played_ms: float) -> None:
        kept = item.text_at_ms(played_ms)
        item.audio_ms = min(item.audio_ms, played_ms)
        if kept == item.text:
            return
        item.text = kept
        # The LLM can cut its last assistant message only; an older reply keeps its text there.
        roles = {it.id: it.role for it in self.items}
        last = next((i for i in reversed(self._llm) if roles.get(i) == "assistant"), None)
        if last == item.id:
            self._out.append(TruncateMessage(item.id, kept))

    # ---- helpers -----------------------------------------------------------------------------

    def _add_item(self, item: Item) -> Item:
        self.items.append(item)
        # Bounded history: drop the oldest items (the system prompt is not an item and stays),
        # never one that a response or a transcription still works on.
        busy = {self._response.item.id} if self._response else set()
        busy |= {t.item_id for t in self._pending_finals}
        while len(self.items) > self.max_items:
            old = next((it for it in self.items if it.id not in busy and it is not item), None)
            if old is None:
                break
            self._remove_item(old)
        return item

    def _remove_item(self, item: Item) -> None:
        if self._speculated is not None and self._speculated[0] == item.id:
            self._drop_spec_reply()
        if item.id in self._llm:
            self._out.append(DeleteMessage(item.id, self._llm.index(item.id)))
            self._llm.remove(item.id)
            if self._speculated is not None and self._speculated[0] == item.id:
                self._speculated = None  # gone from the LLM with it
        self.items.remove(item)
        self._send("conversation.item.deleted", item_id=item.id)

    def _to_llm(self, item: Item) -> None:
        if self._speculated == (item.id, item.text) and item.role == "user":
            self._speculated = None  # the LLM already holds exactly this message
            return
        self._unspeculate()
        self._llm.append(item.id)
        self._out.append(AddMessage(item.id, item.role, item.text))

    def _speculate(self, item_id: str, text: str) -> None:
        if self._speculated == (item_id, text):
            return
        self._unspeculate()
        self._speculated = (item_id, text)
        self._llm.append(item_id)
        self._out.append(Prefill(item_id, text))

    def _unspeculate(self) -> None:
        """Roll back the speculative user message, wherever it is in the LLM's messages."""
        self._drop_spec_reply()  # its reply comes after it
        if self._speculated is None:
            return
        item_id = self._speculated[0]
        index = self._llm.index(item_id)  # the last, unless a response.create came since
        del self._llm[index]
        self._out.append(DeleteMessage(item_id, index))
        self._speculated = None

    def _drop_spec_reply(self) -> None:
        """Stop the speculative reply and remove it from the LLM's messages."""
        key, self._spec_reply = self._spec_reply, None
        if key is None:
            return
        index = self._llm.index(key)
        del self._llm[index]
        self._out.append(CancelSpeculation(key))
        self._out.append(DeleteMessage(key, index))

    def _find(self, item_id: str) -> Item | None:
        return next((it for it in self.items if it.id == item_id), None)

    def _previous_id(self, item: Item) -> str | None:
        i = self.items.index(item)
        return self.items[i - 1].id if i > 0 else None

    def _arrival_of(self, position: int) -> float:
        """Wall time at which the frame holding sample `position - 1` arrived. Searched from
        the newest: the positions asked about are recent, and the record holds 512 frames."""
        found = None
        for end, arrival in reversed(self._arrivals):
            if end < position:
                break
            found = arrival
        if found is not None:
            return found
        return self._arrivals[-1][1] if self._arrivals else 0.0

    def _slice(self, start: int, end: int) -> np.ndarray:
        audio = np.concatenate(self._buf) if self._buf else np.zeros(0, np.float32)
        if len(self._buf) > 1:
            self._buf = [audio]
        return audio[max(0, start - self._buf_start): max(0, end - self._buf_start)]

    def _drop_buffer(self, upto: int) -> None:
        if upto <= self._buf_start:
            return
        audio = np.concatenate(self._buf) if self._buf else np.zeros(0, np.float32)
        cut = min(len(audio), upto - self._buf_start)
        self._buf = [audio[cut:]] if cut < len(audio) else []
        self._buf_start += cut

    def _part(self, r: Response) -> dict[str, Any]:
        if r.audio:
            return {"type": "output_audio" if self.dialect is p.Dialect.GA else "audio",
                    "transcript": r.item.text}
        return {"type": "output_text" if self.dialect is p.Dialect.GA else "text",
                "text": r.item.text}

    def _item_object(self, item: Item) -> dict[str, Any]:
        ga = self.dialect is p.Dialect.GA
        if item.role == "user" and item.audio:
            content = [{"type": "input_audio",
                        "transcript": item.text if item.status == "completed" else None}]
        elif item.role == "assistant":
            if item.audio:
                content = [{"type": "output_audio" if ga else "audio", "transcript": item.text}]
            else:
                content = [{"type": "output_text" if ga else "text", "text": item.text}]
        else:
            content = [{"type": "input_text", "text": item.text}]
        return {"id": item.id, "object": "realtime.item", "type": "message",
                "status": item.status, "role": item.role, "content": content}

    def _response_object(self, r: Response, status: str) -> dict[str, Any]:
        return {"id": r.id, "object": "realtime.response", "status": status,
                "status_details": None,
                "output": [self._item_object(r.item)] if status != "in_progress" else [],
                "conversation_id": self.id,
                "output_modalities": ["audio"] if r.audio else ["text"],
                "usage": None}
