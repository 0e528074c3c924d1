"""The KV pool's dtype: bf16 KV on the CPU runs the fused C attention kernel when it loads and
PyTorch's attention when it does not, and either way a multi-turn conversation's greedy tokens
are those of the same tokens run without the prefix cache; "auto" picks bf16 only where the
kernel runs the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from voicepipe.kernels import cpu_attention

from voicepipe.llm.engine import Engine
from voicepipe.llm.hf import load_hf
from voicepipe.llm.model import BatchSegment, PagedKV
from voicepipe.stages.base import SamplingParams
from voicepipe.testing import require_cpu_attention

from .tiny import collect, no_cancel, reference_model, write_hf_folder

HEAD_64 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
KERNEL = "bf16 C kernel (AVX512-BF16)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_folder(reference_model("qwen2", **HEAD_64), tmp_path_factory.mktemp("q64"))


def _without_cache(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of `prompt` in a fresh pool of the engine's KV dtype: the whole
    prompt in one prefill, then decode steps (no prefix cache, no earlier turns' KV)."""
    decoder = engine.decoder
    kv = decoder.new_paged_kv(engine.pool.num_pages, engine.pool.page_size, engine.kv.k.dtype)
    slots = list(range(len(prompt)))
    tokens = torch.tensor(prompt)
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < n:
            logits = decoder.forward_paged(tokens, [BatchSegment(len(tokens),
                                                                 torch.tensor(slots))], kv)
            out.append(int(logits[0].argmax()))
            if out[-1] in engine.tokenizer.stop_ids:
                break
            tokens = torch.tensor(out[-1:])
            slots.append(len(slots))
    return out


def _turns_match_a_run_without_cache(engine: Engine) -> None:
    c = engine.new_conversation("be nice")
    for i, text in enumerate(["the weather", "then what", "the sea", "and the wind"]):
        c.add_message("user", text)
        collect(c.generate(SamplingParams(max_tokens=10), no_cancel()))
        ids, n = c.token_ids, c.stats.generated_tokens
        if i:
            assert c.stats.cached_tokens > 20  # the history came from the cache
        assert _without_cache(engine, ids[:-n], n) == ids[-n:]
        if i == 1:  # barge-in: the next turn runs after a rollback
            c.truncate_last_assistant(c.messages[-1]["content"][:3])
    c.close()


# float32 weights: int8 quantizes each forward's activations over one shared range, so a row's
# numbers depend on what it was batched with far more than under float32 rounding, and bf16
# rounding amplifies such differences until a near-tie of a random model flips a greedy token.
def test_bf16_kv_with_the_kernel_matches_a_run_without_cache(folder: Path) -> None:
    require_cpu_attention()
    engine = Engine.from_checkpoint(load_hf(folder), dtype="float32", kv_dtype="bfloat16")
    assert engine.attention == KERNEL and engine.kv.k.dtype == torch.bfloat16
    _turns_match_a_run_without_cache(engine)
    engine.close()


def test_without_the_kernel_bf16_kv_runs_on_pytorch_and_auto_is_float32(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    engine = Engine.from_checkpoint(load_hf(folder), dtype="float32", kv_dtype="bfloat16")
    assert engine.attention == "torch" and engine.info()["kv_dtype"] == "bfloat16"
    _turns_match_a_run_without_cache(engine)
    engine.close()
    assert Engine.from_checkpoint(load_hf(folder)).info()["kv_dtype"] == "float32"


def test_auto_is_bf16_where_the_kernel_runs_the_model(folder: Path, tmp_path: Path) -> None:
    require_cpu_attention()
    engine = Engine.from_checkpoint(load_hf(folder), num_pages=8)
    assert engine.info()["kv_dtype"] == "bfloat16" and engine.info()["attention"] == KERNEL
    tiny = write_hf_folder(reference_model("qwen2"), tmp_path / "d16")  # head_dim 16
    assert Engine.from_checkpoint(load_hf(tiny), num_pages=8).info()["kv_dtype"] == "float32"
    explicit = Engine.from_checkpoint(load_hf(folder), num_pages=8, kv_dtype="float32")
    assert explicit.info()["kv_dtype"] == "float32" and explicit.attention == "torch"


def test_kv_bytes_and_bad_kv_dtypes(folder: Path) -> None:
    config = load_hf(folder).config
    assert PagedKV.bytes_per_token(config, torch.bfloat16) * 2 == PagedKV.bytes_per_token(
        config, torch.float32)
    with pytest.raises(ValueError, match="KV dtype"):
        Engine.from_checkpoint(load_hf(folder), num_pages=8, kv_dtype="int4")
