"""The OpenAI Realtime wire protocol: client events in, session configuration, error events out.

Pure data and validation, no I/O. `parse_client_event` turns one WebSocket text message into a
typed client event or raises `ProtocolError`, whose `to_event()` is the `error` server event to
send back. `SessionConfig` holds what `session.update` may change and renders the `session`
object of `session.created`/`session.updated`.

Two dialects exist. GA is the current API; BETA is the older one, chosen by a client that sends
the `OpenAI-Beta: realtime=v1` header. Client events are accepted in both shapes in either
dialect (their keys never collide); the dialect decides only the shape of what the server sends:
`SessionConfig.to_dict(dialect)` and `server_event_type(ga_name, dialect)`.

Unknown fields are ignored, so that clients written for newer API versions keep working; every
field voicepipe knows is validated, and an invalid `session.update` changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import copy
import enum
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AudioFormat",
    "ClientEvent",
    "ConversationItemCreate",
    "ConversationItemDelete",
    "ConversationItemRetrieve",
    "ConversationItemTruncate",
    "Dialect",
    "InputAudioBufferAppend",
    "InputAudioBufferClear",
    "InputAudioBufferCommit",
    "OutputAudioBufferClear",
    "ProtocolError",
    "ResponseCancel",
    "ResponseCreate",
    "SessionConfig",
    "SessionUpdate",
    "TurnDetection",
    "VoicepipeOptions",
    "dialect_from_header",
    "new_id",
    "parse_client_event",
    "server_event_type",
]

# OpenAI documents 15 MiB as the largest input_audio_buffer.append it accepts.
DEFAULT_MAX_MESSAGE_BYTES = 15 * 1024 * 1024

DEFAULT_INSTRUCTIONS = (
    "You are a helpful voice assistant. Your replies are spoken aloud, so answer briefly, in one "
    "to three short sentences, in plain conversational language. Do not use markdown, lists, "
    "emoji or special symbols, and spell out numbers and abbreviations the way they are said."
)


# --------------------------------------------------------------------------------------------
# Errors and ids


class ProtocolError(Exception):
    """A client event that voicepipe rejects; `to_event()` is the `error` event to send back."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        event_id: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (param {param})" if param else ""))
        self.code = code
        self.message = message
        self.event_id = event_id
        self.param = param

    def to_event(self) -> dict[str, Any]:
        return {
            "type": "error",
            "event_id": new_id("event"),
            "error": {
                "type": "invalid_request_error",
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "event_id": self.event_id,
            },
        }


_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Random bytes to id characters in one `bytes.translate`: every event carries a fresh id, and
# a turn's end sends a dozen events at once. (Bytes 248-255 wrap around, so eight characters
# are a little likelier: about 5.95 random bits a character, 130 an id.)
_ID_CHARS = bytes(ord(_ALPHABET[b % len(_ALPHABET)]) for b in range(256))


def new_id(prefix: str) -> str:
    """A fresh random id in OpenAI's style: `new_id("event")` -> `event_4fT0...` (22 chars)."""
    sep = "" if prefix.endswith("_") else "_"
    return prefix + sep + os.urandom(22).translate(_ID_CHARS).decode("ascii")


# --------------------------------------------------------------------------------------------
# Dialects and server event names


class Dialect(enum.Enum):
    GA = "ga"
    BETA = "beta"


def dialect_from_header(openai_beta: str | None) -> Dialect:
    """The dialect for a connection, from its `OpenAI-Beta` request header (None if absent)."""
    if openai_beta and any(
        part.strip().lower() == "realtime=v1" for part in openai_beta.split(",")
    ):
        return Dialect.BETA
    return Dialect.GA


# GA server event name -> beta name, for the names that differ. None: beta has no such event
# and it is not sent. `conversation.item.done` is dropped rather than mapped to
# `conversation.item.created`, because beta clients would then see every item created twice.
_BETA_SERVER_EVENTS: dict[str, str | None] = {
    "conversation.item.added": "conversation.item.created",
    "conversation.item.done": None,
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}


