"""Residual add + RMSNorm in one pass: each row of the hidden state is read once, its sum with the
layer's output written back (the new residual stream) and its normalized form written beside it.
The reference is the decoder's own `add_rms_norm`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from voicepipe.llm.model import add_rms_norm as reference  # the same signature, in plain torch

__all__ = ["fused", "make_inputs", "reference"]


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, n_cols, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = x + tl.load(delta_ptr + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, w * (xf * rstd).to(x.dtype), mask=mask)


def fused(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference`: (x + delta, its RMSNorm); with no delta, (x, RMSNorm(x))."""
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols).contiguous()
    out = torch.empty_like(rows)
    if delta is None:
        total, delta_rows = rows, rows
    else:
        total, delta_rows = torch.empty_like(rows), delta.reshape(-1, n_cols).contiguous()
    if rows.shape[0]:
        block = triton.next_power_of_2(n_cols)
        _add_rms_norm_kernel[(rows.shape[0],)](
            rows, delta_rows, weight, total, out, n_cols, eps, HAS_DELTA=delta is not None,
            BLOCK=block, num_warps=4 if block <= 2048 else 8)
    total = x if delta is None else total.view(x.shape)
    return total, out.view(x.shape)


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """shape (tokens, hidden): residual stream x, a layer output, a norm weight around 1."""
    g = torch.Generator().manual_seed(seed)
    rows, hidden = shape
    x = torch.randn(rows, hidden, generator=g) * 2
    delta = torch.randn(rows, hidden, generator=g)
    weight = 1 + 0.3 * torch.randn(hidden, generator=g)
    return (x.to(device, dtype), delta.to(device, dtype), weight.to(device, dtype), 1e-6)
