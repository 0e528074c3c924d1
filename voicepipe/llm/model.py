"""A plain-torch Llama/Qwen2 decoder that runs new tokens against a per-conversation KV cache.

Weights come in as a dict in Hugging Face naming (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`), which
is the one internal naming the GGUF and safetensors loaders both produce. The decoder fuses
q/k/v and gate/up into one matrix each, so a decode step is a handful of matmuls per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


class _Layer(NamedTuple):
    attn_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [heads, T, D]; the rotate-half layout of Hugging Face (llama GGUF is un-permuted on load).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Decoder:
    """Forward pass of a Llama/Qwen2 decoder over a `KVCache`."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        c = config

        def take(name: str) -> torch.Tensor:
            try:
                tensor = weights.pop(name)
            except KeyError:
                raise ValueError(f"weight {name!r} is missing") from None
            return tensor.to(device=self.device, dtype=dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        if "lm_head.weight" in weights:
            self.lm_head = take("lm_head.weight")
        elif c.tie_embeddings:
            self.lm_head = self.embed
        else:
            raise ValueError("weight 'lm_head.weight' is missing and embeddings are not tied")
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
                    qkv_weight=qkv,
                    qkv_bias=bias,
                    o_weight=take(a + "o_proj.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up_weight=gate_up,
                    down_weight=take(p + "mlp.down_proj.weight"),
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
        tensors = [self.embed, self.norm]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors.extend(t for t in layer if t is not None)
        return sum(t.numel() for t in tensors)

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.config, min(capacity, self.config.context_length), self.device,
                       self.dtype)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run `tokens` (1-D ids) at positions cache.length, cache.length+1, ...

        Appends their keys and values to `cache` and returns float32 logits of the last token
        ([vocab]) or, with `all_logits`, of every token ([T, vocab]).
        """
        c = self.config
        n = tokens.shape[0]
        start = cache.length
        end = start + n
        cache.reserve(end)
        if end > self._rope_len:
            self._rope_table(min(c.context_length, max(end, 2 * self._rope_len)))
        cos = self._cos[start:end]
        sin = self._sin[start:end]
        h_q, h_kv, d = c.n_heads, c.n_kv_heads, c.head_dim
        group = h_q // h_kv
        q_size, kv_size = h_q * d, h_kv * d
        # Query heads are laid out as [kv_head, group, token] rows, so one kv head serves its
        # whole group without repeating keys; the causal mask repeats once per group member.
        mask = None
        if n > 1:
            rows = torch.arange(start, end, device=self.device).unsqueeze(1)
            mask = torch.arange(end, device=self.device).unsqueeze(0) <= rows
            mask = mask.repeat(group, 1)
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, c.rms_eps)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
            q = _rotate(q.view(n, h_q, d).transpose(0, 1), cos, sin)
            k = _rotate(k.view(n, h_kv, d).transpose(0, 1), cos, sin)
            cache.k[i, :, start:end] = k
            cache.v[i, :, start:end] = v.view(n, h_kv, d).transpose(0, 1)
            q = q.reshape(h_kv, group * n, d)
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                cache.k[i, :, :end].unsqueeze(0),
                cache.v[i, :, :end].unsqueeze(0),
                attn_mask=mask,
            )
            attn = attn.reshape(h_q, n, d).transpose(0, 1).reshape(n, q_size)
            x = x + F.linear(attn, layer.o_weight)
            h = _rms_norm(x, layer.mlp_norm, c.rms_eps)
            gate, up = F.linear(h, layer.gate_up_weight).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down_weight)
        cache.length = end
        if not all_logits:
            x = x[-1]
        return F.linear(_rms_norm(x, self.norm, c.rms_eps), self.lm_head).float()


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; bfloat16 where the accelerator supports it, else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
