"""Engine and conversations: incremental turns against the kept KV cache give what a
from-scratch run of the same token ids gives; rollback, cancel, sampling, concurrency."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from voicepipe.llm.engine import Engine, sample
from voicepipe.stages.base import SamplingParams
from voicepipe.testing import unavailable

from .tiny import collect, no_cancel, reference_model, write_hf_folder

GREEDY = SamplingParams(max_tokens=24)


def _from_scratch(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of `prompt` on a fresh cache, prefilled in one pass."""
    cache = engine.decoder.new_cache()
    logits = engine.run(prompt, cache)
    out = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        if token in engine.tokenizer.stop_ids or len(out) == n:
            break
        logits = engine.run([token], cache)
    return out


def _check_last_turn(engine: Engine, conversation) -> None:
    ids = conversation.token_ids
    n = conversation.stats.generated_tokens
    assert n > 0
    assert _from_scratch(engine, ids[:-n], n) == ids[-n:]


@pytest.mark.models
def test_multi_turn_reuses_the_cache_and_matches_a_fresh_run(smollm_engine: Engine) -> None:
    engine = smollm_engine
    c = engine.new_conversation("You are a concise assistant.")
    c.add_message("user", "Name a fruit that is yellow.")
    first = collect(c.generate(GREEDY, no_cancel()))
    assert first and c.messages[-1] == {"role": "assistant", "content": first}
    assert c.stats.cached_tokens == 0
    _check_last_turn(engine, c)
    held = c.token_ids

    c.add_message("user", "And one that is red?")
    collect(c.generate(GREEDY, no_cancel()))
    ids = c.token_ids
    assert ids[: len(held)] == held  # generated ids are kept, earlier turns not re-tokenized
    prompt = len(ids) - c.stats.generated_tokens
    # The last sampled token of turn 1 was never run; everything before it is reused.
    assert c.stats.cached_tokens == len(held) - 1
    assert c.stats.prefill_tokens == prompt - len(held) + 1
    assert c.stats.prefill_tokens < 20 < prompt
    _check_last_turn(engine, c)

    # Barge-in: keep a few words of the reply, then go on.
    reply = c.messages[-1]["content"]
    kept = reply[: max(1, len(reply) // 2)]
    c.truncate_last_assistant(kept)
    assert kept.startswith(c.messages[-1]["content"])
    assert c.cached_tokens == len(c.token_ids)
    cut = c.token_ids
    c.add_message("user", "Thanks!")
    collect(c.generate(GREEDY, no_cancel()))
    assert c.token_ids[: len(cut)] == cut
    assert c.stats.cached_tokens == len(cut)
    _check_last_turn(engine, c)
    rendered = engine.tokenizer.render(c.chat(), add_generation_prompt=False)
    assert rendered.startswith(engine.tokenizer.decode(c.token_ids[: -c.stats.generated_tokens]))


@pytest.mark.models
def test_changed_history_rolls_back_to_the_common_prefix(smollm_engine: Engine) -> None:
    engine = smollm_engine
    c = engine.new_conversation("You are a concise assistant.")
    c.add_message("user", "Say hello.")
    collect(c.generate(GREEDY, no_cancel()))
    c.add_message("user", "Say goodbye.")
    collect(c.generate(GREEDY, no_cancel()))
    total = len(c.token_ids)

    c.set_instructions("You are a pirate.")
    c.add_message("user", "Again?")
    collect(c.generate(GREEDY, no_cancel()))
    assert 0 < c.stats.cached_tokens < 10  # only the start of the system prompt survived
    assert c.stats.prefill_tokens > total - 10
    _check_last_turn(engine, c)

    before = c.token_ids
    c.delete_message(2)  # "Say goodbye."
    c.add_message("user", "Once more.")
    collect(c.generate(GREEDY, no_cancel()))
    assert 10 < c.stats.cached_tokens < len(before)
    _check_last_turn(engine, c)
    text = engine.tokenizer.decode(c.token_ids)
    assert "goodbye" not in text and "pirate" in text


@pytest.mark.models
def test_cancel_stops_within_one_step(smollm_engine: Engine) -> None:
    c = smollm_engine.new_conversation("")
    c.add_message("user", "Count from one to fifty, in words.")
    cancel = threading.Event()
    seen: list[int] = []

    def on_delta(_: str) -> None:
        if not cancel.is_set():
            cancel.set()
            seen.append(c.stats.generated_tokens)

    text = collect(c.generate(SamplingParams(max_tokens=100), cancel), on_delta)
    assert c.stats.generated_tokens == seen[0]
    assert c.messages[-1]["content"] == text

    c.add_message("user", "Hi")
    cancelled = threading.Event()
    cancelled.set()
    assert collect(c.generate(GREEDY, cancelled)) == ""
    assert c.stats.generated_tokens == 0


@pytest.mark.models
def test_max_tokens_and_generating_again(smollm_engine: Engine) -> None:
    c = smollm_engine.new_conversation("")
    c.add_message("user", "Write a long story about a cat.")
    collect(c.generate(SamplingParams(max_tokens=5), no_cancel()))
    assert c.stats.generated_tokens == 5
    held = len(c.token_ids)
    c.close()  # unpins the KV; it stays in the shared cache until evicted
    c.add_message("user", "Go on.")
    collect(c.generate(SamplingParams(max_tokens=5), no_cancel()))
    assert c.stats.cached_tokens == held - 1  # re-matched from the radix cache
    _check_last_turn(smollm_engine, c)


@pytest.mark.models
def test_concurrent_conversations_match_sequential(smollm_engine: Engine) -> None:
    prompts = ["What is two plus two?", "Name a color.", "Say something about the sea."]

    def run(prompt: str) -> str:
        c = smollm_engine.new_conversation("")
        c.add_message("user", prompt)
        return collect(c.generate(SamplingParams(max_tokens=12), no_cancel()))

    sequential = [run(p) for p in prompts]
    results: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, run(prompts[i])))
        for i in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == sequential


