"""The Sans-I/O session core, driven without sockets or models."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from voicepipe import protocol as p
from voicepipe import session as s

F = 512


def make(**kw) -> s.Session:
    sess = s.Session(partial_interval_ms=kw.pop("partial_interval_ms", 0), **kw)
    sess.start()
    sess.actions()
    return sess


def frames(sess: s.Session, probs: list[float], t0: float = 100.0) -> list[s.Action]:
    out: list[s.Action] = []
    for i, prob in enumerate(probs):
        now = t0 + i * 0.032
        sess.audio(np.full(F, 0.01, np.float32), prob, now, now)
        out += sess.actions()
    return out


def events(actions: list[s.Action]) -> list[dict]:
    return [a.event for a in actions if isinstance(a, s.SendEvent)]


def types(actions: list[s.Action]) -> list[str]:
    return [e["type"] for e in events(actions)]


def of(actions: list[s.Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def speak_turn(sess: s.Session, speech_frames: int = 10, t0: float = 100.0) -> list[s.Action]:
    td = sess.config.turn_detection
    silence = td.silence_duration_ms * 16 // F + 2 if td else 0
    return frames(sess, [0.9] * speech_frames + [0.05] * silence, t0)


def test_session_created_is_the_first_event() -> None:
    sess = s.Session()
    sess.start()
    (ev,) = events(sess.actions())
    assert ev["type"] == "session.created"
    assert ev["session"]["id"] == sess.id


def test_a_spoken_turn_runs_vad_transcription_and_response_in_order() -> None:
    sess = make()
    acts = speak_turn(sess)
    assert types(acts)[:4] == ["input_audio_buffer.speech_started",
                              "input_audio_buffer.speech_stopped",
                              "input_audio_buffer.committed", "conversation.item.added"]
    # the final transcription started at the first silent frame, before the endpoint
    tr = of(acts, s.Transcribe)
    assert len(tr) == 1 and tr[0].final
    item_id = tr[0].item_id
    sess.transcript(item_id, " What is the capital of France? ", final=True, key=tr[0].key,
                    now=101.0)
    acts = sess.actions()
    assert types(acts)[:2] == ["conversation.item.input_audio_transcription.completed",
                               "conversation.item.done"]
    assert events(acts)[0]["transcript"] == "What is the capital of France?"
    (add,) = of(acts, s.AddMessage)
    assert (add.role, add.text) == ("user", "What is the capital of France?")
    (start,) = of(acts, s.StartResponse)
    assert "response.created" in types(acts)
    rid = start.response_id
    sess.token(rid, 101.1)
    sess.phrase(rid, "Paris is ", b"\0\0" * 2400, 100.0, 101.2)
    sess.audio_sent(rid, 101.25)
    sess.phrase(rid, "the capital.", b"\0\0" * 2400, 100.0, 101.3)
    sess.response_finished(rid, prefill_tokens=20, cached_tokens=5, generated_tokens=6,
                           now=101.4)
    acts = sess.actions()
    names = types(acts)
    assert names.count("response.output_audio.delta") == 2
    assert names.count("response.output_audio_transcript.delta") == 2
    done = [e for e in events(acts) if e["type"] == "response.done"][0]
    assert done["response"]["status"] == "completed"
    assert done["response"]["usage"]["output_tokens"] == 6
    (fin,) = of(acts, s.TurnFinished)
    marks = fin.timings.marks
    assert set(marks) == {"speech_end", "endpoint", "asr_final", "llm_first_token",
                          "tts_first_audio", "first_byte_sent"}
    assert marks["speech_end"] <= marks["endpoint"]
    d = fin.timings.derived_ms()
    assert d["voice_to_voice"] == pytest.approx((101.25 - marks["speech_end"]) * 1000)
    assert sess.items[-1].text == "Paris is the capital."


def final_before_endpoint(sess: s.Session, text: str = "hello") -> s.Transcribe:
    """Speech, then the first silent frame, whose final transcription comes back at once:
    the endpoint is still 500 ms of silence away."""
    (tr,) = of(frames(sess, [0.9] * 10 + [0.05]), s.Transcribe)
    sess.transcript(tr.item_id, text, final=True, key=tr.key, now=100.4)
    return tr


def test_final_transcript_from_before_the_endpoint_is_used_and_latency_is_negative() -> None:
    sess = make()
    acts = frames(sess, [0.9] * 10 + [0.05])  # speech, then the first silent frame
    (tr,) = of(acts, s.Transcribe)
    sess.transcript(tr.item_id, "hello there", final=True, key=tr.key, now=100.36)
    # nothing to say yet: the reply is prefilled and started, its output held
    prefill, spec = sess.actions()
    assert isinstance(prefill, s.Prefill) and isinstance(spec, s.SpeculateResponse)
    acts = frames(sess, [0.05] * 20, t0=100.4)
    assert not of(acts, s.Transcribe)  # no second transcription
    assert "conversation.item.input_audio_transcription.completed" in types(acts)
    (start,) = of(acts, s.StartResponse)
    assert start.speculation == spec.key  # the endpoint adopts the reply under way
    assert sess._llm == [tr.item_id, start.item_id]
    sess.response_finished(start.response_id, now=101.0)
    (fin,) = of(sess.actions(), s.TurnFinished)
    assert fin.timings.derived_ms()["asr_latency"] < 0


def test_resumed_speech_discards_the_early_final_transcript() -> None:
    sess = make()
    acts = frames(sess, [0.9] * 10 + [0.05] * 3)
    (early,) = of(acts, s.Transcribe)
    frames(sess, [0.9] * 5, t0=101)
    sess.transcript(early.item_id, "hello", final=True, key=early.key, now=101.2)
    assert sess.actions() == []  # stale: the speech went on
    acts = frames(sess, [0.05] * 20, t0=102)
    finals = [t for t in of(acts, s.Transcribe) if t.final]
    assert finals and finals[-1].key != early.key
    sess.transcript(early.item_id, "hello world", final=True, key=finals[-1].key, now=103)
    assert "conversation.item.input_audio_transcription.completed" in types(sess.actions())


def test_partials_send_only_appended_text() -> None:
    sess = make(partial_interval_ms=100)
    acts = frames(sess, [0.9] * 6)
    (tr,) = of(acts, s.Transcribe)
    assert not tr.final
    sess.transcript(tr.item_id, "what is", final=False, key=-1, now=100.3)
    (ev,) = events(sess.actions())
    assert ev["type"] == "conversation.item.input_audio_transcription.delta"
    assert ev["delta"] == "what is"
    acts = frames(sess, [0.9] * 4, t0=101)
    (tr2,) = of(acts, s.Transcribe)
    sess.transcript(tr2.item_id, "what is the capital", final=False, key=-1, now=101.2)
    (ev,) = events(sess.actions())
    assert ev["delta"] == " the capital"


def test_empty_transcript_gets_no_response() -> None:
    sess = make()
    acts = speak_turn(sess)
    (tr,) = of(acts, s.Transcribe)
    sess.transcript(tr.item_id, "  ", final=True, key=tr.key, now=101)
    acts = sess.actions()
    assert not of(acts, s.StartResponse) and not of(acts, s.AddMessage)


def start_reply(sess: s.Session) -> str:
    acts = speak_turn(sess)
    (tr,) = of(acts, s.Transcribe)
    sess.transcript(tr.item_id, "tell me a story", final=True, key=tr.key, now=101)
    (start,) = of(sess.actions(), s.StartResponse)
    return start.response_id


def test_barge_in_cancels_and_keeps_only_what_was_played() -> None:
    sess = make()
    rid = start_reply(sess)
    sess.phrase(rid, "Once upon a time, ", b"\0\0" * 24000, 1000.0, 102.0)
    sess.audio_sent(rid, 102.0)
    sess.phrase(rid, "there was a king.", b"\0\0" * 24000, 1000.0, 102.1)
    sess.actions()
    # the user talks 1.5 s after playback started: the first phrase and half the second
    acts = frames(sess, [0.9] * 3, t0=103.5 - 0.064)
    assert "input_audio_buffer.speech_started" in types(acts)
    (cancel,) = of(acts, s.CancelResponse)
    assert cancel.response_id == rid
    (trunc,) = of(acts, s.TruncateMessage)
    assert trunc.kept_text.startswith("Once upon a time, ")
    assert len(trunc.kept_text) < len("Once upon a time, there was a king.")
    # a phrase arriving after the cancel is never sent
    sess.phrase(rid, "The end.", b"\0\0" * 100, 10.0, 103.6)
    assert not events(sess.actions())
    sess.response_finished(rid, now=103.7)
    done = [e for e in events(sess.actions()) if e["type"] == "response.done"][0]
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    assert sess.items[-1].text == trunc.kept_text  # the user's new turn is not committed yet


def test_client_truncate_cuts_a_finished_reply_by_audio_end_ms() -> None:
    sess = make()
    rid = start_reply(sess)
    sess.phrase(rid, "One two three. ", b"\0\0" * 100, 1000.0, 102.0)
    sess.phrase(rid, "Four five six.", b"\0\0" * 100, 1000.0, 102.1)
    sess.response_finished(rid, now=102.2)
    sess.actions()
    item = sess.items[-1]
    sess.receive(p.ConversationItemTruncate("e1", item.id, 0, 1500), now=103)
    acts = sess.actions()
    (trunc,) = of(acts, s.TruncateMessage)
    assert trunc.kept_text == "One two three. Four "
    assert types(acts) == ["conversation.item.truncated"]


def test_truncate_of_unknown_item_is_an_error_with_the_event_id() -> None:
    sess = make()
    sess.receive(p.ConversationItemTruncate("evt_9", "item_nope", 0, 10), now=1)
    (ev,) = events(sess.actions())
    assert ev["type"] == "error" and ev["error"]["event_id"] == "evt_9"


def test_manual_commit_needs_audio_then_waits_for_response_create() -> None:
    sess = make()
    sess.receive(p.SessionUpdate("e0", {"turn_detection": None}), now=0)
    assert "session.updated" in types(sess.actions())
    assert not sess.vad_enabled
    sess.receive(p.InputAudioBufferCommit("e1"), now=1)
    (err,) = events(sess.actions())
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"
    frames(sess, [None] * 20)  # type: ignore[list-item]
    sess.receive(p.InputAudioBufferCommit("e2"), now=2)
    acts = sess.actions()
    (tr,) = of(acts, s.Transcribe)
    assert len(tr.audio) == 20 * F
    # response.create arrives before the transcript: it waits for it
    sess.receive(p.ResponseCreate("e3"), now=2.1)
    assert not of(sess.actions(), s.StartResponse)
    sess.transcript(tr.item_id, "hi", final=True, key=tr.key, now=2.5)
    assert of(sess.actions(), s.StartResponse)


def test_text_item_and_response_create_and_double_response_error() -> None:
    sess = make()
    sess.receive(p.ConversationItemCreate("e1", None, None, "user", "Hello"), now=1)
    acts = sess.actions()
    assert of(acts, s.AddMessage)[0].text == "Hello"
    sess.receive(p.ResponseCreate("e2", output_modalities=["text"]), now=2)
    (start,) = of(sess.actions(), s.StartResponse)
    assert not start.audio
    sess.receive(p.ResponseCreate("e3"), now=2.1)
    (err,) = events(sess.actions())
    assert err["error"]["code"] == "conversation_already_has_active_response"
    sess.phrase(start.response_id, "Hi!", None, 0, 2.2)
    assert types(sess.actions()) == ["response.output_text.delta"]


def test_response_cancel_without_active_response_is_an_error() -> None:
    sess = make()
    sess.receive(p.ResponseCancel("e1"), now=1)
    (err,) = events(sess.actions())
    assert err["error"]["code"] == "response_cancel_not_active"


def test_delete_item_maps_to_llm_message_index() -> None:
    sess = make()
    for text in ("a", "b", "c"):
        sess.receive(p.ConversationItemCreate(None, None, None, "user", text), now=1)
    sess.actions()
    sess.receive(p.ConversationItemDelete("e", sess.items[1].id), now=2)
    acts = sess.actions()
    assert of(acts, s.DeleteMessage)[0].index == 1
    assert types(acts) == ["conversation.item.deleted"]
    assert [it.text for it in sess.items] == ["a", "c"]


def test_latency_event_only_when_opted_in() -> None:
    for opted in (False, True):
        sess = make()
        if opted:
            sess.receive(p.SessionUpdate(None, {"voicepipe": {"latency_events": True}}), now=0)
            sess.actions()
        rid = start_reply(sess)
        sess.response_finished(rid, now=102)
        names = types(sess.actions())
        assert ("voicepipe.latency" in names) == opted


def test_input_buffer_is_bounded() -> None:
    sess = make(max_buffer_s=1.0)
    sess.receive(p.SessionUpdate(None, {"turn_detection": None}), now=0)
    sess.actions()
    acts = frames(sess, [None] * 40)  # type: ignore[list-item]
    errs = [e for e in events(acts) if e["type"] == "error"]
    assert errs and errs[0]["error"]["code"] == "input_audio_buffer_overflow"


def test_buffer_between_turns_stays_small() -> None:
    sess = make()
    frames(sess, [0.0] * 2000)  # a minute of silence
    held = sum(len(b) for b in sess._buf)
    assert held <= 2 * 16000 * 1.3 + F


def test_beta_dialect_renames_events() -> None:
    sess = s.Session(dialect=p.Dialect.BETA, partial_interval_ms=0)
    sess.start()
    sess.actions()
    rid = start_reply(sess)
    sess.phrase(rid, "Hi.", b"\0\0" * 10, 1.0, 102)
    names = types(sess.actions())
    assert "response.audio.delta" in names and "response.audio_transcript.delta" in names
    assert not any(n.startswith("response.output_audio") for n in names)


def test_binary_audio_mode_sends_raw_frames() -> None:
    sess = make()
    sess.receive(p.SessionUpdate(None, {"voicepipe": {"binary_audio": True}}), now=0)
    sess.actions()
    rid = start_reply(sess)
    sess.phrase(rid, "Hi.", b"\1\0" * 10, 1.0, 102)
    acts = sess.actions()
    (raw,) = of(acts, s.SendAudio)
    assert raw.data == b"\1\0" * 10
    assert "response.output_audio.delta" not in types(acts)
    assert base64  # the base64 path is covered above


def test_first_byte_written_after_the_response_ended_still_completes_the_turn() -> None:
    sess = make()
    sess.receive(p.SessionUpdate(None, {"voicepipe": {"latency_events": True}}), now=0)
    sess.actions()
    rid = start_reply(sess)
    sess.token(rid, 101.1)
    sess.phrase(rid, "Hi.", b"\0\0" * 10, 1.0, 101.2)
    sess.response_finished(rid, now=101.3)
    acts = sess.actions()
    assert "response.done" in types(acts)
    assert not of(acts, s.TurnFinished)  # waits for the audio to leave
    sess.audio_sent(rid, 101.4)
    acts = sess.actions()
    (fin,) = of(acts, s.TurnFinished)
    assert fin.timings.marks["first_byte_sent"] == 101.4
    (lat,) = [e for e in events(acts) if e["type"] == "voicepipe.latency"]
    assert "voice_to_voice" in lat["derived_ms"]
    assert sess.items[-1].first_audio_at == 101.4


def test_early_transcript_is_prefilled_and_kept_when_the_turn_ends_unchanged() -> None:
    sess = make()
    acts = frames(sess, [0.9] * 10 + [0.05])
    (tr,) = of(acts, s.Transcribe)
    sess.transcript(tr.item_id, "hello there", final=True, key=tr.key, now=100.4)
    (pre,) = of(sess.actions(), s.Prefill)
    assert (pre.item_id, pre.text) == (tr.item_id, "hello there")
    acts = frames(sess, [0.05] * 20, t0=100.5)
    assert not of(acts, s.AddMessage) and not of(acts, s.DeleteMessage)  # already in the LLM
    assert of(acts, s.StartResponse)
    assert sess._llm == [sess.items[0].id, sess.items[1].id]  # the user message, the reply


def test_speculation_is_rolled_back_when_the_user_goes_on() -> None:
    sess = make()
    sess.receive(p.ConversationItemCreate(None, None, None, "user", "earlier"), now=99)
    sess.actions()
    tr = final_before_endpoint(sess)
    assert of(sess.actions(), s.Prefill)
    acts = frames(sess, [0.9] * 3, t0=100.5)  # speech resumes
    (cancel,) = of(acts, s.CancelSpeculation)
    reply, user = of(acts, s.DeleteMessage)  # the speculative reply first, then its question
    assert (reply.item_id, reply.index) == (cancel.key, 2)
    assert (user.item_id, user.index) == (tr.item_id, 1)  # after the one earlier message
    acts = frames(sess, [0.05] * 20, t0=101)
    final = [t for t in of(acts, s.Transcribe) if t.final][-1]
    sess.transcript(final.item_id, "hello world", final=True, key=final.key, now=102)
    acts = sess.actions()
    (add,) = of(acts, s.AddMessage)
    assert add.text == "hello world"


def test_a_speculative_reply_released_at_the_endpoint_reaches_the_client_at_once() -> None:
    sess = make()
    final_before_endpoint(sess)
    (spec,) = of(sess.actions(), s.SpeculateResponse)
    assert spec.audio and spec.max_tokens == sess.max_response_tokens
    acts = frames(sess, [0.05] * 20, t0=100.5)
    (start,) = of(acts, s.StartResponse)
    assert start.speculation == spec.key
    # what the adapter held comes out now, marked when it was made (before the endpoint)
    sess.token(start.response_id, 100.45)
    sess.phrase(start.response_id, "Hi.", b"\0\0" * 240, 10.0, 100.5)
    assert "response.output_audio.delta" in types(sess.actions())
    sess.audio_sent(start.response_id, 101.0)
    sess.response_finished(start.response_id, now=101.1)
    (fin,) = of(sess.actions(), s.TurnFinished)
    assert fin.timings.derived_ms()["llm_ttft"] < 0  # the first token came before the end


def test_a_client_event_drops_the_speculative_reply_and_the_endpoint_starts_afresh() -> None:
    sess = make()
    tr = final_before_endpoint(sess)
    (spec,) = of(sess.actions(), s.SpeculateResponse)
    sess.receive(p.SessionUpdate(None, {"instructions": "Answer in French."}), now=100.45)
    acts = sess.actions()
    assert [c.key for c in of(acts, s.CancelSpeculation)] == [spec.key]
    assert [(d.item_id, d.index) for d in of(acts, s.DeleteMessage)] == [(spec.key, 1)]
    acts = frames(sess, [0.05] * 20, t0=100.5)
    (start,) = of(acts, s.StartResponse)
    assert start.speculation is None  # made for the old instructions: not reused
    assert sess._llm == [tr.item_id, start.item_id]


def test_speculative_replies_can_be_turned_off() -> None:
    sess = make(speculative_reply=False)
    final_before_endpoint(sess)
    assert [type(a) for a in sess.actions()] == [s.Prefill]
    (start,) = of(frames(sess, [0.05] * 20, t0=100.5), s.StartResponse)
    assert start.speculation is None


def test_no_speculation_while_a_response_is_running_or_without_auto_response() -> None:
    sess = make()
    sess.receive(p.SessionUpdate(None, {"turn_detection": {"type": "server_vad",
                                                           "create_response": False}}), now=0)
    sess.actions()
    final_before_endpoint(sess)
    assert not of(sess.actions(), s.Prefill)


def test_out_of_band_response_is_refused_clearly() -> None:
    sess = make()
    sess.receive(p.ResponseCreate("e1", conversation="none"), now=1)
    (err,) = events(sess.actions())
    assert err["error"]["code"] == "unsupported"
    assert err["error"]["param"] == "response.conversation"
