"""The decoder's logits equal transformers' on the same weights, whole or step by step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from voicepipe.llm.hf import load_hf
from voicepipe.llm.model import Decoder, KVCache, ModelConfig

from .tiny import reference_model, write_hf_folder

IDS = [1, 70, 80, 90, 4, 200, 33, 34, 35, 250, 300, 12, 13, 2, 100, 101, 5]


def _reference_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(params=["llama", "qwen2"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[torch.nn.Module, Decoder]:
    model = reference_model(request.param)
    checkpoint = load_hf(write_hf_folder(model, tmp_path / request.param))
    assert checkpoint.config.arch == request.param
    return model, Decoder(checkpoint.config, dict(checkpoint.weights))


def test_logits_match_transformers(pair: tuple[torch.nn.Module, Decoder]) -> None:
    model, decoder = pair
    expected = _reference_logits(model, IDS)
    with torch.inference_mode():
        got = decoder.forward(torch.tensor(IDS), decoder.new_cache(), all_logits=True)
    assert expected.abs().max() > 1.0  # the random weights give logits that discriminate
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_decode_match_one_pass(pair: tuple[torch.nn.Module, Decoder]) -> None:
    model, decoder = pair
    expected = _reference_logits(model, IDS)
    cache = decoder.new_cache(capacity=4)  # forces the cache to grow twice
    got = []
    with torch.inference_mode():
        got.append(decoder.forward(torch.tensor(IDS[:5]), cache, all_logits=True))
        got.append(decoder.forward(torch.tensor(IDS[5:11]), cache, all_logits=True))
        for token in IDS[11:]:
            got.append(decoder.forward(torch.tensor([token]), cache).unsqueeze(0))
    assert cache.length == len(IDS)
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=1e-4)


def test_rollback_then_rerun_matches(pair: tuple[torch.nn.Module, Decoder]) -> None:
    model, decoder = pair
    other = IDS[:8] + [7, 8, 9]
    expected = _reference_logits(model, other)
    cache = decoder.new_cache()
    with torch.inference_mode():
        decoder.forward(torch.tensor(IDS), cache)
        cache.truncate(8)
        got = decoder.forward(torch.tensor(other[8:]), cache, all_logits=True)
    torch.testing.assert_close(got, expected[8:], atol=1e-4, rtol=1e-4)


def test_cache_refuses_to_outgrow_the_context() -> None:
    config = ModelConfig(
        arch="llama", n_layers=1, n_heads=2, n_kv_heads=1, hidden=8, intermediate=16,
        vocab_size=10, rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=True, context_length=16,
    )
    cache = KVCache(config, 4, torch.device("cpu"), torch.float32)
    cache.reserve(16)
    assert cache.capacity == 16
    with pytest.raises(ValueError, match="exceeds"):
        cache.reserve(17)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(arch="gpt2", n_layers=1, n_heads=2, n_kv_heads=1, hidden=8, intermediate=16,
                    vocab_size=10, rope_theta=1e4, rms_eps=1e-5, tie_embeddings=True,
                    context_length=16)


@pytest.mark.parametrize(("n", "layout"), [(16, "contiguous"), (1, "contiguous"), (5, "new only"),
                                           (12, "pages"), (3, "scattered")])
def test_prefill_attention_over_pages_equals_a_gathered_masked_attention(
    n: int, layout: str
) -> None:
    from voicepipe.llm.model import MAX_RUNS, _attention, _causal_mask, prefill_attention, slot_runs

    g = torch.Generator().manual_seed(n)
    h_q, h_kv, d, pool = 6, 2, 16, 4096
    k_pool, v_pool = torch.randn(pool, h_kv, d, generator=g), torch.randn(pool, h_kv, d, generator=g)
    if layout == "contiguous":
        slots = torch.arange(100, 900)
    elif layout == "new only":
        slots = torch.arange(7, 7 + n)
    elif layout == "pages":  # pages of 8 in shuffled order: a few runs, attended in place
        pages = torch.randperm(pool // 8, generator=g)[:MAX_RUNS - 4]
        slots = (pages[:, None] * 8 + torch.arange(8)).flatten()
    else:  # more runs than MAX_RUNS: the history is gathered once
        slots = torch.randperm(pool, generator=g)[:500]
    history = slot_runs(slots[: len(slots) - n])
    assert (layout != "scattered") == (len(history) <= MAX_RUNS)
    q = torch.randn(n, h_q, d, generator=g)
    expected = _attention(q, k_pool[slots].transpose(0, 1), v_pool[slots].transpose(0, 1),
                          _causal_mask(n, len(slots), h_q // h_kv, q.device))
    got = prefill_attention(q, k_pool, v_pool, slots, history)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