@pytest.mark.models
def test_seeded_sampling_is_reproducible(smollm_engine: Engine) -> None:
    def run(seed: int) -> str:
        c = smollm_engine.new_conversation("")
        c.add_message("user", "Tell me a word.")
        params = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=seed)
        return collect(c.generate(params, no_cancel()))

    assert run(7) == run(7)


def test_sampling_filters() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(), g) == 1
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert {sample(logits, top1, g) for _ in range(20)} == {1}
    nucleus = SamplingParams(temperature=1.0, top_p=0.6)
    assert {sample(logits, nucleus, g) for _ in range(50)} <= {1, 2}
    assert {sample(logits, SamplingParams(temperature=5.0), g) for _ in range(200)} == {0, 1, 2, 3}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_on_a_hf_folder(arch: str, tmp_path: Path) -> None:
    folder = write_hf_folder(reference_model(arch), tmp_path / arch)
    engine = Engine.load(str(folder))
    assert engine.info()["arch"] == arch and engine.info()["device"] == "cpu"
    c = engine.new_conversation("be nice")
    c.add_message("user", "the weather")
    collect(c.generate(SamplingParams(max_tokens=6), no_cancel()))
    c.add_message("user", "then what")
    collect(c.generate(SamplingParams(max_tokens=6), no_cancel()))
    _check_last_turn(engine, c)
    engine.warmup()


@pytest.mark.models
@pytest.mark.slow
def test_qwen_answers_the_capital_of_france() -> None:
    from voicepipe.models import ModelError

    try:
        engine = Engine.load("qwen2.5-0.5b-instruct-q4_k_m")
    except ModelError as exc:
        unavailable(str(exc))
    info = engine.info()
    assert info["arch"] == "qwen2" and info["layers"] == 24
    c = engine.new_conversation("You are a helpful assistant.")
    c.add_message("user", "What is the capital of France?")
    answer = collect(c.generate(SamplingParams(max_tokens=30), no_cancel()))
    assert "Paris" in answer
    im_end = engine.tokenizer.encode("<|im_end|>")
    assert len(im_end) == 1 and im_end[0] in engine.tokenizer.stop_ids
