"""The bf16 CPU attention kernel against float64 softmax attention over the same bf16 keys and
values: prefill (causal among the new tokens, over a history read in place from scattered or
consecutive pool slots) and batched decode, head dims 64 and 128, query groups of 1 and 7."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from voicepipe.kernels import cpu_attention

from voicepipe.llm.model import prefill_attention, slot_runs
from voicepipe.testing import require_cpu_attention

PAGE = 16
TOLERANCE = 2e-2  # q and the softmax weights are rounded to bf16 (relative 2^-9) in the kernel


@pytest.fixture(autouse=True)
def kernel() -> Iterator[None]:
    require_cpu_attention()
    yield


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, h_q, d] at the last n positions of k, v [L, h_kv, d], causal, float64; [n, h_q*d]."""
    n, h_q, d = q.shape
    length, h_kv, _ = k.shape
    group = h_q // h_kv
    keys = k.double().repeat_interleave(group, 1).transpose(0, 1)  # [h_q, L, d]
    values = v.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(d)  # [h_q, n, L]
    visible = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    return (weights @ values).transpose(0, 1).reshape(n, h_q * d)


def _pool_and_slots(
    length: int, h_kv: int, d: int, scattered: bool, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bf16 pool with room for `length` tokens and their slots: whole pages in random order
    (with a page shared from its middle, as the radix cache does), or one consecutive run."""
    pages = length // PAGE + 4
    k_pool = torch.randn(pages * PAGE, h_kv, d, generator=g).bfloat16()
    v_pool = torch.randn(pages * PAGE, h_kv, d, generator=g).bfloat16()
    if scattered:
        order = torch.randperm(pages, generator=g)
        slots = (order[:, None] * PAGE + torch.arange(PAGE)).flatten()[3 : 3 + length]
    else:
        slots = torch.arange(5, 5 + length)
    return k_pool, v_pool, slots


@pytest.mark.parametrize("scattered", [True, False], ids=["scattered", "consecutive"])
@pytest.mark.parametrize("history", [0, 1, 15, 16, 17, 500])
@pytest.mark.parametrize("n", [1, 2, 21, 40])
@pytest.mark.parametrize("h_q,h_kv,d", [(7, 1, 64), (14, 2, 64), (4, 4, 128), (14, 2, 128)])
def test_prefill_matches_float64(
    h_q: int, h_kv: int, d: int, n: int, history: int, scattered: bool
) -> None:
    g = torch.Generator().manual_seed(history * 1000 + n * 10 + d + h_q)
    k_pool, v_pool, slots = _pool_and_slots(history + n, h_kv, d, scattered, g)
    q = 2 * torch.randn(n, h_q, d, generator=g)  # peaked softmax: the running max matters
    got = cpu_attention.prefill_attention(q, k_pool, v_pool, slots, [])
    want = _reference(q, k_pool[slots], v_pool[slots])
    assert got.shape == (n, h_q * d) and got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) < TOLERANCE


def test_decode_batch_matches_float64() -> None:
    """Sequences of different lengths, one new token each, padded slot table."""
    g = torch.Generator().manual_seed(1)
    h_q, h_kv, d = 14, 2, 64
    lengths = [1, 16, 17, 300, 45]
    k_pool, v_pool, slots = _pool_and_slots(sum(lengths), h_kv, d, True, g)
    table = torch.full((len(lengths), max(lengths)), int(slots[0]))  # padding: a real row
    start = 0
    for b, length in enumerate(lengths):
        table[b, :length] = slots[start : start + length]
        start += length
    q = 2 * torch.randn(len(lengths), h_q, d, generator=g)
    got = cpu_attention.decode_attention(q, k_pool, v_pool, table, torch.tensor(lengths))
    assert got.shape == (len(lengths), h_q, d)
    for b, length in enumerate(lengths):
        rows = table[b, :length]
        want = _reference(q[b : b + 1], k_pool[rows], v_pool[rows]).view(h_q, d)
        assert float((got[b].double() - want).abs().max()) < TOLERANCE


def test_a_row_gives_the_same_bits_however_it_is_batched() -> None:
    """A token's attention is the same in a prefill of many rows, alone, as a decode step and
    on one thread or two: a turn that hits the prefix cache computes what a cold one does.
    Rows go in 16-lane blocks and a last block of up to 8 rows in 8-lane vectors: the first
    token's rows are in a 16-lane block of the prefill and in an 8-lane one alone."""
    g = torch.Generator().manual_seed(2)
    k_pool, v_pool, slots = _pool_and_slots(300, 2, 64, True, g)
    q = torch.randn(21, 14, 64, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = cpu_attention.prefill_attention(q, k_pool, v_pool, slots, [])
        torch.set_num_threads(1)
        alone = cpu_attention.prefill_attention(q[-1:], k_pool, v_pool, slots, [])
        first = cpu_attention.prefill_attention(q[:1], k_pool, v_pool, slots[:-20], [])
    finally:
        torch.set_num_threads(threads)
    decoded = cpu_attention.decode_attention(q[-1:], k_pool, v_pool, slots[None],
                                             torch.tensor([300]))
    assert torch.equal(batched[-1], alone[0]) and torch.equal(alone[0], decoded.view(-1))
    assert torch.equal(batched[0], first[0])


def test_pytorch_attention_reads_a_bf16_pool_too() -> None:
    """The fallback: the decoder's own prefill attention widens a bf16 pool as it reads it."""
    g = torch.Generator().manual_seed(3)
    k_pool, v_pool, slots = _pool_and_slots(200, 2, 64, True, g)
    q = torch.randn(21, 14, 64, generator=g)
    runs = slot_runs(slots[:-21])
    torch_bf16 = prefill_attention(q, k_pool, v_pool, slots, runs)
    want = _reference(q, k_pool[slots], v_pool[slots])
    assert float((torch_bf16.double() - want).abs().max()) < 1e-4
    kernel = cpu_attention.prefill_attention(q, k_pool, v_pool, slots, runs)
    assert float((kernel.double() - want).abs().max()) < TOLERANCE


def test_unsupported_shapes_are_refused() -> None:
    assert cpu_attention.supports(14, 2, 64) and cpu_attention.supports(32, 8, 128)
    assert not cpu_attention.supports(4, 2, 16) and not cpu_attention.supports(6, 4, 64)
    pool = torch.zeros(32, 2, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dimension"):
        cpu_attention.prefill_attention(torch.zeros(2, 4, 48), pool, pool, torch.arange(4), [])
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_attention.prefill_attention(torch.zeros(2, 4, 64), pool.float(), pool.float(),
                                        torch.arange(4), [])
