"""The batched decode step as one device-only function, and CUDA graphs of it per batch size.

`decode_step` runs one new token per sequence through the decoder's ops table and samples the next
tokens with the fused sampler, reading and writing nothing on the host, so it can be captured.
`DecodeGraphs` captures it once per batch-size bucket for slot tables `max_length` wide: a step
copies its inputs into the bucket's static buffers (padding rows write to a scratch slot nobody
reads) and replays the graph, one launch for the whole step. CUDA only: on the CPU there is no
graph to capture, and the step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from voicepipe.llm.model import Decoder, PagedKV

from . import sampling

BUCKETS = (1, 2, 4, 8, 16, 32)


def decode_step(
    decoder: Decoder, kv: PagedKV, tokens: torch.Tensor, positions: torch.Tensor,
    slot_table: torch.Tensor, lengths: torch.Tensor, temperature: torch.Tensor,
    top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor | None = None,
    sample: Callable[..., torch.Tensor] = sampling.fused,
) -> torch.Tensor:
    """Next token ids [B] for sequences whose newest token `tokens[b]` sits at `positions[b]`
    (= lengths[b] - 1) and slot `slot_table[b, positions[b]]`; slot_table[b, :lengths[b]] are
    its slots, history first. The rotary table must already cover the positions (see
    `DecodeGraphs`). `uniform` [B] is the draw (None: drawn here, on the device)."""
    new_slots = slot_table.gather(1, positions[:, None]).squeeze(1)
    cos = decoder._cos[positions].unsqueeze(1)
    sin = decoder._sin[positions].unsqueeze(1)

    def attend(i: int, q: torch.Tensor, k: None, v: None) -> torch.Tensor:
        a = decoder.ops.decode_attention(q, kv.k[i], kv.v[i], slot_table, lengths)
        return a.reshape(q.shape[0], -1)

    x = decoder._run_layers(tokens, cos, sin, attend, kv_write=(kv, new_slots))
    logits = decoder.logits(x)
    if uniform is None:
        uniform = torch.rand(tokens.shape[0], device=logits.device)
    return sample(logits, temperature, top_k, top_p, uniform)


class DecodeGraphs:
    """CUDA graphs of `decode_step`, one per batch-size bucket, for slot tables up to
    `max_length` wide. `scratch_slot` is a pool slot no sequence uses (padding rows write it)."""

    def __init__(self, decoder: Decoder, kv: PagedKV, max_length: int, scratch_slot: int,
                 buckets: tuple[int, ...] = BUCKETS) -> None:
        if decoder.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; run decode_step eagerly")
        self.decoder, self.kv = decoder, kv
        self.max_length = max_length
        self.scratch_slot = scratch_slot
        dev = decoder.device
        decoder._rope(torch.zeros(1, dtype=torch.long, device=dev), max_length)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor],
                                      torch.Tensor]] = {}
        for size in buckets:
            inputs = {
                "tokens": torch.zeros(size, dtype=torch.long, device=dev),
                "positions": torch.zeros(size, dtype=torch.long, device=dev),
                "slot_table": torch.full((size, max_length), scratch_slot, dtype=torch.long,
                                         device=dev),
                "lengths": torch.ones(size, dtype=torch.long, device=dev),
                "temperature": torch.zeros(size, device=dev),
                "top_k": torch.zeros(size, dtype=torch.long, device=dev),
                "top_p": torch.ones(size, device=dev),
            }
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # compile the kernels outside the capture
                    decode_step(decoder, kv, **inputs)  # type: ignore[arg-type]
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                out = decode_step(decoder, kv, **inputs)  # type: ignore[arg-type]
            self._graphs[size] = (graph, inputs, out)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot_table: torch.Tensor,
             lengths: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
             top_p: torch.Tensor) -> torch.Tensor:
        """`decode_step` by graph replay; returns a view of the bucket's output buffer [B]."""
        batch, width = slot_table.shape
        size = next((s for s in sorted(self._graphs) if s >= batch), None)
        if size is None or width > self.max_length:
            raise ValueError(f"no graph for batch {batch} with {width} slots")
        graph, inputs, out = self._graphs[size]
        for name, value in (("tokens", tokens), ("positions", positions), ("lengths", lengths),
                            ("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
            inputs[name][:batch].copy_(value, non_blocking=True)
        inputs["slot_table"][:batch, :width].copy_(slot_table, non_blocking=True)
        inputs["slot_table"][:batch, width:] = self.scratch_slot
        inputs["slot_table"][batch:] = self.scratch_slot  # padding rows write only the scratch
        inputs["positions"][batch:] = 0
        inputs["lengths"][batch:] = 1
        graph.replay()
        return out[:batch]
