"""GGUF files written as llama.cpp writes them load to the same model as the safetensors
reference: config, un-permuted llama Q/K, dequantized weights, tokenizer, and the disk cache."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from voicepipe.llm.gguf import internal_name, load_gguf, permute_qk, read_weights, unpermute_qk
from voicepipe.llm.model import Decoder, ModelConfig

from .tiny import CHATML, reference_model, write_gguf

IDS = [1, 70, 80, 90, 4, 200, 33, 34, 35, 250, 300, 12, 13, 2, 100, 101, 5]
F32 = gguf.GGMLQuantizationType.F32
Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q = gguf.GGMLQuantizationType


def _reference_logits(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


def _our_logits(path: Path) -> torch.Tensor:
    checkpoint = load_gguf(path)
    decoder = Decoder(checkpoint.config, dict(checkpoint.weights))
    with torch.inference_mode():
        return decoder.forward(torch.tensor(IDS), decoder.new_cache(), all_logits=True)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEPIPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [F32, Q.F16, Q8_0, Q.Q4_0, Q.Q4_1],
                         ids=["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_gguf_logits_match_reference(arch: str, qtype: gguf.GGMLQuantizationType,
                                     tmp_path: Path) -> None:
    model = reference_model(arch)
    path = tmp_path / f"{arch}.gguf"
    weights = write_gguf(model, path, qtype)
    if qtype != F32:
        # Dequantized tensors are kept as float16 (F32 ones as float32): a rounding of 2**-11
        # per weight, far below the quantization error itself.
        weights = {k: w.half().float() if w.ndim == 2 else w for k, w in weights.items()}
    expected = _reference_logits(model, weights)
    first = _our_logits(path)
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-4)
    cached = _our_logits(path)  # second load comes from the dequantized cache
    torch.testing.assert_close(cached, first, atol=0, rtol=0)


def test_gguf_config_and_tokenizer(tmp_path: Path) -> None:
    model = reference_model("qwen2")
    path = tmp_path / "qwen2.gguf"
    write_gguf(model, path, F32)
    checkpoint = load_gguf(path, use_cache=False)
    c = checkpoint.config
    assert (c.arch, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden, c.intermediate) == (
        "qwen2", 2, 4, 2, 64, 128
    )
    assert c.tie_embeddings and c.attention_bias and c.vocab_size == 320
    assert c.rope_theta == pytest.approx(1e6) and c.rms_eps == pytest.approx(1e-5)
    assert "lm_head.weight" not in checkpoint.weights
    tok = checkpoint.tokenizer
    assert tok.chat_template == CHATML
    assert tok.eos_id == 2 and tok.stop_ids >= {2}
    ids = tok.encode("<|im_start|>user\nthe weather<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nthe weather<|im_end|>"


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert not np.array_equal(permute_qk(w, 3), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 3), 3), w)


def test_tensor_names() -> None:
    assert internal_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert internal_name("output.weight") == "lm_head.weight"
    assert internal_name("rope_freqs.weight") is None


# Byte offsets of the float16 scales in one block of the K-quants gguf cannot quantize to (the
# rest of a block is any bytes): Q4_K is d, dmin, scales[12], qs[128]; Q6_K is ql[128],
# qh[64], scales[16], d.
_K_SCALES = {Q.Q4_K: slice(0, 4), Q.Q6_K: slice(208, 210)}


def _tensor_data(qtype: gguf.GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """A [rows, cols] tensor stored as `qtype`: quantized by gguf where it can, else random
    blocks with small finite scales."""
    rng = np.random.default_rng(int(qtype))
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        return values
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(values, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    at = _K_SCALES[qtype]
    n = (at.stop - at.start) // 2
    scales = rng.uniform(1e-3, 1e-2, (rows, cols // block, n)).astype(np.float16)
    raw[:, :, at] = scales.view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.Q8_0],
                         ids=lambda t: t.name)
def test_every_tensor_type_dequantizes_like_gguf_numpy(qtype: gguf.GGMLQuantizationType,
                                                       tmp_path: Path) -> None:
    rows, cols = 6, 512  # K-quants take rows of 256
    data = _tensor_data(qtype, rows, cols)
    path = tmp_path / "one.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    if qtype == Q.F32:
        writer.add_tensor("blk.0.ffn_down.weight", data)
    else:
        writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = ModelConfig("qwen2", 1, 4, 2, 64, cols, 320, 1e6, 1e-5, True, 512)
    weights = read_weights(gguf.GGUFReader(str(path)), config)
    got = weights["model.layers.0.mlp.down_proj.weight"]
    expected = gguf.quants.dequantize(data, qtype)
    assert expected.shape == (rows, cols) and np.isfinite(expected).all()
    assert expected.std() > 0
    # F32 stays float32; everything else is kept as float16 (see read_weights).
    dtype = np.float32 if qtype == Q.F32 else np.float16
    assert got.shape == (rows, cols) and got.numpy().dtype == dtype
    np.testing.assert_array_equal(got.numpy(), expected.astype(dtype))
