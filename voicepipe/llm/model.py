"""A plain-torch Llama/Qwen2 decoder that runs new tokens against a per-conversation KV cache.

Weights come in as a dict in Hugging Face naming (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`), which
is the one internal naming the GGUF and safetensors loaders both produce. The decoder fuses
q/k/v and gate/up into one matrix each, so a decode step is a handful of matmuls per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the decoder itself needs only torch (the GPU check runs without tokenizers)
    from voicepipe.llm.tokenizer import ChatTokenizer

ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" or "qwen2"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    intermediate: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    context_length: int
    head_dim: int = 0  # 0: hidden // n_heads
    attention_bias: bool = False  # q/k/v bias (qwen2)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.arch!r}")
        if self.head_dim == 0:
            if self.hidden % self.n_heads:
                raise ValueError("hidden size is not a multiple of the head count")
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError("head count is not a multiple of the kv head count")
        if self.head_dim % 2:
            raise ValueError("rotary embedding needs an even head dimension")


class Checkpoint(NamedTuple):
    """What a loader hands the engine: config, weights in internal naming, tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: ChatTokenizer


class KVCache:
    """One conversation's keys and values: `k`, `v` of shape [layers, kv_heads, capacity, head_dim].

    Positions [0, length) hold valid entries. The storage grows by doubling (a copy), and
    `truncate` only moves `length` back, so a rollback is free.
    """

    def __init__(
        self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.max_length = config.context_length
        self.length = 0
        shape = (config.n_layers, config.n_kv_heads, capacity, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, length: int) -> None:
        """Make room for positions [0, length)."""
        if length > self.max_length:
            raise ValueError(f"context of {length} tokens exceeds the model's {self.max_length}")
        if length <= self.capacity:
            return
        capacity = min(self.max_length, max(length, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, max(0, length))


class PagedKV:
    """Keys and values of every sequence in one pre-allocated pool: `k`, `v` of shape
    [layers, num_pages * page_size, kv_heads, head_dim], one slot per token (see `radix.py` for
    which slots belong to whom). Its dtype may be narrower than the activations' (bf16 KV on
    the CPU): values are rounded when stored and widened where attention reads them."""

    def __init__(
        self, config: ModelConfig, num_pages: int, page_size: int, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (config.n_layers, num_pages * page_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * itemsize


@dataclass
class BatchSegment:
    """One sequence's share of a batched forward: `n` new tokens whose slots are the last n of
    `slots` (all its slots, history first, as a long tensor)."""

    n: int
    slots: torch.Tensor


class Int8Linear:
    """A linear layer with int8 weights quantized per output channel, run by fbgemm's dynamic
    int8 matmul. On the CPU it reads a quarter of the fp32 weight bytes and is about five times
    faster per decode step (see `voicepipe-bench engine`).

    fbgemm quantizes the activations per tensor; Qwen-family models have outlier features that
    make a shared scale across a prefill chunk lossy, so each row is scaled to max-abs 1 first
    (W(x/s)·s = Wx), which amounts to per-token activation quantization, and the bias is added
    after the scaling.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.float()
        scales = (w.abs().amax(1).clamp(min=1e-12) / 127).double()
        zeros = torch.zeros(w.shape[0], dtype=torch.int64)
        qweight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if bias is None else bias.float()
        self.out_features, self.in_features = w.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(rows / scale, self.packed, False).mul_(scale)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def numel(self) -> int:
        return self.out_features * self.in_features


class Int8Embedding:
    """Embedding rows in int8 with one scale per row, dequantized on lookup."""

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.float()
        self.scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.q = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.scale[ids, None]

    def numel(self) -> int:
        return self.q.numel()


Weight = torch.Tensor | Int8Linear


def _linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, Int8Linear):
        return w(x)
    return F.linear(x, w, bias)


class _Layer(NamedTuple):
    attn_norm: torch.Tensor
    qkv_weight: Weight
    qkv_bias: torch.Tensor | None  # None when folded into an Int8Linear
    o_weight: Weight
    mlp_norm: torch.Tensor
    gate_up_weight: Weight
    down_weight: Weight


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D], cos/sin: [T, 1, D]; the rotate-half layout of Hugging Face (llama GGUF
    # is un-permuted on load).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, its RMSNorm); with no delta, (x, RMSNorm of x)."""
    if delta is not None:
        x = x + delta
    return x, _rms_norm(x, weight, eps)


def rope_kv_write(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """Rotate q [T, h_q, d] and k [T, h_kv, d] (cos, sin [T, 1, d]), store k and v in rows
    `slots` of one layer's pool k_pool, v_pool [S, h_kv, d]; returns the rotated q."""
    k_pool.index_copy_(0, slots, _rotate(k, cos, sin).to(k_pool.dtype))
    v_pool.index_copy_(0, slots, v.to(v_pool.dtype))
    return _rotate(q, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the fused [..., 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """One new token per sequence: q [B, h_q, d] attends to the keys and values in pool rows
    slot_table[b, :lengths[b]] of k_pool, v_pool [S, h_kv, d] (the rest of each slot_table row
    is padding); returns [B, h_q, d]. Query head j belongs to kv head j // (h_q // h_kv)."""
    b, h_q, d = q.shape
    h_kv = k_pool.shape[1]
    positions = torch.arange(slot_table.shape[1], device=q.device)
    mask = (positions < lengths[:, None]).view(b, 1, 1, -1)
    keys = k_pool[slot_table].transpose(1, 2).to(q.dtype)  # [B, h_kv, L, d]
    values = v_pool[slot_table].transpose(1, 2).to(q.dtype)
    a = F.scaled_dot_product_attention(q.view(b, h_kv, h_q // h_kv, d), keys, values,
                                       attn_mask=mask)
    return a.reshape(b, h_q, d)


MAX_RUNS = 16  # history runs attended in place; more (a fragmented pool) are gathered once


def slot_runs(slots: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of consecutive slots in a 1-D slot tensor, as (first slot, count), in order."""
    values = slots.tolist()
    runs: list[tuple[int, int]] = []
    for slot in values:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


def prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
    runs: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Attention of one sequence's n new tokens: q [n, h_q, d] at positions L-n..L-1 over the
    keys and values in pool rows `slots` [L] (position order) of k_pool, v_pool [S, h_kv, d],
    where the new tokens' own rows are already stored; returns [n, h_q * d]. `runs` are
    `slot_runs(slots[:L-n])`, the history, computed once per forward rather than per layer.

    On the CPU the history is never gathered: each run is a view of the pool, attended without
    a mask, and the parts (the new tokens causally among themselves, then each run) are merged
    by their log-sum-exp, an online softmax. Elsewhere: one gather and a masked attention. A
    pool narrower than q (bf16 KV) is widened as it is read: correct, not fast (the fast path
    for it is `voicepipe.kernels.cpu_attention`)."""
    n, h_q, d = q.shape
    h_kv = k_pool.shape[1]
    group = h_q // h_kv
    length = slots.shape[0]
    if q.device.type != "cpu":
        mask = _causal_mask(n, length, group, q.device)
        return _attention(q, k_pool[slots].transpose(0, 1).to(q.dtype),
                          v_pool[slots].transpose(0, 1).to(q.dtype), mask)
    qg = q.transpose(0, 1).reshape(1, h_kv, group * n, d)  # rows [kv head][group member, token]
    new = slots[length - n :]
    out, lse = _attend_lse(qg, k_pool[new], v_pool[new], _causal_bias(n, group, q.dtype))
    if len(runs) > MAX_RUNS:
        history = slots[: length - n]
        parts = [(k_pool[history], v_pool[history])]
    else:
        parts = [(k_pool[first : first + count], v_pool[first : first + count])
                 for first, count in runs]
    for keys, values in parts:
        part, part_lse = _attend_lse(qg, keys, values, None)
        # softmax over both = weights sigmoid(lse - part_lse) and its complement
        out = torch.lerp(part, out, torch.sigmoid(lse - part_lse).unsqueeze(-1).to(out.dtype))
        lse = torch.logaddexp(lse, part_lse)
    return out.reshape(h_q, n, d).transpose(0, 1).reshape(n, h_q * d)


@functools.lru_cache(maxsize=64)
def _causal_bias(n: int, group: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive causal mask of n new tokens among themselves, in `_causal_mask`'s row order."""
    mask = _causal_mask(n, n, group, torch.device("cpu"))
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def _attend_lse(
    qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped queries qg [1, h_kv, rows, d] over keys, values [L, h_kv, d] (a view of the pool
    is fine) with an additive bias [rows, L]: the output [1, h_kv, rows, d] and the float32
    log-sum-exp of each row's scores [1, h_kv, rows]."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg, keys.transpose(0, 1).unsqueeze(0).to(qg.dtype),
        values.transpose(0, 1).unsqueeze(0).to(qg.dtype), attn_mask=bias)
    return out, lse


@dataclass
class DecoderOps:
    """The per-token ops of a forward, swappable as a set: `voicepipe.kernels` puts fused GPU
    kernels with the same signatures in their place."""

    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm
    rope_kv_write: Callable[..., torch.Tensor] = rope_kv_write
    silu_mul: Callable[[torch.Tensor], torch.Tensor] = silu_mul
    decode_attention: Callable[..., torch.Tensor] = decode_attention
    prefill_attention: Callable[..., torch.Tensor] = prefill_attention


class Decoder:
    """Forward pass of a Llama/Qwen2 decoder over a `KVCache` (one sequence, contiguous) or a
    `PagedKV` pool (a batch of sequences).

    With `int8=True` (CPU only) the matmul weights, the LM head included, are int8 per output
    channel and the embedding rows int8 per row; norms, attention and the KV stay in `dtype`.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        int8: bool = False,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.int8 = int8
        self.ops = DecoderOps()
        if int8 and (self.device.type != "cpu" or dtype != torch.float32):
            raise ValueError("int8 weights run on the CPU with float32 activations")
        c = config

        def take(name: str) -> torch.Tensor:
            try:
                tensor = weights.pop(name)
            except KeyError:
                raise ValueError(f"weight {name!r} is missing") from None
            return tensor.to(device=self.device, dtype=dtype).contiguous()

        def matrix(w: torch.Tensor, bias: torch.Tensor | None = None) -> Weight:
            return Int8Linear(w, bias) if int8 else w

        embed = take("model.embed_tokens.weight")
        if "lm_head.weight" in weights:
            self.lm_head = matrix(take("lm_head.weight"))
        elif c.tie_embeddings:
            self.lm_head = matrix(embed)
        else:
            raise ValueError("weight 'lm_head.weight' is missing and embeddings are not tied")
        self.embed: torch.Tensor | Int8Embedding = Int8Embedding(embed) if int8 else embed
        del embed
        self.norm = take("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(c.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv = torch.cat([take(a + "q_proj.weight"), take(a + "k_proj.weight"),
                             take(a + "v_proj.weight")])
            bias = None
            if c.attention_bias:
                bias = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"),
                                  take(a + "v_proj.bias")])
            gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            self.layers.append(
                _Layer(
                    attn_norm=take(p + "input_layernorm.weight"),
                    qkv_weight=matrix(qkv, bias),
                    qkv_bias=None if int8 else bias,
                    o_weight=matrix(take(a + "o_proj.weight")),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up_weight=matrix(gate_up),
                    down_weight=matrix(take(p + "mlp.down_proj.weight")),
                )
            )
        self._rope_len = 0
        self._cos = self._sin = torch.empty(0)
        self._rope_table(min(c.context_length, 4096))

    def _rope_table(self, length: int) -> None:
        c = self.config
        d = c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        pos = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.device, self.dtype)
        self._sin = emb.sin().to(self.device, self.dtype)
        self._rope_len = length

    def num_parameters(self) -> int:
        tensors: list[torch.Tensor | Int8Linear | Int8Embedding] = [self.embed, self.norm]
        if not isinstance(self.lm_head, Int8Linear) and self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors.extend(t for t in layer if t is not None)
        return sum(t.numel() for t in tensors)

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.config, min(capacity, self.config.context_length), self.device,
                       self.dtype)

    def new_paged_kv(
        self, num_pages: int, page_size: int, dtype: torch.dtype | None = None
    ) -> PagedKV:
        """A pool in `dtype`, by default the activations'."""
        return PagedKV(self.config, num_pages, page_size, self.device, dtype or self.dtype)

    def _rope(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if end > self._rope_len:
            self._rope_table(min(self.config.context_length, max(end, 2 * self._rope_len)))
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, Int8Embedding):
            return self.embed(tokens)
        return F.embedding(tokens, self.embed)

    def _run_layers(
        self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        attend: Callable[..., torch.Tensor],
        kv_write: tuple[PagedKV, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after all layers. `attend(layer, q, k, v)` takes the
        rotated q [T, h_q, d], k, v [T, h_kv, d], stores k and v, returns attention [T, h_q*d].
        With `kv_write` (pool, slots [T]) k and v are stored here, fused with the rotation, and
        attend gets None for both."""
        c = self.config
        ops = self.ops
        n = tokens.shape[0]
        h_q, h_kv, d = c.n_heads, c.n_kv_heads, c.head_dim
        q_size, kv_size = h_q * d, h_kv * d
        x = self._embed(tokens)
        delta: torch.Tensor | None = None  # a layer's MLP output, added by the next norm
        for i, layer in enumerate(self.layers):
            x, h = ops.add_rms_norm(x, delta, layer.attn_norm, c.rms_eps)
            qkv = _linear(h, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
            q, k, v = q.view(n, h_q, d), k.view(n, h_kv, d), v.view(n, h_kv, d)
            if kv_write is None:
                attn = attend(i, _rotate(q, cos, sin), _rotate(k, cos, sin), v)
            else:
                pool, slots = kv_write
                q = ops.rope_kv_write(q, k, v, cos, sin, pool.k[i], pool.v[i], slots)
                attn = attend(i, q, None, None)
            x, h = ops.add_rms_norm(x, _linear(attn, layer.o_weight), layer.mlp_norm, c.rms_eps)
            delta = _linear(ops.silu_mul(_linear(h, layer.gate_up_weight)), layer.down_weight)
        return x if delta is None else x + delta

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(_rms_norm(x, self.norm, self.config.rms_eps), self.lm_head).float()

    def forward(
        self, tokens: torch.Tensor, cache: KVCache, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run `tokens` (1-D ids) at positions cache.length, cache.length+1, ...

        Appends their keys and values to `cache` and returns float32 logits of the last token
        ([vocab]) or, with `all_logits`, of every token ([T, vocab]).
        """
        n = tokens.shape[0]
        start = cache.length
        end = start + n
        cache.reserve(end)
        cos, sin = self._rope(torch.arange(start, end, device=self.device), end)
        mask = _causal_mask(n, end, self.config.n_heads // self.config.n_kv_heads, self.device)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i, :, start:end] = k.transpose(0, 1)
            cache.v[i, :, start:end] = v.transpose(0, 1)
            return _attention(q, cache.k[i, :, :end], cache.v[i, :, :end], mask)

        x = self._run_layers(tokens, cos, sin, attend)
        cache.length = end
        return self.logits(x if all_logits else x[-1])

    def forward_paged(
        self, tokens: torch.Tensor, segments: Sequence[BatchSegment], kv: PagedKV,
    ) -> torch.Tensor:
        """One forward over a batch of sequences sharing the pool `kv`: `tokens` are the
        segments' new tokens concatenated. Writes their KV to their slots and returns float32
        logits of each segment's last token ([len(segments), vocab])."""
        lengths = [int(s.slots.shape[0]) for s in segments]
        positions = torch.cat([torch.arange(length - s.n, length)
                               for s, length in zip(segments, lengths, strict=True)])
        new_slots = torch.cat([s.slots[-s.n:] for s in segments]).to(self.device)
        cos, sin = self._rope(positions.to(self.device), max(lengths))
        # Decode segments (one new token each) attend together, padded to the longest; prefill
        # chunks attend one by one under a causal mask.
        decode = [j for j, s in enumerate(segments) if s.n == 1]
        prefill = [j for j, s in enumerate(segments) if s.n > 1]
        offsets = [0]
        for s in segments:
            offsets.append(offsets[-1] + s.n)
        pad_slots = decode_lengths = decode_rows = None
        if decode:
            longest = max(lengths[j] for j in decode)
            pad_slots = torch.zeros((len(decode), longest), dtype=torch.long)
            for row, j in enumerate(decode):
                pad_slots[row, : lengths[j]] = segments[j].slots
            pad_slots = pad_slots.to(self.device)
            decode_lengths = torch.tensor([lengths[j] for j in decode], device=self.device)
            decode_rows = torch.tensor([offsets[j] for j in decode], device=self.device)
        # The history's runs of consecutive slots, for the CPU reference prefill attention (a
        # fused kernel reads the slots in place and gets none: building them is O(history)).
        reference = self.ops.prefill_attention is prefill_attention and self.device.type == "cpu"
        runs = {j: slot_runs(segments[j].slots[: lengths[j] - segments[j].n]) if reference
                else [] for j in prefill}
        slot_lists = {j: segments[j].slots.to(self.device) for j in prefill}

        def attend(i: int, q: torch.Tensor, k: None, v: None) -> torch.Tensor:
            kc, vc = kv.k[i], kv.v[i]  # this step's k, v are already stored (kv_write)
            out = q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))
            if decode_rows is not None:
                b = decode_rows.shape[0]
                a = self.ops.decode_attention(q.index_select(0, decode_rows), kc, vc, pad_slots,
                                              decode_lengths)
                out.index_copy_(0, decode_rows, a.reshape(b, -1))
            for j in prefill:
                lo, hi = offsets[j], offsets[j + 1]
                out[lo:hi] = self.ops.prefill_attention(q[lo:hi], kc, vc, slot_lists[j], runs[j])
            return out

        x = self._run_layers(tokens, cos, sin, attend, kv_write=(kv, new_slots))
        last = torch.tensor([offsets[j + 1] - 1 for j in range(len(segments))], device=self.device)
        return self.logits(x.index_select(0, last))


def _causal_mask(n: int, end: int, group: int, device: torch.device) -> torch.Tensor | None:
    """Mask of n query rows at positions end-n..end-1 over keys 0..end-1, repeated once per
    member of a kv head's query group (see `_attention`); None for a single row."""
    if n == 1:
        return None
    rows = torch.arange(end - n, end, device=device).unsqueeze(1)
    mask = torch.arange(end, device=device).unsqueeze(0) <= rows
    return mask.repeat(group, 1)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """q [n, h_q, d] over k, v [h_kv, L, d]; returns [n, h_q * d].

    Query heads are laid out as [kv_head, group, token] rows, so one kv head serves its whole
    group without repeating keys; the causal mask repeats once per group member."""
    n, h_q, d = q.shape
    h_kv = k.shape[0]
    qg = q.transpose(0, 1).reshape(h_kv, (h_q // h_kv) * n, d)
    attn = F.scaled_dot_product_attention(qg.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=mask)
    return attn.reshape(h_q, n, d).transpose(0, 1).reshape(n, h_q * d)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; bfloat16 where the accelerator supports it, else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
