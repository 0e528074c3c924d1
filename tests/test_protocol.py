"""The wire protocol: client events in both dialects, bad input, session configuration."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicepipe import protocol as p

MAX = p.DEFAULT_MAX_MESSAGE_BYTES


def parse(event: dict[str, Any]) -> p.ClientEvent:
    return p.parse_client_event(json.dumps(event), max_bytes=MAX)


def error_of(raw: Any, max_bytes: int = MAX) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_event(raw, max_bytes=max_bytes)
    return info.value


# -- every client event -----------------------------------------------------------------------

VALID_EVENTS: list[dict[str, Any]] = [
    {"type": "session.update", "event_id": "e1", "session": {"type": "realtime", "instructions": "Hi"}},
    {"type": "input_audio_buffer.append", "event_id": "e2", "audio": base64.b64encode(b"\x01\x02").decode()},
    {"type": "input_audio_buffer.commit", "event_id": "e3"},
    {"type": "input_audio_buffer.clear", "event_id": "e4"},
    {
        "type": "conversation.item.create", "event_id": "e5", "previous_item_id": "item_a",
        "item": {"id": "item_b", "type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Hello"}]},
    },
    {"type": "conversation.item.truncate", "event_id": "e6", "item_id": "item_b",
     "content_index": 0, "audio_end_ms": 1500},
    {"type": "conversation.item.delete", "event_id": "e7", "item_id": "item_b"},
    {"type": "conversation.item.retrieve", "event_id": "e8", "item_id": "item_b"},
    {"type": "response.create", "event_id": "e9"},
    {"type": "response.cancel", "event_id": "e10", "response_id": "resp_1"},
    {"type": "output_audio_buffer.clear", "event_id": "e11"},
]


def test_every_client_event_parses_to_its_type() -> None:
    got = [parse(ev) for ev in VALID_EVENTS]
    assert got == [
        p.SessionUpdate("e1", {"type": "realtime", "instructions": "Hi"}),
        p.InputAudioBufferAppend("e2", b"\x01\x02"),
        p.InputAudioBufferCommit("e3"),
        p.InputAudioBufferClear("e4"),
        p.ConversationItemCreate("e5", "item_a", "item_b", "user", "Hello"),
        p.ConversationItemTruncate("e6", "item_b", 0, 1500),
        p.ConversationItemDelete("e7", "item_b"),
        p.ConversationItemRetrieve("e8", "item_b"),
        p.ResponseCreate("e9"),
        p.ResponseCancel("e10", "resp_1"),
        p.OutputAudioBufferClear("e11"),
    ]


def test_bytes_and_dicts_are_accepted_and_event_id_is_optional() -> None:
    assert p.parse_client_event(b'{"type": "input_audio_buffer.commit"}', max_bytes=MAX) == (
        p.InputAudioBufferCommit(None)
    )
    assert p.parse_client_event({"type": "response.cancel"}, max_bytes=MAX) == p.ResponseCancel(None)


def test_unknown_fields_are_ignored() -> None:
    ev = parse({"type": "input_audio_buffer.commit", "event_id": "e", "future_field": [1, 2]})
    assert ev == p.InputAudioBufferCommit("e")


def test_assistant_and_system_items_and_beta_content_types() -> None:
    ev = parse({"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": "Sure."}, {"type": "output_text", "text": "Done."}]}})
    assert isinstance(ev, p.ConversationItemCreate)
    assert (ev.role, ev.text, ev.item_id, ev.previous_item_id) == ("assistant", "Sure.\nDone.", None, None)
    ev = parse({"type": "conversation.item.create", "item": {
        "role": "system", "content": [{"type": "input_text", "text": "Be terse."}]}})
    assert isinstance(ev, p.ConversationItemCreate) and ev.role == "system"
    # Audio parts count by their transcript.
    ev = parse({"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "output_audio", "transcript": "Said aloud."}]}})
    assert isinstance(ev, p.ConversationItemCreate) and ev.text == "Said aloud."


def test_response_create_in_ga_and_beta_shapes() -> None:
    ga = parse({"type": "response.create", "response": {
        "instructions": "Shout", "output_modalities": ["text"], "max_output_tokens": 50,
        "conversation": "none"}})
    beta = parse({"type": "response.create", "response": {
        "instructions": "Shout", "modalities": ["text"], "max_response_output_tokens": 50,
        "conversation": "none"}})
    assert ga == beta == p.ResponseCreate(None, "Shout", ["text"], 50, "none")
    ev = parse({"type": "response.create", "response": {"modalities": ["text", "audio"],
                                                        "max_response_output_tokens": "inf"}})
    assert ev == p.ResponseCreate(None, None, ["audio"], "inf", "auto")


def test_session_update_in_beta_shape() -> None:
    session = {"modalities": ["text"], "input_audio_format": "g711_ulaw", "voice": "joe",
               "turn_detection": None, "temperature": 0.7}
    assert parse({"type": "session.update", "session": session}) == p.SessionUpdate(None, session)


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ('"text"', "invalid_json", None),
        ('{"event_id": "x"}', "missing_field", "type"),
        ('{"type": 7}', "invalid_value", "type"),
        ('{"type": "session.delete"}', "unknown_event", "type"),
        ('{"type": "transcription_session.update"}', "unsupported", "type"),
        ('{"type": "input_audio_buffer.commit", "event_id": 5}', "invalid_value", "event_id"),
    ],
)
def test_malformed_messages(raw: Any, code: str, param: str | None) -> None:
    err = error_of(raw)
    assert (err.code, err.param) == (code, param)


def test_oversized_message() -> None:
    msg = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 100})
    assert error_of(msg, max_bytes=50).code == "message_too_large"
    assert error_of(msg.encode(), max_bytes=50).code == "message_too_large"
    # Non-ASCII text is measured in UTF-8 bytes, not characters.
    text = json.dumps({"type": "input_audio_buffer.commit", "x": "é" * 30}, ensure_ascii=False)
    assert len(text) < 90 < len(text.encode())
    assert error_of(text, max_bytes=90).code == "message_too_large"


BAD_EVENTS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"type": "input_audio_buffer.append", "audio": "***"}, "invalid_audio", "audio"),
    ({"type": "input_audio_buffer.append", "audio": "AAA"}, "invalid_audio", "audio"),
    ({"type": "input_audio_buffer.append", "audio": 12}, "invalid_audio", "audio"),
    ({"type": "input_audio_buffer.append"}, "missing_field", "event.audio"),
    ({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": -1},
     "invalid_value", "audio_end_ms"),
    ({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": 1.5},
     "invalid_value", "audio_end_ms"),
    ({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": True},
     "invalid_value", "audio_end_ms"),
    ({"type": "conversation.item.truncate", "item_id": "i"}, "missing_field", "event.audio_end_ms"),
    ({"type": "conversation.item.truncate", "audio_end_ms": 5}, "missing_field", "event.item_id"),
    ({"type": "conversation.item.truncate", "item_id": "i", "content_index": -1, "audio_end_ms": 5},
     "invalid_value", "content_index"),
    ({"type": "conversation.item.delete", "item_id": ""}, "invalid_value", "item_id"),
    ({"type": "conversation.item.retrieve", "item_id": None}, "invalid_value", "item_id"),
    ({"type": "conversation.item.create"}, "missing_field", "event.item"),
    ({"type": "conversation.item.create", "item": "hello"}, "invalid_value", "item"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "{}"}},
     "unsupported", "item.type"),
    ({"type": "conversation.item.create", "item": {"type": "banana"}}, "invalid_value", "item.type"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "tool", "content": []}},
     "invalid_value", "item.role"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user"}},
     "missing_field", "item.content"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
      "content": [{"type": "input_audio", "audio": "AAAA"}]}}, "unsupported", "item.content[0].type"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
      "content": [{"type": "input_text", "text": 3}]}}, "invalid_value", "item.content[0].text"),
    ({"type": "conversation.item.create", "previous_item_id": 4, "item": {
      "type": "message", "role": "user", "content": []}}, "invalid_value", "previous_item_id"),
    ({"type": "response.create", "response": []}, "invalid_value", "response"),
    ({"type": "response.create", "response": {"conversation": "other"}},
     "invalid_value", "response.conversation"),
    ({"type": "response.create", "response": {"max_output_tokens": 0}},
     "invalid_value", "response.max_output_tokens"),
    ({"type": "response.create", "response": {"output_modalities": ["video"]}},
     "invalid_value", "response.output_modalities"),
    ({"type": "response.create", "response": {"input": []}}, "unsupported", "response.input"),
    ({"type": "response.cancel", "response_id": 1}, "invalid_value", "response_id"),
    ({"type": "session.update"}, "missing_field", "event.session"),
    ({"type": "session.update", "session": {"type": "transcription"}}, "unsupported", "session.type"),
    ({"type": "session.update", "session": {"temperature": "hot"}}, "invalid_value",
     "session.temperature"),
]


@pytest.mark.parametrize(("event", "code", "param"), BAD_EVENTS)
def test_bad_events_name_the_code_field_and_client_event(
    event: dict[str, Any], code: str, param: str | None
) -> None:
    err = error_of(json.dumps({**event, "event_id": "evt_42"}))
    assert (err.code, err.param, err.event_id) == (code, param, "evt_42")


def test_error_event_shape() -> None:
    err = error_of('{"type": "conversation.item.delete", "event_id": "evt_7"}')
    ev = err.to_event()
    assert ev["type"] == "error" and ev["event_id"].startswith("event_")
    assert ev["event_id"] != "evt_7"
    assert ev["error"] == {
        "type": "invalid_request_error", "code": "missing_field", "message": err.message,
        "param": "event.item_id", "event_id": "evt_7",
    }
    json.dumps(ev)


def test_new_id() -> None:
    ids = {p.new_id("item") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("item_") and i[5:].isalnum() and len(i) == 27 for i in ids)
    assert p.new_id("resp_").startswith("resp_") and "__" not in p.new_id("resp_")


# -- dialects -------------------------------------------------------------------------------------

def test_server_event_names() -> None:
    ga, beta = p.Dialect.GA, p.Dialect.BETA
    assert p.server_event_type("response.output_audio.delta", ga) == "response.output_audio.delta"
    pairs = {
        "response.output_audio.delta": "response.audio.delta",
        "response.output_audio.done": "response.audio.done",
        "response.output_audio_transcript.delta": "response.audio_transcript.delta",
        "response.output_audio_transcript.done": "response.audio_transcript.done",
        "response.output_text.delta": "response.text.delta",
        "response.output_text.done": "response.text.done",
        "conversation.item.added": "conversation.item.created",
        "response.done": "response.done",
        "input_audio_buffer.speech_started": "input_audio_buffer.speech_started",
    }
    for ga_name, beta_name in pairs.items():
        assert p.server_event_type(ga_name, beta) == beta_name
    assert p.server_event_type("conversation.item.done", beta) is None


def test_dialect_from_header() -> None:
    assert p.dialect_from_header(None) is p.Dialect.GA
    assert p.dialect_from_header("") is p.Dialect.GA
    assert p.dialect_from_header("realtime=v1") is p.Dialect.BETA
    assert p.dialect_from_header("assistants=v2, Realtime=V1") is p.Dialect.BETA


# -- session configuration ------------------------------------------------------------------------

def test_defaults() -> None:
    c = p.SessionConfig()
    assert c.voice == "joe" and c.temperature == 0.0 and c.max_output_tokens == "inf"
    assert c.input_format == c.output_format == p.AudioFormat("pcm16", 24000)
    assert c.turn_detection == p.TurnDetection()
    assert c.output_modalities == ["audio"]
    assert c.input_transcription is not None
    assert c.voicepipe == p.VoicepipeOptions(latency_events=False, binary_audio=False)
    assert "markdown" in c.instructions


def test_apply_ga_shape() -> None:
    c = p.SessionConfig()
    c.apply({
        "type": "realtime",
        "instructions": "Be a pirate.",
        "output_modalities": ["text"],
        "max_output_tokens": 200,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 16000},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 300,
                                   "threshold": 0.7, "idle_timeout_ms": 6000},
                "transcription": {"model": "whisper-1", "language": "de"},
            },
            "output": {"format": {"type": "audio/pcmu"}, "voice": {"id": "amy"}, "speed": 1.2},
        },
        "voicepipe": {"latency_events": True},
    }, p.Dialect.GA)
    assert c.instructions == "Be a pirate." and c.output_modalities == ["text"]
    assert c.max_output_tokens == 200
    assert c.input_format == p.AudioFormat("pcm16", 16000)
    assert c.output_format == p.AudioFormat("g711_ulaw", 8000)
    assert c.turn_detection == p.TurnDetection(threshold=0.7, silence_duration_ms=300,
                                               idle_timeout_ms=6000)
    assert (c.input_transcription, c.input_transcription_language) == ("whisper-1", "de")
    assert (c.voice, c.speed) == ("amy", 1.2)
    assert c.voicepipe == p.VoicepipeOptions(latency_events=True)
    # Partial voicepipe patches keep the other flags.
    c.apply({"voicepipe": {"binary_audio": True}})
    assert c.voicepipe == p.VoicepipeOptions(latency_events=True, binary_audio=True)
    c.apply({"audio": {"input": {"turn_detection": None, "transcription": None}}})
    assert c.turn_detection is None and c.input_transcription is None


def test_apply_beta_shape() -> None:
    c = p.SessionConfig()
    c.apply({
        "modalities": ["text", "audio"], "instructions": "x", "voice": "amy",
        "input_audio_format": "g711_alaw", "output_audio_format": "pcm16",
        "turn_detection": {"type": "server_vad", "prefix_padding_ms": 100},
        "input_audio_transcription": {"model": "whisper-1"},
        "temperature": 0.9, "max_response_output_tokens": "inf",
    }, p.Dialect.BETA)
    assert c.output_modalities == ["audio"] and c.voice == "amy" and c.temperature == 0.9
    assert c.input_format == p.AudioFormat("g711_alaw", 8000)
    assert c.output_format == p.AudioFormat("pcm16", 24000)
    assert c.turn_detection == p.TurnDetection(prefix_padding_ms=100)
    assert c.input_transcription == "whisper-1"


INVALID_PATCHES: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "conversation"}, "invalid_value", "session.type"),
    ({"instructions": 5}, "invalid_value", "session.instructions"),
    ({"temperature": 2.5}, "invalid_value", "session.temperature"),
    ({"temperature": True}, "invalid_value", "session.temperature"),
    ({"max_output_tokens": 5000}, "invalid_value", "session.max_output_tokens"),
    ({"max_output_tokens": "lots"}, "invalid_value", "session.max_output_tokens"),
    ({"output_modalities": []}, "invalid_value", "session.output_modalities"),
    ({"modalities": "audio"}, "invalid_value", "session.modalities"),
    ({"voice": ""}, "invalid_value", "session.voice"),
    ({"input_audio_format": "mp3"}, "invalid_value", "session.input_audio_format"),
    ({"audio": []}, "invalid_value", "session.audio"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}},
     "invalid_value", "session.audio.input.format.rate"),
    ({"audio": {"input": {"format": {"type": "audio/pcmu", "rate": 16000}}}},
     "invalid_value", "session.audio.input.format.rate"),
    ({"audio": {"input": {"format": {"type": "audio/opus"}}}},
     "invalid_value", "session.audio.input.format.type"),
    ({"audio": {"input": {"format": {"rate": 24000}}}},
     "missing_field", "session.audio.input.format.type"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
     "unsupported", "session.audio.input.turn_detection.type"),
    ({"audio": {"input": {"turn_detection": {"threshold": 1.5}}}},
     "invalid_value", "session.audio.input.turn_detection.threshold"),
    ({"turn_detection": {"silence_duration_ms": -1}},
     "invalid_value", "session.turn_detection.silence_duration_ms"),
    ({"turn_detection": {"silence_duration_ms": 250.5}},
     "invalid_value", "session.turn_detection.silence_duration_ms"),
    ({"turn_detection": {"prefix_padding_ms": 60_000}},
     "invalid_value", "session.turn_detection.prefix_padding_ms"),
    ({"turn_detection": {"create_response": "yes"}},
     "invalid_value", "session.turn_detection.create_response"),
    ({"turn_detection": {"idle_timeout_ms": 10}},
     "invalid_value", "session.turn_detection.idle_timeout_ms"),
    ({"audio": {"output": {"speed": 3}}}, "invalid_value", "session.audio.output.speed"),
    ({"audio": {"input": {"transcription": {"model": ""}}}},
     "invalid_value", "session.audio.input.transcription.model"),
    ({"voicepipe": {"binary_audio": 1}}, "invalid_value", "session.voicepipe.binary_audio"),
    ({"voicepipe": True}, "invalid_value", "session.voicepipe"),
]


@pytest.mark.parametrize(("patch", "code", "param"), INVALID_PATCHES)
def test_invalid_patch_changes_nothing(patch: dict[str, Any], code: str, param: str) -> None:
    c = p.SessionConfig()
    before = c.copy()
    # A valid field before the invalid one must not be applied either.
    with pytest.raises(p.ProtocolError) as info:
        c.apply({"instructions": "changed", **patch})
    assert (info.value.code, info.value.param) == (code, param)
    assert c == before
    # And parse_client_event rejects the same session.update up front.
    err = error_of(json.dumps({"type": "session.update", "event_id": "u1", "session": patch}))
    assert (err.code, err.param, err.event_id) == (code, param, "u1")


def test_code_built_values_are_validated_too() -> None:
    with pytest.raises(p.ProtocolError):
        p.AudioFormat("pcm16", 44100)
    with pytest.raises(p.ProtocolError):
        p.AudioFormat("g711_ulaw", 24000)
    with pytest.raises(p.ProtocolError):
        p.TurnDetection(threshold=2.0)
    assert p.AudioFormat("pcm16", 8000).bytes_per_sample == 2
    assert p.AudioFormat("g711_alaw", 8000).bytes_per_sample == 1


def test_to_dict_ga() -> None:
    c = p.SessionConfig()
    c.apply({"audio": {"input": {"format": {"type": "audio/pcma"}}}})
    d = c.to_dict(p.Dialect.GA, session_id="sess_1", model="smollm2")
    assert d["type"] == "realtime" and d["object"] == "realtime.session"
    assert (d["id"], d["model"]) == ("sess_1", "smollm2")
    assert d["output_modalities"] == ["audio"] and d["max_output_tokens"] == "inf"
    assert d["audio"]["input"]["format"] == {"type": "audio/pcma"}
    assert d["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert d["audio"]["output"]["voice"] == "joe"
    assert d["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
        "silence_duration_ms": 500, "create_response": True, "interrupt_response": True,
        "idle_timeout_ms": None,
    }
    assert d["voicepipe"] == {"latency_events": False, "binary_audio": False}
    assert "modalities" not in d and "turn_detection" not in d
    json.dumps(d)


def test_to_dict_beta() -> None:
    c = p.SessionConfig()
    c.apply({"output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}})
    d = c.to_dict(p.Dialect.BETA)
    assert "type" not in d and "audio" not in d
    assert d["modalities"] == ["text"] and d["turn_detection"] is None
    assert d["input_audio_format"] == d["output_audio_format"] == "pcm16"
    assert d["voice"] == "joe" and d["max_response_output_tokens"] == "inf"
    assert d["temperature"] == 0.0
    assert p.SessionConfig().to_dict(p.Dialect.BETA)["modalities"] == ["text", "audio"]


@pytest.mark.parametrize("dialect", list(p.Dialect))
def test_to_dict_round_trips_through_apply(dialect: p.Dialect) -> None:
    c = p.SessionConfig()
    c.apply({"instructions": "x", "temperature": 0.3, "max_output_tokens": 64,
             "audio": {"input": {"format": {"type": "audio/pcmu"},
                                 "turn_detection": {"silence_duration_ms": 200}},
                       "output": {"voice": "amy"}},
             "voicepipe": {"binary_audio": True}})
    d = c.to_dict(dialect)
    fresh = p.SessionConfig()
    fresh.apply(d, dialect)
    assert fresh == c


# -- fuzz: nothing but ProtocolError escapes ------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from([
    "type", "event_id", "audio", "item", "item_id", "content_index", "audio_end_ms", "session",
    "response", "response_id", "previous_item_id", "role", "content", "text", "instructions",
    "audio", "input", "output", "format", "rate", "turn_detection", "voice", "modalities",
    "output_modalities", "voicepipe", "max_output_tokens", "transcription", "threshold",
]) | st.text(max_size=6)
event_types = st.sampled_from(sorted({ev["type"] for ev in VALID_EVENTS})) | st.text(max_size=12)


def _check(raw: Any) -> None:
    try:
        p.parse_client_event(raw, max_bytes=MAX)
    except p.ProtocolError as e:
        assert isinstance(e.code, str)
        json.dumps(e.to_event())


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(field_names, json_value, max_size=6), event_types)
def test_fuzz_random_events(fields: dict[str, Any], kind: str) -> None:
    _check({**fields, "type": kind})
    _check(json.dumps({**fields, "type": kind}))


def _mutations(value: Any) -> st.SearchStrategy[Any]:
    """A strategy replacing one nested value of `value` with random JSON (or deleting a key)."""
    if isinstance(value, dict) and value:
        key = st.sampled_from(sorted(value))
        return key.flatmap(lambda k: st.one_of(
            st.just({kk: vv for kk, vv in value.items() if kk != k}),
            json_value.map(lambda v: {**value, k: v}),
            _mutations(value[k]).map(lambda v: {**value, k: v}),
        ))
    if isinstance(value, list) and value:
        i = st.integers(0, len(value) - 1)
        return i.flatmap(lambda j: _mutations(value[j]).map(
            lambda v: value[:j] + [v] + value[j + 1:]))
    return json_value


RICH_EVENTS = VALID_EVENTS + [
    {"type": "session.update", "session": p.SessionConfig().to_dict(p.Dialect.GA)},
    {"type": "session.update", "session": p.SessionConfig().to_dict(p.Dialect.BETA)},
    {"type": "response.create", "response": {"instructions": "x", "output_modalities": ["text"],
                                             "max_output_tokens": 5, "conversation": "auto"}},
]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(RICH_EVENTS).flatmap(_mutations))
def test_fuzz_mutated_valid_events(event: Any) -> None:
    _check(event)
    _check(json.dumps(event))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_fuzz_raw_bytes(raw: bytes | str) -> None:
    _check(raw)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(RICH_EVENTS[-3:]).flatmap(_mutations))
def test_fuzz_apply_is_atomic(event: Any) -> None:
    session = event.get("session", event.get("response")) if isinstance(event, dict) else event
    c = p.SessionConfig()
    before = c.copy()
    try:
        c.apply(session)
    except p.ProtocolError:
        assert c == before
