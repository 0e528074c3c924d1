"""Rotary embedding fused with the KV write: one program per (token, head) rotates a query head
in place of a copy, or rotates a key head and stores it, with its value head, straight into the
engine's KV pool rows (`slots`), so k and v never round-trip through a temporary. The reference is
the decoder's own `rope_kv_write` (rotate-half layout, as Hugging Face's)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from voicepipe.llm.model import rope_kv_write as reference  # the same signature, in plain torch

__all__ = ["fused", "make_inputs", "reference"]


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_pool_ptr, v_pool_ptr, slots_ptr, q_out_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_pool_s, stride_pool_h, n_q_heads, half,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < half
    cos_lo = tl.load(cos_ptr + t * 2 * half + i, mask=mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + t * 2 * half + half + i, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + t * 2 * half + i, mask=mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + t * 2 * half + half + i, mask=mask, other=0.0).to(tl.float32)
    if head < n_q_heads:
        src = q_ptr + t * stride_q_t + head * stride_q_h
        dst = q_out_ptr + (t * n_q_heads + head) * 2 * half
    else:
        kv_head = head - n_q_heads
        slot = tl.load(slots_ptr + t).to(tl.int64)
        src = k_ptr + t * stride_k_t + kv_head * stride_k_h
        dst = k_pool_ptr + slot * stride_pool_s + kv_head * stride_pool_h
        v_src = v_ptr + t * stride_v_t + kv_head * stride_v_h
        v_dst = v_pool_ptr + slot * stride_pool_s + kv_head * stride_pool_h
        tl.store(v_dst + i, tl.load(v_src + i, mask=mask), mask=mask)
        tl.store(v_dst + half + i, tl.load(v_src + half + i, mask=mask), mask=mask)
    lo = tl.load(src + i, mask=mask, other=0.0)
    hi = tl.load(src + half + i, mask=mask, other=0.0)
    lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
    tl.store(dst + i, (lo32 * cos_lo - hi32 * sin_lo).to(lo.dtype), mask=mask)
    tl.store(dst + half + i, (hi32 * cos_hi + lo32 * sin_hi).to(lo.dtype), mask=mask)


def fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `reference`. q, k, v may be strided views of one qkv projection (last
    dimension contiguous); the pools are one layer's [S, h_kv, d] with contiguous rows."""
    n, h_q, d = q.shape
    h_kv = k.shape[1]
    if k_pool.stride(1) != d or k_pool.stride() != v_pool.stride() or q.stride(2) != 1 \
            or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("rope_kv_write needs contiguous heads and identically laid out pools")
    q_out = q.new_empty((n, h_q, d))
    if n:
        cos2, sin2 = cos.reshape(n, d).contiguous(), sin.reshape(n, d).contiguous()
        _rope_kv_write_kernel[(n, h_q + h_kv)](
            q, k, v, cos2, sin2, k_pool, v_pool, slots, q_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_pool.stride(0), k_pool.stride(1), h_q, d // 2,
            BLOCK=triton.next_power_of_2(d // 2), num_warps=1)
    return q_out


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    """shape (tokens, q heads, kv heads, head dim, pool slots): q, k, v as views of one qkv
    projection, cos/sin of random positions, a random pool and distinct random target slots."""
    g = torch.Generator().manual_seed(seed)
    n, h_q, h_kv, d, pool_slots = shape
    qkv = torch.randn(n, (h_q + 2 * h_kv) * d, generator=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    positions = torch.randint(0, 4096, (n,), generator=g).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    k_pool = torch.randn(pool_slots, h_kv, d, generator=g)
    v_pool = torch.randn(pool_slots, h_kv, d, generator=g)
    slots = torch.randperm(pool_slots, generator=g)[:n]

    def on(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype)

    qkv = on(qkv)
    q, k, v = qkv.split((h_q * d, h_kv * d, h_kv * d), dim=-1)
    return (q.view(n, h_q, d), k.view(n, h_kv, d), v.view(n, h_kv, d), on(emb.cos()),
            on(emb.sin()), on(k_pool), on(v_pool), slots.to(device))
