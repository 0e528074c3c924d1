"""Every fused kernel against a float64 run of its reference, in float32 and float16, on several
shapes (odd sizes, padded heads, partial blocks, masked tails), under Triton's interpreter."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from voicepipe.kernels import KERNELS, Kernel

SHAPES: dict[str, list[tuple[int, ...]]] = {
    # (tokens, hidden)
    "add_rms_norm": [(1, 64), (3, 40), (5, 130)],
    # (tokens, q heads, kv heads, head dim, pool slots)
    "rope_kv_write": [(1, 4, 2, 8, 16), (3, 4, 2, 24, 50), (5, 6, 1, 12, 20)],
    # (tokens, intermediate)
    "silu_mul": [(1, 64), (3, 37), (2, 1100)],
    # (batch, q heads, kv heads, head dim, longest, page size)
    "decode_attention": [(1, 4, 2, 16, 1, 4), (3, 4, 2, 24, 37, 4), (2, 8, 1, 8, 130, 16),
                         (2, 6, 2, 16, 300, 8)],
    # (batch, vocab)
    "sampling": [(5, 300), (6, 1500)],
}
DTYPES = [torch.float32, torch.float16]


def _float64(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def test_every_kernel_has_test_shapes() -> None:
    assert set(SHAPES) == set(KERNELS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [n for n in SHAPES if n != "sampling"])
def test_fused_matches_float64_reference(name: str, dtype: torch.dtype) -> None:
    kernel = KERNELS[name]
    for seed, shape in enumerate(SHAPES[name]):
        args = kernel.make_inputs(shape, dtype, "cpu", seed)
        got = kernel.run(kernel.fused, args)
        want = kernel.run(kernel.reference, _float64(args))
        assert all(g.dtype == a.dtype for g, a in zip(got, kernel.run(kernel.reference, args),
                                                      strict=True))
        assert kernel.error(got, want) <= kernel.tolerance(dtype), shape


def test_rms_norm_without_residual() -> None:
    kernel = KERNELS["add_rms_norm"]
    x, _, weight, eps = kernel.make_inputs((3, 50), torch.float32, "cpu", 0)
    total, normed = kernel.fused(x, None, weight, eps)
    assert total is x
    assert kernel.error([normed], [kernel.reference(x.double(), None, weight.double(), eps)[1]]) \
        <= 1e-4


def test_rope_writes_only_its_slots() -> None:
    kernel = KERNELS["rope_kv_write"]
    args = kernel.make_inputs((3, 4, 2, 8, 16), torch.float32, "cpu", 0)
    _, k_pool, v_pool = kernel.run(kernel.fused, args)
    others = torch.ones(16, dtype=torch.bool)
    others[args[-1]] = False
    assert torch.equal(k_pool[others], args[5][others])
    assert torch.equal(v_pool[others], args[6][others])
    assert torch.equal(v_pool[args[-1]], args[2])


def _check_draws(kernel: Kernel, args: tuple[Any, ...], tokens: torch.Tensor) -> None:
    """Each drawn token's float64 cumulative-probability interval holds the draw (up to a
    rounding margin); greedy rows take the argmax."""
    logits, temperature, top_k, top_p, uniform = _float64(args)
    for row in range(logits.shape[0]):
        token = int(tokens[row])
        if temperature[row] <= 0:
            assert token == int(logits[row].argmax())
            continue
        values, indices = (logits[row] / temperature[row]).sort(descending=True)
        k = int(top_k[row]) or values.numel()
        probs = torch.softmax(values[:k], 0)
        before = probs.cumsum(0) - probs
        if top_p[row] < 1:
            probs = probs.masked_fill(before >= top_p[row], 0.0)
        cdf = probs.cumsum(0) / probs.sum()
        rank = int((indices == token).nonzero())
        assert rank < k and probs[rank] > 0
        low = float(cdf[rank - 1]) if rank else 0.0
        assert low - 1e-4 <= float(uniform[row]) <= float(cdf[rank]) + 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampling_draws_match_float64_distribution(dtype: torch.dtype) -> None:
    kernel = KERNELS["sampling"]
    for seed, shape in enumerate(SHAPES["sampling"]):
        args = kernel.make_inputs(shape, dtype, "cpu", seed)
        _check_draws(kernel, args, kernel.fused(*args))
        _check_draws(kernel, args, kernel.reference(*args))


def test_sampling_frequencies_follow_the_kept_distribution() -> None:
    kernel = KERNELS["sampling"]
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    n = logits.shape[0]
    temperature, top_k, top_p = torch.full((n,), 0.9), torch.full((n,), 4), torch.full((n,), 0.8)
    uniform = (torch.arange(n) + 0.5) / n  # evenly spread draws: frequencies are near exact
    tokens = kernel.fused(logits, temperature, top_k, top_p, uniform)
    probs = torch.softmax(logits[0, :4] / 0.9, 0)
    kept = (probs.cumsum(0) - probs) < 0.8
    expected = torch.where(kept, probs, 0.0) / probs[kept].sum()
    counts = torch.bincount(tokens, minlength=6).float() / n
    assert torch.allclose(counts[:4], expected, atol=0.01) and counts[4:].sum() == 0
