"""Random client events and adapter results against the session core.

Invariants: nothing but the session's own error events comes out of bad sequences (no
exception escapes), every response that starts ends exactly once, and when all work has been
carried out no transcription or response is left pending and the LLM's message list mirrors
the conversation's items.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from voicepipe import protocol as p
from voicepipe import session as s

F = 512

ops = st.lists(st.one_of(
    st.tuples(st.just("speech"), st.integers(1, 12)),
    st.tuples(st.just("silence"), st.integers(1, 25)),
    st.tuples(st.just("event"), st.sampled_from([
        "commit", "clear", "create", "respond", "respond_text", "cancel", "truncate",
        "delete", "retrieve", "manual", "vad", "instructions", "clear_output"])),
    st.tuples(st.just("work"), st.integers(0, 5)),
    st.tuples(st.just("fail"), st.integers(0, 5)),
), max_size=60)


class Adapter:
    """Carries out the session's actions the way the server does, one step at a time."""

    def __init__(self, sess: s.Session, rng: np.random.Generator) -> None:
        self.sess = sess
        self.rng = rng
        self.now = 100.0
        self.pending: list[s.Action] = []
        self.llm: list[str] = []  # item ids of the messages the LLM holds
        self.speculating: set[str] = set()  # replies started before their endpoint
        self.created: Counter[str] = Counter()
        self.done: Counter[str] = Counter()

    def take(self) -> None:
        for a in self.sess.actions():
            if isinstance(a, s.SendEvent):
                t = a.event["type"]
                assert t == "error" or not t.startswith("error")
                if t == "response.created":
                    self.created[a.event["response"]["id"]] += 1
                if t == "response.done":
                    self.done[a.event["response"]["id"]] += 1
            elif isinstance(a, s.AddMessage | s.Prefill):
                self.llm.append(a.item_id)
            elif isinstance(a, s.DeleteMessage):
                assert self.llm[a.index] == a.item_id, (self.llm, a)
                del self.llm[a.index]
            elif isinstance(a, s.SpeculateResponse):
                self.llm.append(a.key)  # generate() appends the reply
                self.speculating.add(a.key)
            elif isinstance(a, s.CancelSpeculation):
                self.speculating.remove(a.key)
            elif isinstance(a, s.StartResponse):
                if a.speculation is None:
                    self.llm.append(a.item_id)  # generate() appends the reply
                else:  # the reply already being generated becomes this response's
                    self.speculating.remove(a.speculation)
                    self.llm[self.llm.index(a.speculation)] = a.item_id
                self.pending.append(a)
            elif isinstance(a, s.Transcribe):
                self.pending.append(a)

    def tick(self) -> None:
        self.now += 0.032

    def frames(self, prob: float, n: int) -> None:
        for _ in range(n):
            self.tick()
            self.sess.audio(np.zeros(F, np.float32), prob if self.sess.vad_enabled else None,
                            self.now, self.now)
            self.take()

    def work(self, i: int, fail: bool = False) -> None:
        if not self.pending:
            return
        a = self.pending.pop(i % len(self.pending))
        self.tick()
        if isinstance(a, s.Transcribe):
            if fail:
                self.sess.transcription_failed(a.item_id, "boom", final=a.final, key=a.key,
                                               now=self.now)
            else:
                text = "" if self.rng.random() < 0.2 else "hello there"
                self.sess.transcript(a.item_id, text, final=a.final, key=a.key, now=self.now)
        elif isinstance(a, s.StartResponse):
            self.sess.token(a.response_id, self.now)
            self.sess.phrase(a.response_id, "Hi there. ", b"\0\0" * 240 if a.audio else None,
                             10.0, self.now)
            self.sess.audio_sent(a.response_id, self.now)
            self.sess.response_finished(a.response_id, error="x" if fail else None,
                                        now=self.now)
        self.take()

    def event(self, name: str) -> None:
        sess = self.sess
        last = sess.items[-1].id if sess.items else "item_none"
        assistant = next((it.id for it in reversed(sess.items) if it.role == "assistant"),
                         "item_none")
        ev: p.ClientEvent = {
            "commit": p.InputAudioBufferCommit("e"),
            "clear": p.InputAudioBufferClear("e"),
            "create": p.ConversationItemCreate("e", None, None, "user", "typed text"),
            "respond": p.ResponseCreate("e"),
            "respond_text": p.ResponseCreate("e", output_modalities=["text"]),
            "cancel": p.ResponseCancel("e"),
            "truncate": p.ConversationItemTruncate("e", assistant, 0, 5),
            "delete": p.ConversationItemDelete("e", last),
            "retrieve": p.ConversationItemRetrieve("e", last),
            "manual": p.SessionUpdate("e", {"turn_detection": None}),
            "vad": p.SessionUpdate("e", {"turn_detection": {"type": "server_vad",
                                                            "silence_duration_ms": 200}}),
            "instructions": p.SessionUpdate("e", {"instructions": "Be brief."}),
            "clear_output": p.OutputAudioBufferClear("e"),
        }[name]
        self.tick()
        sess.receive(ev, self.now)
        self.take()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(0, 2**32 - 1))
# Found by this test: a speculatively prefilled user message that was no longer the LLM's last
# message (a response.create came while the user was still speaking) or was deleted by the
# client could not be rolled back.
@example([("speech", 1), ("speech", 1), ("silence", 1), ("work", 0), ("event", "respond"),
          ("speech", 1)], 0)
@example([("speech", 1), ("speech", 1), ("speech", 1), ("silence", 1), ("work", 0),
          ("event", "commit"), ("speech", 1), ("speech", 1), ("event", "delete")], 0)
def test_random_sequences_keep_the_invariants(sequence, seed) -> None:  # type: ignore[no-untyped-def]
    sess = s.Session(partial_interval_ms=200, max_items=8)
    sess.start()
    ad = Adapter(sess, np.random.default_rng(seed))
    ad.take()
    for kind, arg in sequence:
        if kind == "speech":
            ad.frames(0.95, arg)
        elif kind == "silence":
            ad.frames(0.02, arg)
        elif kind == "event":
            ad.event(arg)
        else:
            ad.work(arg, fail=kind == "fail")
    # finish everything: end any open turn, then carry out all work
    ad.event("commit") if not sess.vad_enabled else ad.frames(0.02, 30)
    for _ in range(200):
        if not ad.pending:
            break
        ad.work(0)
    assert not ad.pending
    assert sess._response is None and not sess._pending_finals
    assert not ad.speculating and sess._spec_reply is None  # adopted or dropped, every one
    assert all(n == 1 for n in ad.created.values())
    assert ad.done == ad.created  # every response ended exactly once
    assert ad.llm == sess._llm  # the adapter's LLM holds what the session thinks it holds
    ids = {it.id for it in sess.items}
    assert all(i in ids for i in ad.llm)  # nothing the conversation dropped stays in the LLM
