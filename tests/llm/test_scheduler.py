"""The paged engine against its own cache-less reference: greedy turns after rollbacks,
evictions and a dropped speculative prefill; many sessions on a small pool; int8 weights."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from voicepipe.llm.engine import Engine
from voicepipe.llm.hf import load_hf
from voicepipe.stages.base import SamplingParams

from .tiny import collect, no_cancel, reference_model, write_hf_folder

GREEDY = SamplingParams(max_tokens=8)


def _tiny_engine(tmp_path: Path, arch: str = "qwen2", **kwargs: object) -> Engine:
    folder = write_hf_folder(reference_model(arch), tmp_path / arch)
    return Engine.from_checkpoint(load_hf(folder), arch, dtype="float32", **kwargs)  # type: ignore[arg-type]


def _replies_one_at_a_time(engine: Engine, prompts: list[str],
                           params: SamplingParams) -> dict[str, str]:
    """Each prompt's reply in a conversation of its own, run alone: the reference for batching."""
    replies = {}
    for p in prompts:
        c = engine.new_conversation("be nice")
        c.add_message("user", p)
        replies[p] = collect(c.generate(params, no_cancel()))
        c.close()
    return replies


def _from_scratch(engine: Engine, prompt: list[int], n: int) -> list[int]:
    cache = engine.decoder.new_cache()
    logits = engine.run(prompt, cache)
    out: list[int] = []
    while True:
        token = int(logits.argmax())
        out.append(token)
        if token in engine.tokenizer.stop_ids or len(out) == n:
            return out
        logits = engine.run([token], cache)


def _check_last_turn(engine: Engine, c) -> None:  # type: ignore[no-untyped-def]
    ids, n = c.token_ids, c.stats.generated_tokens
    assert n > 0 and _from_scratch(engine, ids[:-n], n) == ids[-n:]


def test_turns_after_rollback_eviction_and_dropped_prefill(tmp_path: Path) -> None:
    engine = _tiny_engine(tmp_path, num_pages=64, page_size=4)
    c = engine.new_conversation("be nice")
    c.add_message("user", "the weather")
    collect(c.generate(GREEDY, no_cancel()))
    _check_last_turn(engine, c)
    c.truncate_last_assistant(c.messages[-1]["content"][:3])  # barge-in
    # Speculative prefill of a partial transcript, then the final transcript replaces it.
    c.add_message("user", "the s")
    assert c.prefill() > 0
    speculative = c.cached_tokens
    c.delete_message(-1)
    c.add_message("user", "then what")
    collect(c.generate(GREEDY, no_cancel()))
    assert 0 < c.stats.cached_tokens < speculative
    _check_last_turn(engine, c)
    # An unchanged speculative prefill: generate starts without running anything.
    c.add_message("user", "the sea")
    ran = c.prefill()
    assert ran > 0 and c.prefill() == 0
    collect(c.generate(GREEDY, no_cancel()))
    assert c.stats.prefill_tokens == 0
    _check_last_turn(engine, c)
    # Evict everything this conversation held: the next turn re-runs and still matches.
    c.close()
    engine.radix.evict(engine.pool.num_pages)
    assert engine.pool.free_pages == engine.pool.num_pages
    c.add_message("user", "and the wind")
    collect(c.generate(GREEDY, no_cancel()))
    assert c.stats.cached_tokens == 0
    _check_last_turn(engine, c)


def test_many_sessions_on_a_small_pool_all_finish_and_return_their_pages(tmp_path: Path) -> None:
    engine = _tiny_engine(tmp_path, num_pages=64, page_size=4)  # 256 slots: about 3 of 8 sessions at once
    prompts = [f"tell me about the {w}" for w in
               ("sea", "wind", "sun", "rain", "snow", "hill", "tree", "stone")]
    params = SamplingParams(max_tokens=12)
    expected = _replies_one_at_a_time(engine, prompts, params)
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(p: str) -> None:
        try:
            c = engine.new_conversation("be nice")
            c.add_message("user", p)
            results[p] = collect(c.generate(params, no_cancel()))
            c.add_message("user", "and then")
            collect(c.generate(params, no_cancel()))
            c.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == expected  # batching and preemption do not change greedy outputs
    engine.radix.evict(engine.pool.num_pages)
    assert engine.pool.free_pages == engine.pool.num_pages


def test_a_shared_system_prompt_is_cached_once(tmp_path: Path) -> None:
    engine = _tiny_engine(tmp_path, num_pages=64, page_size=4)
    a = engine.new_conversation("you are a helpful assistant with a long system prompt")
    a.add_message("user", "hi")
    collect(a.generate(GREEDY, no_cancel()))
    b = engine.new_conversation("you are a helpful assistant with a long system prompt")
    b.add_message("user", "yo")
    collect(b.generate(GREEDY, no_cancel()))
    assert b.stats.cached_tokens > 20


