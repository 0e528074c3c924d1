"""Fused kernels beside their plain-torch references (imported as `voicepipe.kernels`).

`KERNELS` maps a name to a `Kernel`: the Triton `fused` function, the plain-torch `reference` with
the same signature, and `make_inputs(shape, dtype, device, seed)`, so tests and the GPU check
treat every kernel alike. `use_fused(decoder)` puts the fused kernels into a loaded decoder's
`ops` table; the first time a kernel is used on a device and dtype it is run against its reference
on inputs of the decoder's shapes, and one that fails to compile or disagrees stays on its
reference (with a logged warning).

Triton chooses between the compiler and its CPU interpreter when a kernel module is imported:
set `TRITON_INTERPRET=1` before `KERNELS` is first used to run the kernels on the CPU. The
Triton modules are imported on that first use, so a CPU install without Triton can still use
`use_cpu_attention`, the fused bf16 attention in C (`cpu_attention`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from voicepipe.llm.model import Decoder, ModelConfig

from . import cpu_attention

log = logging.getLogger(__name__)

Args = tuple[Any, ...]


def _tensors(result: Any) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def _run_rope(fn: Callable[..., Any], args: Args) -> list[torch.Tensor]:
    # The pools are outputs too: run on private copies and compare them whole.
    q, k, v, cos, sin, k_pool, v_pool, slots = args
    k_pool, v_pool = k_pool.clone(), v_pool.clone()
    return [fn(q, k, v, cos, sin, k_pool, v_pool, slots), k_pool, v_pool]


@dataclass(frozen=True)
class Kernel:
    """One fused kernel and what is needed to check and time it against its reference."""

    name: str
    fused: Callable[..., Any]
    reference: Callable[..., Any]
    make_inputs: Callable[[tuple[int, ...], torch.dtype, str | torch.device, int], Args]
    model_shape: Callable[[ModelConfig, int], tuple[int, ...]]  # (config, tokens) -> shape
    run: Callable[[Callable[..., Any], Args], list[torch.Tensor]] = (
        lambda fn, args: _tensors(fn(*args)))
    ids: bool = False  # outputs are token ids: error is the fraction that differ

    def error(self, got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        """Max abs difference relative to the largest reference magnitude (at least 1), or for
        token ids the fraction that differ."""
        if self.ids:
            return max(float((g != w).float().mean()) for g, w in zip(got, want, strict=True))
        return max(
            float((g.double() - w.double()).abs().max()) / max(1.0, float(w.double().abs().max()))
            for g, w in zip(got, want, strict=True) if w.numel())

    def tolerance(self, dtype: torch.dtype) -> float:
        if self.ids:
            return 0.05  # a draw that falls on a cumulative boundary may round either way
        return {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3}.get(dtype, 3e-2)


def _c(fn: Callable[[ModelConfig, int], tuple[int, ...]]) -> Callable[[ModelConfig, int],
                                                                      tuple[int, ...]]:
    return fn


KERNELS: dict[str, Kernel]  # `_registry`, filled on first use (it imports Triton)
_registry: dict[str, Kernel] = {}


def _kernels() -> dict[str, Kernel]:
    if not _registry:
        from . import attention, rmsnorm, rope, sampling, silu_mul

        _registry.update({k.name: k for k in (
            Kernel("add_rms_norm", rmsnorm.fused, rmsnorm.reference, rmsnorm.make_inputs,
                   _c(lambda c, n: (n, c.hidden))),
            Kernel("rope_kv_write", rope.fused, rope.reference, rope.make_inputs,
                   _c(lambda c, n: (n, c.n_heads, c.n_kv_heads, c.head_dim, 4096)),
                   run=_run_rope),
            Kernel("silu_mul", silu_mul.fused, silu_mul.reference, silu_mul.make_inputs,
                   _c(lambda c, n: (n, c.intermediate))),
            Kernel("decode_attention", attention.fused, attention.reference,
                   attention.make_inputs,
                   _c(lambda c, n: (n, c.n_heads, c.n_kv_heads, c.head_dim, 1024, 16))),
            Kernel("sampling", sampling.fused, sampling.reference, sampling.make_inputs,
                   _c(lambda c, n: (n, c.vocab_size)), ids=True),
        )})
    return _registry


def __getattr__(name: str) -> Any:
    if name == "KERNELS":
        return _kernels()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DECODER_OPS = ("add_rms_norm", "rope_kv_write", "silu_mul", "decode_attention")
_VERDICTS: dict[tuple[str, str, torch.dtype], bool] = {}


def check(kernel: Kernel, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `kernel.fused` compiles and agrees with its reference on `device` in `dtype` on
    inputs of `config`'s shapes; decided once per (kernel, device, dtype), warns when not."""
    key = (kernel.name, str(device), dtype)
    if key not in _VERDICTS:
        try:
            args = kernel.make_inputs(kernel.model_shape(config, 3), dtype, device, 0)
            err = kernel.error(kernel.run(kernel.fused, args), kernel.run(kernel.reference, args))
            ok = err <= kernel.tolerance(dtype)
            if not ok:
                log.warning("fused kernel %s disagrees with its reference on %s %s (error %.3g);"
                            " using the reference", kernel.name, device, dtype, err)
        except Exception as exc:  # a compile or launch failure: fall back, never fail the load
            log.warning("fused kernel %s failed on %s %s (%s: %s); using the reference",
                        kernel.name, device, dtype, type(exc).__name__, exc)
            ok = False
        _VERDICTS[key] = ok
    return _VERDICTS[key]


def use_fused(decoder: Decoder, names: tuple[str, ...] = DECODER_OPS) -> dict[str, bool]:
    """Put the fused kernels that pass `check` into `decoder.ops`; returns name -> fused in use."""
    used = {}
    for name in names:
        kernel = _kernels()[name]
        used[name] = check(kernel, decoder.config, decoder.device, decoder.dtype)
        setattr(decoder.ops, name, kernel.fused if used[name] else kernel.reference)
    return used


def use_reference(decoder: Decoder) -> None:
    """Put the plain-torch references back into `decoder.ops`."""
    for name in DECODER_OPS:
        setattr(decoder.ops, name, _kernels()[name].reference)


def use_cpu_attention(decoder: Decoder) -> bool:
    """Put the fused bf16 CPU attention (`cpu_attention`) into `decoder.ops`, for a bf16 KV pool
    on the CPU; False, leaving PyTorch's attention in place, where the kernel cannot run."""
    c = decoder.config
    if (decoder.device.type != "cpu" or not cpu_attention.supports(c.n_heads, c.n_kv_heads,
                                                                   c.head_dim)
            or not cpu_attention.available()):
        return False
    decoder.ops.prefill_attention = cpu_attention.prefill_attention
    decoder.ops.decode_attention = cpu_attention.decode_attention
    return True
