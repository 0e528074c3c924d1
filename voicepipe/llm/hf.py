"""Load a Hugging Face safetensors folder of a LlamaForCausalLM or Qwen2ForCausalLM model.

Reads `config.json`, the weights (`model.safetensors` or the shards of
`model.safetensors.index.json`, which already use the internal naming) and the tokenizer with
its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from voicepipe.llm.model import Checkpoint, ModelConfig
from voicepipe.llm.tokenizer import ChatTokenizer
from voicepipe.models import ModelError

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def read_config(raw: dict[str, Any]) -> ModelConfig:
    names = raw.get("architectures") or []
    arch = next((_ARCHITECTURES[n] for n in names if n in _ARCHITECTURES), None)
    if arch is None:
        arch = {"llama": "llama", "qwen2": "qwen2"}.get(raw.get("model_type", ""))
    if arch is None:
        raise ModelError(f"architecture {names or raw.get('model_type')} is not supported")
    scaling = raw.get("rope_scaling") or (raw.get("rope_parameters") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise ModelError(f"rope scaling {kind!r} is not supported")
    theta = raw.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    n_heads = int(raw["num_attention_heads"])
    return ModelConfig(
        arch=arch,
        n_layers=int(raw["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        hidden=int(raw["hidden_size"]),
        intermediate=int(raw["intermediate_size"]),
        vocab_size=int(raw["vocab_size"]),
        rope_theta=float(theta),
        rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        context_length=int(raw.get("max_position_embeddings", 4096)),
        head_dim=int(raw.get("head_dim") or 0),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder.name}: no .safetensors weights found")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    return weights


def load_hf(folder: Path) -> Checkpoint:
    """Config, weights (internal naming) and tokenizer of a Hugging Face model folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelError(f"{folder.name}: config.json is missing")
    config = read_config(json.loads(config_path.read_text()))
    return Checkpoint(config, read_weights(folder), ChatTokenizer.from_hf_folder(folder))
