"""Paged decode attention against dense attention over the same tokens: each sequence's keys and
values are written to randomly scattered pages (with a prefix shared at a mid-page boundary, as the
radix cache does), and the fused kernel must agree with float64 softmax attention over the dense
tensors."""

from __future__ import annotations

import pytest
import torch
from voicepipe.kernels import attention


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [h_q, d] over k, v [L, h_kv, d], float64, kv heads repeated per query group."""
    group = q.shape[0] // k.shape[1]
    k = k.double().repeat_interleave(group, 1).transpose(0, 1)  # [h_q, L, d]
    v = v.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = (q.double()[:, None, :] * k).sum(-1) / q.shape[-1] ** 0.5
    return (torch.softmax(scores, -1)[:, :, None] * v).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("h_q,h_kv,d,page", [(4, 2, 16, 4), (6, 2, 24, 16), (8, 1, 8, 8)])
def test_paged_matches_dense(dtype: torch.dtype, h_q: int, h_kv: int, d: int, page: int) -> None:
    g = torch.Generator().manual_seed(h_q * 100 + d)
    lengths = [1, 45, 200, 23]
    num_pages = 128
    k_pool = torch.randn(num_pages * page, h_kv, d, generator=g).to(dtype)
    v_pool = torch.randn(num_pages * page, h_kv, d, generator=g).to(dtype)
    free = torch.randperm(num_pages, generator=g).tolist()
    dense_k, dense_v, slot_lists = [], [], []
    for length in lengths:
        slots: list[int] = []
        while len(slots) < length:
            p = free.pop()
            slots += range(p * page, (p + 1) * page)
        slot_lists.append(slots[:length])
    # The last sequence shares the first 5 tokens of the third, then continues on a fresh page.
    slot_lists[3][:5] = slot_lists[2][:5]
    for row, slots in enumerate(slot_lists):
        keys = torch.randn(len(slots), h_kv, d, generator=g).to(dtype)
        values = torch.randn(len(slots), h_kv, d, generator=g).to(dtype)
        if row == 3:
            keys[:5], values[:5] = dense_k[2][:5], dense_v[2][:5]
        k_pool[slots], v_pool[slots] = keys, values
        dense_k.append(keys)
        dense_v.append(values)
    longest = max(lengths)
    table = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, slots in enumerate(slot_lists):
        table[row, : len(slots)] = torch.tensor(slots)
    q = torch.randn(len(lengths), h_q, d, generator=g).to(dtype)
    out = attention.fused(q, k_pool, v_pool, table, torch.tensor(lengths))
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for row in range(len(lengths)):
        want = _dense(q[row], dense_k[row], dense_v[row])
        assert (out[row].double() - want).abs().max() <= tol, row


def test_splits_depend_only_on_table_width() -> None:
    assert attention.num_splits_for(1) == 1
    assert attention.num_splits_for(200) == 4
    assert attention.num_splits_for(1 << 20) == 64