def server_event_type(ga_name: str, dialect: Dialect) -> str | None:
    """The name to send a GA server event under in `dialect`; None means: do not send it."""
    if dialect is Dialect.GA:
        return ga_name
    return _BETA_SERVER_EVENTS.get(ga_name, ga_name)


# --------------------------------------------------------------------------------------------
# Field validation helpers. `path` is the dotted field path reported as the error's `param`.


def _fail(code: str, message: str, path: str | None) -> ProtocolError:
    return ProtocolError(code, message, param=path)


def _str(value: Any, path: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _fail("invalid_value", f"{path} must be a string", path)
    if not allow_empty and not value:
        raise _fail("invalid_value", f"{path} must not be empty", path)
    return value


def _opt_str(value: Any, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail("invalid_value", f"{path} must be a boolean", path)
    return value


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail("invalid_value", f"{path} must be an integer", path)
    if not lo <= value <= hi:
        raise _fail("invalid_value", f"{path} must be between {lo} and {hi}", path)
    return value


def _number(value: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("invalid_value", f"{path} must be a number", path)
    if not lo <= value <= hi:  # also rejects NaN
        raise _fail("invalid_value", f"{path} must be between {lo} and {hi}", path)
    return float(value)


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail("invalid_value", f"{path} must be an object", path)
    return value


def _require(obj: dict[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise _fail("missing_field", f"missing required field {path}.{key}", f"{path}.{key}")
    return obj[key]


# --------------------------------------------------------------------------------------------
# Session configuration

Encoding = Literal["pcm16", "g711_ulaw", "g711_alaw"]
PCM16_RATES = (8000, 16000, 24000)
_GA_FORMAT_TYPES = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
_GA_FORMAT_NAMES = {v: k for k, v in _GA_FORMAT_TYPES.items()}


@dataclass(frozen=True)
class AudioFormat:
    """Wire audio format. PCM16 is little-endian mono at 8, 16 or 24 kHz; G.711 is 8 kHz."""

    encoding: Encoding = "pcm16"
    rate: int = 24000

    def __post_init__(self) -> None:
        if self.encoding == "pcm16":
            if self.rate not in PCM16_RATES:
                raise _fail("invalid_value", f"pcm16 rate must be one of {PCM16_RATES}", None)
        elif self.encoding in ("g711_ulaw", "g711_alaw"):
            if self.rate != 8000:
                raise _fail("invalid_value", "G.711 audio is always 8000 Hz", None)
        else:
            raise _fail("invalid_value", f"unknown audio encoding {self.encoding!r}", None)

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == "pcm16" else 1

    @classmethod
    def from_ga(cls, value: Any, path: str) -> AudioFormat:
        """From a GA format object: {"type": "audio/pcm", "rate": 24000} or {"type": "audio/pcmu"}."""
        obj = _obj(value, path)
        kind = _str(_require(obj, "type", path), f"{path}.type")
        if kind not in _GA_FORMAT_TYPES:
            raise _fail(
                "invalid_value", f"{path}.type must be one of {sorted(_GA_FORMAT_TYPES)}",
                f"{path}.type",
            )
        encoding = _GA_FORMAT_TYPES[kind]
        default_rate = 24000 if encoding == "pcm16" else 8000
        rate = obj.get("rate", default_rate)
        if isinstance(rate, bool) or not isinstance(rate, int):
            raise _fail("invalid_value", f"{path}.rate must be an integer", f"{path}.rate")
        try:
            return cls(encoding, rate)  # type: ignore[arg-type]
        except ProtocolError as e:
            raise _fail("invalid_value", e.message, f"{path}.rate") from None

    @classmethod
    def from_beta(cls, value: Any, path: str) -> AudioFormat:
        """From a beta format name: "pcm16" (24 kHz), "g711_ulaw" or "g711_alaw"."""
        name = _str(value, path)
        if name == "pcm16":
            return cls("pcm16", 24000)
        if name in ("g711_ulaw", "g711_alaw"):
            return cls(name, 8000)  # type: ignore[arg-type]
        raise _fail("invalid_value", f"{path} must be pcm16, g711_ulaw or g711_alaw", path)

    def to_ga(self) -> dict[str, Any]:
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": _GA_FORMAT_NAMES[self.encoding]}

    def to_beta(self) -> str:
        # Beta has no way to say 8 or 16 kHz PCM; a beta client cannot select them either.
        return self.encoding


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD settings. `semantic_vad` is not implemented and is rejected as unsupported."""

    type: Literal["server_vad"] = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        # Re-validate so that a TurnDetection built in code obeys the same limits as the wire.
        self._validate({k: getattr(self, k) for k in _TURN_FIELDS}, "turn_detection")

    @staticmethod
    def _validate(obj: dict[str, Any], path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        kind = obj.get("type", "server_vad")
        if kind == "semantic_vad":
            raise _fail(
                "unsupported", "semantic_vad is not supported; use server_vad", f"{path}.type"
            )
        if kind != "server_vad":
            raise _fail("invalid_value", f"{path}.type must be server_vad", f"{path}.type")
        out["type"] = kind
        if "threshold" in obj:
            out["threshold"] = _number(obj["threshold"], f"{path}.threshold", 0.0, 1.0)
        if "prefix_padding_ms" in obj:
            out["prefix_padding_ms"] = _int(
                obj["prefix_padding_ms"], f"{path}.prefix_padding_ms", 0, 5000
            )
        if "silence_duration_ms" in obj:
            out["silence_duration_ms"] = _int(
                obj["silence_duration_ms"], f"{path}.silence_duration_ms", 0, 10000
            )
        for key in ("create_response", "interrupt_response"):
            if key in obj:
                out[key] = _bool(obj[key], f"{path}.{key}")
        if obj.get("idle_timeout_ms") is not None:
            out["idle_timeout_ms"] = _int(
                obj["idle_timeout_ms"], f"{path}.idle_timeout_ms", 1000, 600_000
            )
        return out

    @classmethod
    def from_dict(cls, value: Any, path: str) -> TurnDetection | None:
        """A wire turn_detection object (or null). Fields left out take their defaults."""
        if value is None:
            return None
        return cls(**cls._validate(_obj(value, path), path))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _TURN_FIELDS}


_TURN_FIELDS = (
    "type", "threshold", "prefix_padding_ms", "silence_duration_ms",
    "create_response", "interrupt_response", "idle_timeout_ms",
)


@dataclass(frozen=True)
class VoicepipeOptions:
    """voicepipe's opt-in extensions, under the "voicepipe" key of the session object.

    latency_events: send a `voicepipe.latency` event after each response's first audio.
    binary_audio: send reply audio as binary WebSocket messages of raw PCM16 (at the output
    rate) instead of base64 in `response.output_audio.delta`.
    """

    latency_events: bool = False
    binary_audio: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"latency_events": self.latency_events, "binary_audio": self.binary_audio}


MaxTokens = int | Literal["inf"]
Modality = Literal["audio", "text"]


def _max_tokens(value: Any, path: str) -> MaxTokens:
    if value == "inf" and isinstance(value, str):
        return "inf"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail("invalid_value", f"{path} must be an integer or \"inf\"", path)
    return _int(value, path, 1, 4096)


def _modalities(value: Any, path: str) -> list[Modality]:
    """["audio"] or ["text"]. Beta's ["text", "audio"] (audio with its transcript) is ["audio"]."""
    if not isinstance(value, list) or not value:
        raise _fail("invalid_value", f"{path} must be a non-empty list", path)
    if any(m not in ("audio", "text") for m in value):
        raise _fail("invalid_value", f"{path} entries must be \"audio\" or \"text\"", path)
    return ["audio"] if "audio" in value else ["text"]


def _voice(value: Any, path: str) -> str:
    # GA also allows a custom voice object {"id": ...}. Whether the voice exists is the server's
    # question (it knows which TTS voices are installed), not the protocol's.
    if isinstance(value, dict):
        return _str(_require(value, "id", path), f"{path}.id", allow_empty=False)
    return _str(value, path, allow_empty=False)


def _transcription(value: Any, path: str) -> tuple[str | None, str | None]:
    """(model, language) from an audio transcription object, or (None, None) for null."""
    if value is None:
        return None, None
    obj = _obj(value, path)
    model = obj.get("model", "default")
    model = _str(model, f"{path}.model", allow_empty=False)
    language = _opt_str(obj.get("language"), f"{path}.language") or None
    _opt_str(obj.get("prompt"), f"{path}.prompt")
    return model, language


@dataclass
class SessionConfig:
    """What a client may configure with `session.update`, with voicepipe's defaults.

    input_transcription: the transcription model name the client asked for, or None. The
    server always transcribes (the LLM needs the text) with its own ASR whatever the name;
    this only decides whether `conversation.item.input_audio_transcription.*` events are sent.
    It defaults to on (unlike OpenAI) because those events cost nothing here and are what
    clients most want to see; a client can set `transcription: null` to turn them off.

    temperature: 0.0 (greedy) by default. A small model speaking short answers is most
    reliable greedy, and greedy decoding keeps replies reproducible for latency benchmarks.
    Accepted at the top level of the session object in both dialects (GA dropped the field).
    """

    instructions: str = DEFAULT_INSTRUCTIONS
    voice: str = "joe"
    speed: float = 1.0
    input_format: AudioFormat = field(default_factory=AudioFormat)
    output_format: AudioFormat = field(default_factory=AudioFormat)
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    input_transcription: str | None = "default"
    input_transcription_language: str | None = None
    output_modalities: list[Modality] = field(default_factory=lambda: ["audio"])
    temperature: float = 0.0
    max_output_tokens: MaxTokens = "inf"
    voicepipe: VoicepipeOptions = field(default_factory=VoicepipeOptions)

    def apply(self, patch: dict[str, Any], dialect: Dialect = Dialect.GA) -> None:
        """Validate a `session` object from `session.update` and apply it, all or nothing.

        Both the GA and the beta shape are accepted whatever `dialect` is (their keys never
        collide); `dialect` is kept so callers state which one they expect. Raises
        ProtocolError with `param` set to the offending field's path under "session".
        """
        del dialect
        updates = _session_updates(patch)
        if "voicepipe" in updates:
            updates["voicepipe"] = replace(self.voicepipe, **updates["voicepipe"])
        for name, value in updates.items():
            setattr(self, name, value)

    def copy(self) -> SessionConfig:
        return copy.deepcopy(self)

    def to_dict(
        self,
        dialect: Dialect = Dialect.GA,
        *,
        session_id: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """The `session` object of `session.created` / `session.updated` in `dialect`'s shape."""
        out: dict[str, Any] = {}
        if dialect is Dialect.GA:
            out["type"] = "realtime"
        out["object"] = "realtime.session"
        if session_id is not None:
            out["id"] = session_id
        if model is not None:
            out["model"] = model
        transcription = (
            None
            if self.input_transcription is None
            else {"model": self.input_transcription, "language": self.input_transcription_language}
        )
        turn = None if self.turn_detection is None else self.turn_detection.to_dict()
        if dialect is Dialect.GA:
            out.update({
                "output_modalities": list(self.output_modalities),
                "instructions": self.instructions,
                "audio": {
                    "input": {
                        "format": self.input_format.to_ga(),
                        "transcription": transcription,
                        "noise_reduction": None,
                        "turn_detection": turn,
                    },
                    "output": {
                        "format": self.output_format.to_ga(),
                        "voice": self.voice,
                        "speed": self.speed,
                    },
                },
                "max_output_tokens": self.max_output_tokens,
            })
        else:
            out.update({
                "modalities": ["text", "audio"] if "audio" in self.output_modalities else ["text"],
                "instructions": self.instructions,
                "voice": self.voice,
                "speed": self.speed,
                "input_audio_format": self.input_format.to_beta(),
                "output_audio_format": self.output_format.to_beta(),
                "input_audio_transcription": transcription,
                "input_audio_noise_reduction": None,
                "turn_detection": turn,
                "max_response_output_tokens": self.max_output_tokens,
            })
        out["temperature"] = self.temperature
        out["tools"] = []
        out["tool_choice"] = "auto"
        out["voicepipe"] = self.voicepipe.to_dict()
        return out


def _session_updates(patch: Any) -> dict[str, Any]:
    """Validate a session patch (GA or beta shape) into {SessionConfig field: new value}."""
    p = _obj(patch, "session")
    up: dict[str, Any] = {}

    kind = p.get("type")
    if kind is not None and kind != "realtime":
        if kind == "transcription":
            raise _fail("unsupported", "transcription sessions are not supported", "session.type")
        raise _fail("invalid_value", "session.type must be \"realtime\"", "session.type")

    if "instructions" in p:
        up["instructions"] = _str(p["instructions"], "session.instructions")
    if "temperature" in p:
        up["temperature"] = _number(p["temperature"], "session.temperature", 0.0, 2.0)
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in p:
            up["max_output_tokens"] = _max_tokens(p[key], f"session.{key}")
    for key in ("output_modalities", "modalities"):
        if key in p:
            up["output_modalities"] = _modalities(p[key], f"session.{key}")

    # Beta shape: flat keys.
    if "voice" in p:
        up["voice"] = _voice(p["voice"], "session.voice")
    if "speed" in p:
        up["speed"] = _number(p["speed"], "session.speed", 0.25, 1.5)
    if "input_audio_format" in p:
        up["input_format"] = AudioFormat.from_beta(p["input_audio_format"], "session.input_audio_format")
    if "output_audio_format" in p:
        up["output_format"] = AudioFormat.from_beta(
            p["output_audio_format"], "session.output_audio_format"
        )
    if "turn_detection" in p:
        up["turn_detection"] = TurnDetection.from_dict(p["turn_detection"], "session.turn_detection")
    if "input_audio_transcription" in p:
        model, lang = _transcription(p["input_audio_transcription"], "session.input_audio_transcription")
        up["input_transcription"], up["input_transcription_language"] = model, lang

    # GA shape: nested under "audio".
    if "audio" in p:
        audio = _obj(p["audio"], "session.audio")
        if "input" in audio:
            a_in = _obj(audio["input"], "session.audio.input")
            if "format" in a_in:
                up["input_format"] = AudioFormat.from_ga(a_in["format"], "session.audio.input.format")
            if "turn_detection" in a_in:
                up["turn_detection"] = TurnDetection.from_dict(
                    a_in["turn_detection"], "session.audio.input.turn_detection"
                )
            if "transcription" in a_in:
                model, lang = _transcription(a_in["transcription"], "session.audio.input.transcription")
                up["input_transcription"], up["input_transcription_language"] = model, lang
        if "output" in audio:
            a_out = _obj(audio["output"], "session.audio.output")
            if "format" in a_out:
                up["output_format"] = AudioFormat.from_ga(a_out["format"], "session.audio.output.format")
            if "voice" in a_out:
                up["voice"] = _voice(a_out["voice"], "session.audio.output.voice")
            if "speed" in a_out:
                up["speed"] = _number(a_out["speed"], "session.audio.output.speed", 0.25, 1.5)

    if "voicepipe" in p:
        vp = _obj(p["voicepipe"], "session.voicepipe")
        flags = {
            key: _bool(vp[key], f"session.voicepipe.{key}")
            for key in ("latency_events", "binary_audio")
            if key in vp
        }
        up["voicepipe"] = flags  # merged into the current options by SessionConfig.apply
    return up


# --------------------------------------------------------------------------------------------
# Client events


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    session: dict[str, Any]  # validated: SessionConfig.apply() on it cannot fail


@dataclass(frozen=True)
class InputAudioBufferAppend:
    event_id: str | None
    audio: bytes  # decoded, in the session's input format


@dataclass(frozen=True)
class InputAudioBufferCommit:
    event_id: str | None


@dataclass(frozen=True)
class InputAudioBufferClear:
    event_id: str | None


@dataclass(frozen=True)
class ConversationItemCreate:
    event_id: str | None
    previous_item_id: str | None  # None: append at the end; "root": insert at the start
    item_id: str | None  # None: the server assigns one
    role: Literal["user", "assistant", "system"]
    text: str


@dataclass(frozen=True)
class ConversationItemTruncate:
    event_id: str | None
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass(frozen=True)
class ConversationItemDelete:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ConversationItemRetrieve:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ResponseCreate:
    event_id: str | None
    instructions: str | None = None  # None: the session's
    output_modalities: list[Modality] | None = None
    max_output_tokens: MaxTokens | None = None
    conversation: Literal["auto", "none"] = "auto"  # "none": out-of-band, not added to history


@dataclass(frozen=True)
class ResponseCancel:
    event_id: str | None
    response_id: str | None = None  # None: the response in progress


@dataclass(frozen=True)
class OutputAudioBufferClear:
    event_id: str | None


ClientEvent = (
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ConversationItemTruncate
    | ConversationItemDelete
    | ConversationItemRetrieve
    | ResponseCreate
    | ResponseCancel
    | OutputAudioBufferClear
)

# OpenAI client events voicepipe knows of but does not implement.
_UNSUPPORTED_EVENTS = {"transcription_session.update"}

# Content part types whose text voicepipe takes, by role. Audio parts count by their transcript.
_TEXT_PARTS = {"input_text", "text", "output_text"}
_TRANSCRIPT_PARTS = {"input_audio", "audio", "output_audio"}


def _parse_session_update(ev: dict[str, Any], eid: str | None) -> SessionUpdate:
    session = _require(ev, "session", "event")
    _session_updates(session)  # validate only; the server applies it to its own config
    return SessionUpdate(eid, session)


def _parse_append(ev: dict[str, Any], eid: str | None) -> InputAudioBufferAppend:
    audio = _require(ev, "audio", "event")
    if not isinstance(audio, str):
        raise _fail("invalid_audio", "audio must be a base64 string", "audio")
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise _fail("invalid_audio", "audio is not valid base64", "audio") from None
    return InputAudioBufferAppend(eid, data)


def _item_text(content: Any) -> str:
    if not isinstance(content, list):
        raise _fail("invalid_value", "item.content must be a list", "item.content")
    texts = []
    for i, part in enumerate(content):
        path = f"item.content[{i}]"
        part = _obj(part, path)
        kind = _str(_require(part, "type", path), f"{path}.type")
        if kind in _TEXT_PARTS:
            texts.append(_str(_require(part, "text", path), f"{path}.text"))
        elif kind in _TRANSCRIPT_PARTS and isinstance(part.get("transcript"), str):
            texts.append(part["transcript"])
        elif kind in _TRANSCRIPT_PARTS or kind == "input_image":
            raise _fail(
                "unsupported", f"{kind} content is only supported with a text transcript",
                f"{path}.type",
            )
        else:
            raise _fail("invalid_value", f"unknown content type {kind!r}", f"{path}.type")
    return "\n".join(texts)


def _parse_item_create(ev: dict[str, Any], eid: str | None) -> ConversationItemCreate:
    item = _obj(_require(ev, "item", "event"), "item")
    previous = _opt_str(ev.get("previous_item_id"), "previous_item_id")
    kind = item.get("type", "message")
    if kind != "message":
        if kind in ("function_call", "function_call_output", "mcp_approval_response"):
            raise _fail("unsupported", f"{kind} items are not supported", "item.type")
        raise _fail("invalid_value", "item.type must be \"message\"", "item.type")
    role = _require(item, "role", "item")
    if role not in ("user", "assistant", "system"):
        raise _fail("invalid_value", "item.role must be user, assistant or system", "item.role")
    item_id = _opt_str(item.get("id"), "item.id") or None
    text = _item_text(_require(item, "content", "item"))
    return ConversationItemCreate(eid, previous, item_id, role, text)


def _parse_truncate(ev: dict[str, Any], eid: str | None) -> ConversationItemTruncate:
    item_id = _str(_require(ev, "item_id", "event"), "item_id", allow_empty=False)
    content_index = _int(ev.get("content_index", 0), "content_index", 0, 1 << 20)
    audio_end_ms = _int(_require(ev, "audio_end_ms", "event"), "audio_end_ms", 0, 1 << 40)
    return ConversationItemTruncate(eid, item_id, content_index, audio_end_ms)


def _parse_item_id(ev: dict[str, Any]) -> str:
    return _str(_require(ev, "item_id", "event"), "item_id", allow_empty=False)


def _parse_response_create(ev: dict[str, Any], eid: str | None) -> ResponseCreate:
    r = ev.get("response")
    if r is None:
        return ResponseCreate(eid)
    r = _obj(r, "response")
    if r.get("input") is not None:
        raise _fail("unsupported", "response.input is not supported", "response.input")
    instructions = _opt_str(r.get("instructions"), "response.instructions")
    modalities = None
    for key in ("output_modalities", "modalities"):
        if r.get(key) is not None:
            modalities = _modalities(r[key], f"response.{key}")
    max_tokens = None
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if r.get(key) is not None:
            max_tokens = _max_tokens(r[key], f"response.{key}")
    conversation = r.get("conversation", "auto")
    if conversation not in ("auto", "none"):
        raise _fail(
            "invalid_value", "response.conversation must be \"auto\" or \"none\"",
            "response.conversation",
        )
    return ResponseCreate(eid, instructions, modalities, max_tokens, conversation)


def _parse_response_cancel(ev: dict[str, Any], eid: str | None) -> ResponseCancel:
    return ResponseCancel(eid, _opt_str(ev.get("response_id"), "response_id") or None)


_PARSERS: dict[str, Callable[[dict[str, Any], str | None], ClientEvent]] = {
    "session.update": _parse_session_update,
    "input_audio_buffer.append": _parse_append,
    "input_audio_buffer.commit": lambda ev, eid: InputAudioBufferCommit(eid),
    "input_audio_buffer.clear": lambda ev, eid: InputAudioBufferClear(eid),
    "conversation.item.create": _parse_item_create,
    "conversation.item.truncate": _parse_truncate,
    "conversation.item.delete": lambda ev, eid: ConversationItemDelete(eid, _parse_item_id(ev)),
    "conversation.item.retrieve": lambda ev, eid: ConversationItemRetrieve(eid, _parse_item_id(ev)),
    "response.create": _parse_response_create,
    "response.cancel": _parse_response_cancel,
    "output_audio_buffer.clear": lambda ev, eid: OutputAudioBufferClear(eid),
}


def parse_client_event(
    raw: str | bytes | dict[str, Any], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> ClientEvent:
    """Parse and validate one client event; raise ProtocolError for anything invalid.

    `raw` is the text of a WebSocket message (str or UTF-8 bytes) or an already-decoded dict.
    Client event names are the same in GA and beta; field shapes of both are accepted.
    Unknown fields are ignored; every known field is checked.
    """
    if isinstance(raw, dict):
        ev: Any = raw
    else:
        size = len(raw) if isinstance(raw, bytes) or raw.isascii() else len(raw.encode())
        if size > max_bytes:
            raise ProtocolError(
                "message_too_large", f"message of {size} bytes exceeds the limit of {max_bytes}"
            )
        try:
            ev = json.loads(raw)
        except (ValueError, RecursionError):
            # ValueError covers JSONDecodeError and UnicodeDecodeError for bytes.
            raise ProtocolError("invalid_json", "message is not valid JSON") from None
    if not isinstance(ev, dict):
        raise ProtocolError("invalid_json", "an event must be a JSON object")

    eid = ev.get("event_id")
    if eid is not None and not isinstance(eid, str):
        raise ProtocolError("invalid_value", "event_id must be a string", param="event_id")
    if "type" not in ev:
        raise ProtocolError("missing_field", "missing event type", event_id=eid, param="type")
    kind = ev["type"]
    if not isinstance(kind, str):
        raise ProtocolError("invalid_value", "type must be a string", event_id=eid, param="type")
    parser = _PARSERS.get(kind)
    if parser is None:
        if kind in _UNSUPPORTED_EVENTS:
            raise ProtocolError("unsupported", f"{kind} is not supported", event_id=eid, param="type")
        raise ProtocolError("unknown_event", f"unknown event type {kind!r}", event_id=eid, param="type")
    try:
        return parser(ev, eid)
    except ProtocolError as e:
        e.event_id = eid
        raise
