"""Load a llama or qwen2 GGUF file: config, dequantized weights in internal naming, tokenizer.

Every tensor is dequantized with `gguf.quants.dequantize` (all the quantization types the
package supports) and renamed to the Hugging Face naming of `voicepipe.llm.model`. llama.cpp's
converter permutes the Q and K rows of *llama* models for its interleaved rotary layout; that is
undone here, so both architectures run the rotate-half layout (qwen2 is stored unpermuted).

Parsing the metadata (~8 s for a 150k-token vocabulary) and dequantizing (~7 s for 0.5B
parameters) is paid once: the result is cached under `voicepipe.models.cache_dir()/gguf/`,
keyed by the file's path, size and mtime, as a safetensors file (float32 where the GGUF tensor
was float32, float16 otherwise) with the tokenizer and config beside it, and loaded with mmap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voicepipe.llm.model import ARCHITECTURES, Checkpoint, ModelConfig
from voicepipe.llm.tokenizer import ChatTokenizer
from voicepipe.models import ModelError, cache_dir

_CACHE_VERSION = "1"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def internal_name(gguf_name: str) -> str | None:
    """The internal (Hugging Face) name of a GGUF tensor, None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    return None


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of llama Q/K rows (interleaved rotary -> rotate-half).

    llama.cpp stores row (h, i, j) of head h as row (h, j, i) with i in [0, 2), j in [0, D/2);
    `n_heads` is the kv head count for K.
    """
    half = weight.shape[0] // n_heads // 2
    w = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (the inverse of `unpermute_qk`), for writing GGUF."""
    half = weight.shape[0] // n_heads // 2
    w = weight.reshape(n_heads, 2, half, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_config(reader: Any) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"GGUF architecture {arch!r} is not supported (need one of {ARCHITECTURES})")

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ModelError(f"GGUF metadata {arch}.{name} is missing")
        return value

    n_heads = int(key("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = _field(reader, f"{arch}.vocab_size") or int(embed.shape[1])
    hidden = int(key("embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or hidden // n_heads)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in tensor_names:
        raise ModelError(f"GGUF rope scaling {scaling or 'rope_freqs'} is not supported")
    return ModelConfig(
        arch=arch,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        hidden=hidden,
        intermediate=int(key("feed_forward_length")),
        vocab_size=int(vocab),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names,
        context_length=int(key("context_length")),
        head_dim=head_dim,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )


def read_tokenizer(reader: Any) -> ChatTokenizer:
    def ids(name: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{name}")
        return None if value is None else int(value)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelError("GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    return ChatTokenizer.from_gguf_vocab(
        model=_field(reader, "tokenizer.ggml.model", "gpt2"),
        pre_name=_field(reader, "tokenizer.ggml.pre", "default"),
        tokens=tokens,
        merges=_field(reader, "tokenizer.ggml.merges", []),
        token_types=_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)),
        bos_id=ids("bos_token_id"),
        eos_id=ids("eos_token_id"),
        eot_id=ids("eot_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def read_weights(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All used tensors, dequantized: float32 for F32 tensors, float16 for the others."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    def convert(tensor: Any) -> tuple[str, torch.Tensor]:
        name = internal_name(tensor.name)
        assert name is not None
        shape = tuple(int(s) for s in reversed(tensor.shape))
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if config.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = unpermute_qk(array, config.n_heads)
        elif config.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_qk(array, config.n_kv_heads)
        keep32 = tensor.tensor_type == GGMLQuantizationType.F32
        out = torch.from_numpy(array.astype(np.float32 if keep32 else np.float16, order="C"))
        return name, out

    used = [t for t in reader.tensors if internal_name(t.name) is not None]
    # numpy releases the GIL in the heavy parts of dequantize, so threads overlap well.
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return dict(pool.map(convert, used))


def _cache_folder(path: Path) -> Path:
    st = path.stat()
    key = f"{_CACHE_VERSION}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "gguf" / f"{path.stem}-{digest}"


def load_gguf(path: Path, *, use_cache: bool = True) -> Checkpoint:
    """Config, weights (internal naming) and tokenizer of a GGUF file, via the disk cache."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    folder = _cache_folder(path)
    if use_cache and (folder / "complete").exists():
        config = ModelConfig(**json.loads((folder / "config.json").read_text()))
        weights = load_file(str(folder / "weights.safetensors"))
        return Checkpoint(config, weights, ChatTokenizer.load(folder))

    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    config = read_config(reader)
    tokenizer = read_tokenizer(reader)
    weights = read_weights(reader, config)
    if use_cache:
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "weights.safetensors"), metadata={"source": path.name})
        (tmp / "config.json").write_text(json.dumps(asdict(config)))
        tokenizer.save(tmp)
        (tmp / "complete").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return Checkpoint(config, weights, tokenizer)
