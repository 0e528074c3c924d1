"""SiLU-and-mul of the MLP's fused gate/up projection: SiLU(gate) * up, read once, written once.
The reference is the decoder's own `silu_mul`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from voicepipe.llm.model import silu_mul as reference  # the same signature, in plain torch

__all__ = ["fused", "make_inputs", "reference"]


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    out = gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, out.to(up.dtype), mask=mask)


def fused(gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference`: [..., 2 * I] -> [..., I]."""
    n_cols = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * n_cols).contiguous()
    out = rows.new_empty((rows.shape[0], n_cols))
    block = min(1024, triton.next_power_of_2(n_cols))
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](rows, out, n_cols,
                                                                       BLOCK=block)
    return out.view(*gate_up.shape[:-1], n_cols)


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device, seed: int
) -> tuple[torch.Tensor]:
    """shape (tokens, intermediate): the gate/up projection [tokens, 2 * intermediate]."""
    g = torch.Generator().manual_seed(seed)
    rows, intermediate = shape
    return ((torch.randn(rows, 2 * intermediate, generator=g) * 3).to(device, dtype),)