def test_stop_strings_and_repetition_penalty(tmp_path: Path) -> None:
    engine = _tiny_engine(tmp_path)
    c = engine.new_conversation("")
    c.add_message("user", "the weather")
    full = collect(c.generate(SamplingParams(max_tokens=16), no_cancel()))
    assert len(full) > 4
    stop = full[2:4]
    c2 = engine.new_conversation("")
    c2.add_message("user", "the weather")
    cut = collect(c2.generate(SamplingParams(max_tokens=16, stop=(stop,)), no_cancel()))
    assert cut == full[: full.index(stop)] and c2.messages[-1]["content"] == cut
    c3 = engine.new_conversation("")
    c3.add_message("user", "the weather")
    penalized = collect(c3.generate(SamplingParams(max_tokens=16, repetition_penalty=1e6),
                                    no_cancel()))
    ids = c3.token_ids[-c3.stats.generated_tokens:]
    prompt = set(c3.token_ids[: -c3.stats.generated_tokens])
    assert penalized and len(set(ids)) == len(ids) and not (set(ids) & prompt)


def test_int8_logits_stay_close_to_float32(tmp_path: Path) -> None:
    from voicepipe.llm.model import Decoder

    folder = write_hf_folder(reference_model("qwen2"), tmp_path / "q")
    ids = torch.tensor([1, 70, 80, 90, 4, 200, 33, 34, 35, 250, 300, 12])
    out = {}
    for int8 in (False, True):
        d = Decoder(load_hf(folder).config, dict(load_hf(folder).weights), int8=int8)
        with torch.inference_mode():
            out[int8] = d.forward(ids, d.new_cache(), all_logits=True)
    p, q = out[False].log_softmax(-1), out[True].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() < 0.1 and (out[False].argmax(-1) == out[True].argmax(-1)).float().mean() > 0.9


@pytest.mark.models
def test_int8_smollm_answers_like_float32(smollm_path: Path) -> None:
    engine = Engine.load(str(smollm_path))  # the CPU default: int8 weights
    assert engine.info()["dtype"] == "int8"
    c = engine.new_conversation("You are a concise assistant.")
    c.add_message("user", "Name a fruit that is yellow.")
    # SmolLM2-135M's logits are near-tied (MODELS.md): the Qwen test checks what it says.
    assert collect(c.generate(SamplingParams(max_tokens=24), no_cancel())).strip()


def _record_forwards(engine: Engine, gate: threading.Event | None = None) -> list[list[int]]:
    """Wrap the engine's batched forward: the returned list gets, per forward, the number of
    new tokens of each segment. With `gate`, the second forward waits until the gate opens."""
    forwards: list[list[int]] = []
    inner = engine.decoder.forward_paged

    def forward_paged(tokens, segments, kv):  # type: ignore[no-untyped-def]
        if gate is not None and len(forwards) == 1:
            assert gate.wait(60)
        forwards.append([s.n for s in segments])
        return inner(tokens, segments, kv)

    engine.decoder.forward_paged = forward_paged  # type: ignore[method-assign]
    return forwards


def _run(target, *args) -> tuple[threading.Thread, list[object]]:  # type: ignore[no-untyped-def]
    out: list[object] = []

    def body() -> None:
        try:
            out.append(target(*args))
        except BaseException as exc:  # noqa: BLE001
            out.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


def test_a_long_prefill_is_chunked_and_never_stalls_a_decoding_session(tmp_path: Path) -> None:
    from voicepipe.llm.engine import PREFILL_CHUNK

    model = reference_model("qwen2")
    model.config.max_position_embeddings = 2048  # room for a 1500-token prompt
    folder = write_hf_folder(model, tmp_path / "long")
    engine = Engine.from_checkpoint(load_hf(folder), dtype="float32", num_pages=256, page_size=16)
    gate = threading.Event()
    forwards = _record_forwards(engine, gate)
    talker = engine.new_conversation("be nice")
    talker.add_message("user", "the weather")
    reader = engine.new_conversation("be nice")
    reader.add_message("user", " ".join(["the sea and the wind"] * 140))
    # The talker's prompt runs, then the scheduler waits (gate) with the talker decoding
    # until the reader's 1500-token prompt is queued, so both are active from then on.
    talking, said = _run(lambda: collect(talker.generate(SamplingParams(max_tokens=48),
                                                           no_cancel())))
    while not forwards:
        talking.join(0.01)
    reading, read = _run(lambda: collect(reader.generate(SamplingParams(max_tokens=2),
                                                           no_cancel())))
    while engine._scheduler._incoming.qsize() == 0 and not read:
        reading.join(0.01)
    gate.set()
    talking.join(60)
    reading.join(60)
    assert all(isinstance(x, str) for x in said + read), said + read
    prompt = reader.stats.prefill_tokens
    assert prompt > 1500
    chunks = [(f, [n for n in f if n > 1]) for f in forwards[1:]]
    prefill = [c for f, c in chunks if c]
    assert sum(n for c in prefill for n in c) == prompt
    assert all(n <= PREFILL_CHUNK for c in prefill for n in c)
    assert len(prefill) >= prompt // PREFILL_CHUNK
    # Every step that ran a chunk of the long prompt also ran the talker's next token.
    assert talker.stats.generated_tokens == 48  # still talking through the whole prefill
    assert all(f.count(1) >= 1 for f, c in chunks if c)


