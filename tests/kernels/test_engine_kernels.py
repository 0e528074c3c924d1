"""Fused kernels inside the decoder and the engine: the same greedy tokens with them on and off,
the graph-capturable decode step agreeing with the engine's forward, and the first-use check
falling back to the reference (with a warning) for a kernel that disagrees or fails."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import voicepipe.kernels as vk
from llm.tiny import collect, no_cancel, reference_model, write_hf_folder
from voicepipe.kernels.graphs import DecodeGraphs, decode_step

from voicepipe.llm.engine import Engine
from voicepipe.llm.hf import load_hf
from voicepipe.llm.model import BatchSegment, Decoder, DecoderOps
from voicepipe.stages.base import SamplingParams


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_folder(reference_model("qwen2"), tmp_path_factory.mktemp("qwen2"))


def _decoder(folder: Path, fused: bool) -> Decoder:
    checkpoint = load_hf(folder)
    decoder = Decoder(checkpoint.config, dict(checkpoint.weights), "cpu", torch.float32)
    if fused:
        assert all(vk.use_fused(decoder).values())
    return decoder


def _greedy_batch(decoder: Decoder, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill all prompts in one mixed forward, then decode them together (scattered slots)."""
    kv = decoder.new_paged_kv(32, 4)
    free = torch.randperm(32 * 4, generator=torch.Generator().manual_seed(0)).tolist()
    slots = [[free.pop() for _ in p] for p in prompts]
    tokens = torch.tensor([t for p in prompts for t in p])
    segments = [BatchSegment(len(p), torch.tensor(s)) for p, s in zip(prompts, slots, strict=True)]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        logits = decoder.forward_paged(tokens, segments, kv)
        nxt = logits.argmax(-1).tolist()
        for row, t in enumerate(nxt):
            out[row].append(t)
            slots[row].append(free.pop())
        tokens = torch.tensor(nxt)
        segments = [BatchSegment(1, torch.tensor(s)) for s in slots]
    return out


def test_decoder_tokens_identical_fused_and_reference(checkpoint_folder: Path) -> None:
    prompts = [[5, 17, 99, 3, 250, 41, 7], [12, 8], [300, 1, 2, 3, 4]]
    with torch.inference_mode():
        reference = _greedy_batch(_decoder(checkpoint_folder, False), prompts, 6)
        fused = _greedy_batch(_decoder(checkpoint_folder, True), prompts, 6)
    assert fused == reference


def test_engine_tokens_identical_with_fused_kernels_on_and_off(checkpoint_folder: Path) -> None:
    replies = []
    for fused in (False, True):
        engine = Engine.from_checkpoint(load_hf(checkpoint_folder), "qwen2", dtype="float32",
                                        num_pages=64, page_size=4, fused_kernels=fused)
        assert (engine.decoder.ops.silu_mul is vk.KERNELS["silu_mul"].fused) == fused
        c = engine.new_conversation("be nice")
        c.add_message("user", "hello there")
        collect(c.generate(SamplingParams(max_tokens=6), no_cancel()))
        c.add_message("user", "and again")
        collect(c.generate(SamplingParams(max_tokens=6), no_cancel()))
        replies.append(c.token_ids)
        engine.close()
    assert replies[0] == replies[1]


def test_fused_kernels_are_off_by_default_on_the_cpu(checkpoint_folder: Path) -> None:
    engine = Engine.from_checkpoint(load_hf(checkpoint_folder), dtype="float32", num_pages=8)
    assert engine.decoder.ops == DecoderOps()
    engine.close()


def test_decode_step_matches_forward_paged(checkpoint_folder: Path) -> None:
    """The body of the CUDA graph, run eagerly: same greedy tokens as the engine's forward."""
    decoder = _decoder(checkpoint_folder, True)
    kv = decoder.new_paged_kv(16, 4)
    histories = [[5, 17, 99, 3, 250], [12, 8, 40]]
    table = torch.zeros(2, 8, dtype=torch.long)
    table[0, :6] = torch.tensor([3, 9, 20, 21, 40, 41])
    table[1, :4] = torch.tensor([8, 1, 2, 30])
    with torch.inference_mode():
        segments = [BatchSegment(len(h), table[i, : len(h)]) for i, h in enumerate(histories)]
        decoder.forward_paged(torch.tensor(histories[0] + histories[1]), segments, kv)
        new = torch.tensor([7, 77])
        want = decoder.forward_paged(
            new, [BatchSegment(1, table[0, :6]), BatchSegment(1, table[1, :4])], kv).argmax(-1)
        lengths = torch.tensor([6, 4])
        got = decode_step(decoder, kv, new, lengths - 1, table, lengths, torch.zeros(2),
                          torch.zeros(2, dtype=torch.long), torch.ones(2))
    assert got.tolist() == want.tolist()


def test_cuda_graphs_are_skipped_on_the_cpu(checkpoint_folder: Path) -> None:
    decoder = _decoder(checkpoint_folder, False)
    with pytest.raises(RuntimeError, match="CUDA"):
        DecodeGraphs(decoder, decoder.new_paged_kv(4, 4), 16, scratch_slot=0)


def _broken(name: str, fused: object) -> vk.Kernel:
    return dataclasses.replace(vk.KERNELS[name], name=f"broken_{name}", fused=fused)


def test_first_use_check_falls_back_with_a_warning(
    checkpoint_folder: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def wrong(gate_up: torch.Tensor) -> torch.Tensor:
        return vk.KERNELS["silu_mul"].reference(gate_up) * 1.01

    def failing(*args: object) -> torch.Tensor:
        raise RuntimeError("no compiler")

    monkeypatch.setitem(vk.KERNELS, "silu_mul", _broken("silu_mul", wrong))
    monkeypatch.setitem(vk.KERNELS, "add_rms_norm", _broken("add_rms_norm", failing))
    decoder = _decoder(checkpoint_folder, False)
    with caplog.at_level(logging.WARNING, logger="voicepipe.kernels"):
        used = vk.use_fused(decoder)
    assert used == {"add_rms_norm": False, "rope_kv_write": True, "silu_mul": False,
                    "decode_attention": True}
    assert decoder.ops.silu_mul is vk.KERNELS["silu_mul"].reference
    assert decoder.ops.add_rms_norm is vk.KERNELS["add_rms_norm"].reference
    text = caplog.text
    assert "broken_silu_mul disagrees" in text and "broken_add_rms_norm failed" in text
