"""Fused bf16 attention for x86 CPUs with AVX512-BF16, over a bf16 paged KV pool.

The C source (`cpu_attention.c`, beside this module) is compiled on first use with the system C
compiler into the voicepipe cache folder, under a name keyed by the hash of the source, flags
and compiler, and loaded with ctypes. Where that cannot work (not x86-64 Linux, no
avx512_bf16, no compiler, a failed build) `library()` logs why once and returns None, and the
engine keeps PyTorch's attention.

Why C: the turn's new tokens attend over the whole cached history in every layer, and in fp32
that arithmetic alone exceeds the time budget on a small CPU; vdpbf16ps doubles the rate, but
only a fused kernel (scores kept in registers, keys read in place from the pool) gets it, since
attention assembled from PyTorch's bf16 ops spends as much on conversions and softmax passes.
`prefill_attention` and `decode_attention` have the signatures of the decoder's own ops
(`voicepipe.llm.model`), which are their reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["available", "cpu_lacks_bf16", "decode_attention", "library", "prefill_attention",
           "supports", "unavailable_reason"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp",
         "-shared", "-fPIC")
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_lacks_bf16() -> str | None:
    """Why this CPU cannot run the kernel, or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"not an x86-64 Linux machine ({platform.system()} {platform.machine()})"
    try:
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError as exc:
        return f"cannot read the CPU flags ({exc})"
    missing = [f for f in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16") if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _build(cc: str) -> Path:
    """The compiled library in the cache folder, compiled now unless an identical build is
    there. Written to a temporary name and renamed, so concurrent first uses never see a
    half-written file."""
    from voicepipe.models import cache_dir

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout.splitlines()[:1]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, version)).encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    reason = cpu_lacks_bf16()
    cc = _compiler()
    if reason is None and cc is None:
        reason = "no C compiler (cc, gcc or $CC) found"
    if reason is None:
        try:
            # torch first: its libgomp then serves the kernel's OpenMP too (same soname), so
            # the two never run separate thread pools on the same cores.
            lib = ctypes.CDLL(str(_build(cc)))  # type: ignore[arg-type]
            lib.vp_attention_bf16.argtypes = [_P, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _I,
                                              ctypes.c_float, ctypes.c_int]
            lib.vp_attention_bf16.restype = ctypes.c_int
            if lib.vp_cpu_supported():
                return lib, ""
            reason = "the CPU lacks AVX512-BF16 (cpuid)"
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = f"building it failed ({type(exc).__name__}: {exc})"
    log.warning("bf16 CPU attention kernel unavailable: %s; using PyTorch attention", reason)
    return None, reason


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (logged once, with the reason) where it cannot run."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why `library()` is None ("" when it is not)."""
    return _load()[1]


def available() -> bool:
    """Whether the kernel runs here (the first call compiles it, seconds, then it is cached)."""
    return library() is not None


def supports(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel handles these attention shapes: whole query groups and a head
    dimension that is a multiple of 32 up to 256 (what its vectors and buffers assume)."""
    return n_heads % n_kv_heads == 0 and head_dim % 32 == 0 and 32 <= head_dim <= 256


def _attend(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
    slot_stride: int, lengths: torch.Tensor, n_seqs: int, n_new: int,
) -> torch.Tensor:
    lib = library()
    if lib is None:
        raise RuntimeError("the bf16 CPU attention kernel is unavailable")
    _, h_q, d = q.shape
    h_kv = k_pool.shape[1]
    if (k_pool.dtype != torch.bfloat16 or v_pool.dtype != torch.bfloat16
            or not k_pool.is_contiguous() or not v_pool.is_contiguous()):
        raise ValueError("the CPU attention kernel needs contiguous bfloat16 pools")
    qf = q.float().contiguous()
    out = torch.empty(qf.shape, dtype=torch.float32)
    status = lib.vp_attention_bf16(
        qf.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(),
        slot_table.data_ptr(), slot_stride, lengths.data_ptr(), n_seqs, n_new, h_q, h_kv, d,
        1.0 / math.sqrt(d), torch.get_num_threads())
    if status:
        raise ValueError(f"the CPU attention kernel needs a head dimension that is a multiple of"
                         f" 32 up to 256 and whole query groups (got {d}, {h_q}/{h_kv} heads)")
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
    runs: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """`voicepipe.llm.model.prefill_attention` (runs are not needed: slots are read in place)."""
    n, h_q, d = q.shape
    slots = slots.to(torch.int64).contiguous()
    length = torch.tensor([slots.shape[0]], dtype=torch.int64)
    return _attend(q, k_pool, v_pool, slots, 0, length, 1, n).view(n, h_q * d)


def decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """`voicepipe.llm.model.decode_attention`: one new token per sequence."""
    table = slot_table.to(torch.int64).contiguous()
    return _attend(q, k_pool, v_pool, table, table.shape[1], lengths.to(torch.int64).contiguous(),
                   q.shape[0], 1)
