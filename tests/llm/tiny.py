"""Test helpers. Tiny random Llama/Qwen2 models written at test time: as Hugging Face safetensors folders
(through transformers, the reference implementation) and as GGUF files (as llama.cpp's
converter writes them, Q/K permutation of llama included), with a small byte-level BPE."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 320


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(
        range(0xAE, 0x100)
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """Tokens, merges ("a b") and GGUF token types of a small byte-level BPE."""
    tokens = list(SPECIALS) + _byte_chars()
    merges = []
    for left, right in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"),
                        ("e", "r"), ("o", "u"), ("Ġ", "s"), ("l", "l"), ("Ġ", "w")]:
        merges.append(f"{left} {right}")
        tokens.append(left + right)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    pad = VOCAB_SIZE - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(pad)]
    types += [5] * pad
    return tokens, merges, types


def _tokenizer_json(tokens: list[str], merges: list[str]) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, s in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in merges]},
    }


def hf_config(arch: str, **overrides: float) -> object:
    import transformers

    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, initializer_range=0.3, bos_token_id=0, eos_token_id=2,
    )
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(rope_theta=10000.0, tie_word_embeddings=False, **common)
    return transformers.Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=True, **common)


def rope_theta(cfg: object) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or cfg.rope_theta)


def reference_model(arch: str, seed: int = 0, **overrides: float) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    model = cls(hf_config(arch, **overrides)).float().eval()
    with torch.no_grad():  # biases are zero at init; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def write_hf_folder(model: torch.nn.Module, folder: Path) -> Path:
    tokens, merges, _ = tiny_vocab()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(json.dumps(_tokenizer_json(tokens, merges)))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}
    ))
    return folder


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def write_gguf(
    model: torch.nn.Module, path: Path, qtype: gguf.GGMLQuantizationType
) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp would; 2-D weights in `qtype`. Returns the state dict as the
    GGUF file holds it after dequantization (the reference weights)."""
    cfg = model.config
    arch = "llama" if cfg.model_type == "llama" else "qwen2"
    tokens, merges, types = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    reference = {}
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        array = tensor.float().numpy()
        stored = array
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            # Quantization works along rows and the permutation moves whole rows, so the
            # reference is the unpermuted weight through the same quantization.
            stored = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
        else:
            writer.add_tensor(_gguf_name(name), array)
        reference[name] = torch.from_numpy(np.ascontiguousarray(stored, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """`permute` of llama.cpp's convert_hf_to_gguf.py (LlamaModel), for Q and K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def collect(
    generator: Iterator[str], on_delta: Callable[[str], None] | None = None
) -> str:
    parts = []
    for delta in generator:
        parts.append(delta)
        if on_delta is not None:
            on_delta(delta)
    return "".join(parts)


def no_cancel() -> threading.Event:
    return threading.Event()
