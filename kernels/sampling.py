"""Sampling of a batch of next tokens on the device, without a host sync: temperature, top-k and
top-p (nucleus) per row, the random draw passed in as one uniform number per row (so the whole
step, sampling included, can be replayed as a CUDA graph).

Semantics (the engine's `sample`, batched): temperature <= 0 is greedy; otherwise the row is
sorted, cut to its `top_k` best (0: no cut), then to the smallest head whose probability mass
reaches `top_p` (1: no cut), renormalized, and the token is the first whose cumulative probability
exceeds `uniform * kept mass` (inverse-CDF sampling). The fused version sorts with torch and does
the rest in one kernel per row (three passes over the sorted row: normalizer, kept mass, draw)
instead of a dozen full-vocabulary torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Token ids [B] from logits [B, V] and per-row temperature, top_k, top_p, uniform [B]."""
    logits = logits.float() if logits.dtype != torch.float64 else logits
    vocab = logits.shape[-1]
    scaled = logits / temperature.clamp(min=1e-6).to(logits.dtype)[:, None]
    values, indices = scaled.sort(-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    keep = rank[None, :] < torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1)
    cdf = probs.masked_fill(~keep, 0.0).cumsum(-1)
    target = uniform.to(cdf.dtype) * cdf[:, -1]
    choice = (cdf <= target[:, None]).sum(-1).clamp(max=vocab - 1)
    sampled = indices.gather(1, choice[:, None]).squeeze(1)
    return torch.where(temperature > 0, sampled, logits.argmax(-1))


@triton.jit
def _sample_sorted_kernel(values_ptr, indices_ptr, temperature_ptr, top_k_ptr, top_p_ptr,
                          uniform_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = values_ptr + row * vocab
    inv_t = 1.0 / tl.maximum(tl.load(temperature_ptr + row).to(tl.float32), 1e-6)
    k = tl.load(top_k_ptr + row).to(tl.int32)
    k = tl.where(k > 0, tl.minimum(k, vocab), vocab)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    top_p = tl.where(top_p >= 1.0, 3.0, top_p)  # 1: no cut (a mass never reaches 3)
    top = tl.load(base).to(tl.float32) * inv_t
    # Pass 1: the softmax normalizer over the top k.
    norm = 0.0
    for start in range(0, k, BLOCK):
        r = start + tl.arange(0, BLOCK)
        v = tl.load(base + r, mask=r < k, other=float("-inf")).to(tl.float32) * inv_t
        norm += tl.sum(tl.exp(v - top), axis=0)
    # Pass 2: the mass of the kept head (mass before a token below top_p).
    kept = 0.0
    carry = 0.0
    for start in range(0, k, BLOCK):
        r = start + tl.arange(0, BLOCK)
        v = tl.load(base + r, mask=r < k, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(v - top) / norm
        before = carry + tl.cumsum(p, axis=0) - p
        keep = (r < k) & (before < top_p)
        kept += tl.sum(tl.where(keep, p, 0.0), axis=0)
        carry += tl.sum(p, axis=0)
    # Pass 3: the first kept token whose cumulative probability exceeds the draw.
    target = tl.load(uniform_ptr + row).to(tl.float32) * kept
    choice = 0
    carry = 0.0
    for start in range(0, k, BLOCK):
        r = start + tl.arange(0, BLOCK)
        v = tl.load(base + r, mask=r < k, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(v - top) / norm
        cum = carry + tl.cumsum(p, axis=0)
        before = cum - p
        keep = (r < k) & (before < top_p)
        kept_cum = tl.minimum(cum, kept)  # flat past the cut, as the reference's cdf
        choice += tl.sum(tl.where(keep & (kept_cum <= target), 1, 0), axis=0)
        carry += tl.sum(p, axis=0)
    choice = tl.minimum(choice, k - 1)
    tl.store(out_ptr + row, tl.load(indices_ptr + row * vocab + choice))


def fused(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `reference`."""
    values, indices = logits.sort(-1, descending=True)
    values = values.contiguous()
    out = torch.empty(logits.shape[0], device=logits.device, dtype=torch.long)
    if logits.shape[0]:
        _sample_sorted_kernel[(logits.shape[0],)](
            values, indices.contiguous(), temperature, top_k, top_p, uniform, out,
            logits.shape[1], BLOCK=1024, num_warps=4)
    return torch.where(temperature > 0, out, logits.argmax(-1))


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device, seed: int
) -> tuple[torch.Tensor, ...]:
    """shape (batch, vocab): peaked logits (a few strong candidates over a long tail) and per-row
    settings covering greedy, plain temperature, top-k only, top-p only, and both."""
    g = torch.Generator().manual_seed(seed)
    batch, vocab = shape
    logits = torch.randn(batch, vocab, generator=g) * 2
    logits.scatter_add_(1, torch.randint(0, vocab, (batch, 4), generator=g),
                        torch.rand(batch, 4, generator=g) * 8)
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 1.0), (0.8, 0, 0.9), (1.2, 50, 0.8)]
    rows = [settings[i % len(settings)] for i in range(batch)]
    temperature = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    top_k = torch.tensor([r[1] for r in rows], dtype=torch.long)
    top_p = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    uniform = torch.rand(batch, generator=g)
    return (logits.to(device, dtype), temperature.to(device), top_k.to(device), top_p.to(device),
            uniform.to(device))