def test_cancel_while_batched_leaves_the_others_unchanged(tmp_path: Path) -> None:
    engine = _tiny_engine(tmp_path, num_pages=256, page_size=4)
    prompts = ["tell me about the sea", "tell me about the wind", "tell me about the sun"]
    params = SamplingParams(max_tokens=32)
    alone = _replies_one_at_a_time(engine, prompts, params)
    engine.radix.evict(engine.pool.num_pages)
    gate = threading.Event()
    forwards = _record_forwards(engine, gate)
    cancel = threading.Event()
    conversations = {p: engine.new_conversation("be nice") for p in prompts}
    for p, c in conversations.items():
        c.add_message("user", p)
    victim = conversations[prompts[1]]
    deltas: list[str] = []

    def cancel_after_two(delta: str) -> None:
        deltas.append(delta)
        if len(deltas) == 2:
            cancel.set()

    runs = [_run(lambda c=c: collect(c.generate(params, no_cancel())))
            for p, c in conversations.items() if c is not victim]
    runs.append(_run(lambda: collect(victim.generate(params, cancel), cancel_after_two)))
    while engine._scheduler._incoming.qsize() + len(engine._scheduler._active) < 3:
        runs[-1][0].join(0.01)
    gate.set()
    for thread, _ in runs:
        thread.join(60)
    results = [out[0] for _, out in runs]
    assert all(isinstance(r, str) for r in results), results
    assert results[:2] == [alone[prompts[0]], alone[prompts[2]]]
    assert max(len(f) for f in forwards) == 3  # the victim was batched with the others
    assert 2 <= victim.stats.generated_tokens < params.max_tokens
    # The cancelled conversation goes on: its next turn sees the reply cut where it stopped.
    assert victim.messages[-1]["role"] == "assistant"
    victim.add_message("user", "go on")
    collect(victim.generate(SamplingParams(max_tokens=4), no_cancel()))
    _check_last_turn(engine, victim)
    for c in conversations.values():
        c.close()
    engine.radix.evict(engine.pool.num_pages)
    assert engine.pool.free_pages == engine.pool.num_pages


def test_a_request_waits_for_pages_held_outside_the_scheduler(tmp_path: Path) -> None:
    """Pages held by a conversation between requests (settling, or queued) are no reason to
    fail: the request waits for them."""
    from voicepipe.llm.radix import PinnedSequence

    engine = _tiny_engine(tmp_path, num_pages=16, page_size=4)
    with engine.lock:
        settling = PinnedSequence(engine.radix)
        settling.extend(list(range(3, 63)))  # 15 of the 16 pages
    c = engine.new_conversation("be nice")
    c.add_message("user", "the weather")
    thread, out = _run(lambda: collect(c.generate(SamplingParams(max_tokens=4), no_cancel())))
    while not engine._scheduler._active and not out:
        thread.join(0.01)
    thread.join(0.2)  # the scheduler tries, finds no page, and waits
    assert not out
    with engine.lock:
        settling.release()
    engine._scheduler.wake()
    thread.join(60)
    assert out and isinstance(out[0], str), out


def test_a_conversation_larger_than_the_pool_fails(tmp_path: Path) -> None:
    from voicepipe.stages.base import StageError

    engine = _tiny_engine(tmp_path, num_pages=8, page_size=4)
    c = engine.new_conversation("be nice")
    c.add_message("user", "tell me about the sea and the wind and the sun and the rain")
    with pytest.raises(StageError, match="does not fit"):
        collect(c.generate(GREEDY, no_cancel()))
    c.close()
    engine.radix.evict(engine.pool.num_pages)
    assert engine.pool.free_pages == engine.pool.num_pages


def test_a_conversation_longer_than_the_context_fails(tmp_path: Path) -> None:
    from voicepipe.stages.base import StageError

    engine = _tiny_engine(tmp_path, num_pages=256, page_size=4)  # a context of 512
    c = engine.new_conversation("be nice")
    c.add_message("user", " ".join(["the sea and the wind"] * 50))
    with pytest.raises(StageError, match="context"):
        collect(c.generate(GREEDY, no_cancel()))
