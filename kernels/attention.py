"""Paged decode attention: one new query token per sequence against its keys and values scattered
over the engine's KV pool. `slot_table[b, :lengths[b]]` lists sequence b's pool rows in order (the
radix cache shares prefixes at token granularity, so a sequence's rows are not whole pages).

Split-KV ("flash decoding"): the sequence is cut into `num_splits` equal ranges and one program per
(sequence, kv head, range) runs an online softmax over its range for the whole query group of that
kv head, so every key row is read once for all the query heads that share it. A second kernel merges
the ranges by their log-sum-exp. The reference is the decoder's own `decode_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from voicepipe.llm.model import decode_attention as reference  # the same signature, in plain torch

__all__ = ["fused", "make_inputs", "reference"]

_BLOCK_N = 16  # key rows per inner step
_SPLIT_TARGET = 64  # key rows per split, at least


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, part_out_ptr, part_lse_ptr,
    stride_q_b, stride_q_h, stride_pool_s, stride_pool_h, stride_slots_b,
    group, head_dim, split_len, num_splits, scale,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + b).to(tl.int32)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group
    d_mask = d < head_dim
    heads = kv_head * group + g
    q = tl.load(q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        slot = tl.load(slots_ptr + b * stride_slots_b + n, mask=n_mask, other=0).to(tl.int64)
        rows = slot[:, None] * stride_pool_s + kv_head * stride_pool_h + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        keys = tl.load(k_ptr + rows, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # [G, N]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        values = tl.load(v_ptr + rows, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        m = m_new
    filled = total > 0
    out = acc / tl.where(filled, total, 1.0)[:, None]
    lse = tl.where(filled, m + tl.log(tl.where(filled, total, 1.0)), float("-inf"))
    row = (b * tl.num_programs(1) * group + heads) * num_splits + split
    tl.store(part_out_ptr + row[:, None] * head_dim + d[None, :], out,
             mask=g_mask[:, None] & d_mask[None, :])
    tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, head_dim, num_splits,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * h_q + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(s_mask & (lse > float("-inf")), tl.exp(lse - top), 0.0)
    parts = tl.load(part_out_ptr + (row * num_splits + s)[:, None] * head_dim + d[None, :],
                    mask=s_mask[:, None] & (d < head_dim)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def num_splits_for(max_length: int) -> int:
    """Splits for slot tables of `max_length` columns: enough programs to fill a GPU at batch 1,
    none shorter than `_SPLIT_TARGET` rows."""
    return max(1, min(64, triton.cdiv(max_length, _SPLIT_TARGET)))


def fused(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `reference`. The number of splits depends only on slot_table's width,
    so a CUDA graph captured for one width stays valid for any lengths up to it."""
    b, h_q, d = q.shape
    h_kv = k_pool.shape[1]
    group = h_q // h_kv
    if k_pool.stride() != v_pool.stride() or k_pool.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("decode_attention needs identically laid out pools with contiguous heads")
    slot_table = slot_table if slot_table.stride(1) == 1 else slot_table.contiguous()
    max_length = slot_table.shape[1]
    splits = num_splits_for(max_length)
    split_len = triton.cdiv(triton.cdiv(max_length, splits), _BLOCK_N) * _BLOCK_N
    part_out = torch.empty((b, h_q, splits, d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((b, h_q, splits), device=q.device, dtype=torch.float32)
    out = q.new_empty((b, h_q, d))
    if b == 0:
        return out
    block_d = triton.next_power_of_2(d)
    _split_kernel[(b, h_kv, splits)](
        q, k_pool, v_pool, slot_table, lengths, part_out, part_lse,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), slot_table.stride(0),
        group, d, split_len, splits, 1.0 / math.sqrt(d),
        BLOCK_G=triton.next_power_of_2(group), BLOCK_N=_BLOCK_N, BLOCK_D=block_d, num_warps=4)
    _merge_kernel[(b * h_q,)](part_out, part_lse, out, d, splits,
                              BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
                              num_warps=1)
    return out


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    """shape (batch, q heads, kv heads, head dim, longest length, page size): a pool of random
    keys and values; each sequence a random length up to the longest (one of them the longest),
    its tokens on randomly chosen, scattered pages, the table padded with a stray slot."""
    g = torch.Generator().manual_seed(seed)
    batch, h_q, h_kv, d, longest, page_size = shape
    pages_per_seq = triton.cdiv(longest, page_size)
    num_pages = batch * pages_per_seq + 3
    pool_slots = num_pages * page_size
    lengths = torch.randint(1, longest + 1, (batch,), generator=g)
    lengths[0] = longest
    pages = torch.randperm(num_pages, generator=g)[: batch * pages_per_seq].view(batch, -1)
    slots = (pages[:, :, None] * page_size + torch.arange(page_size)).view(batch, -1)[:, :longest]
    padding = torch.arange(longest)[None, :] >= lengths[:, None]
    slots = slots.masked_fill(padding, pool_slots - 1)  # padding points at a real row
    q = torch.randn(batch, h_q, d, generator=g)
    k_pool = torch.randn(pool_slots, h_kv, d, generator=g)
    v_pool = torch.randn(pool_slots, h_kv, d, generator=g)
    return (q.to(device, dtype), k_pool.to(device, dtype), v_pool.to(device, dtype),
            slots.to(device), lengths.to(device))
