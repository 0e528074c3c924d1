"""GPU check of the fused decode kernels: `python -m voicepipe.bench.gpu_check`.

Needs only torch and triton (no model files, no network) and prints one table: each kernel's max
error against its float64 reference and its time against the torch reference at batch-1 decode
shapes of Qwen2.5-0.5B; the device's measured copy bandwidth; for a Qwen2.5-0.5B-shaped bf16
model with random weights (timing does not depend on their values), batch-1 decode ms/token with
the reference ops, the fused kernels, and the fused kernels replayed as a CUDA graph, each as a
fraction of the bandwidth floor (weight + KV bytes / measured bandwidth); and the time to first
token of a 15-token turn on a cached history. About a minute on an H100/H200.

`--device cpu` runs every code path but the CUDA graph on tiny shapes in Triton's interpreter, so
the script is tested where there is no GPU; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HISTORY = 512  # cached tokens before the timed decode steps and the timed turn
STEPS = 64  # timed decode steps per mode
TABLE_WIDTH = 1024  # slot table columns (the graph's maximum context)


def _config(tiny: bool) -> Any:
    from voicepipe.llm.model import ModelConfig

    if tiny:
        return ModelConfig("qwen2", n_layers=2, n_heads=4, n_kv_heads=2, hidden=64,
                           intermediate=128, vocab_size=320, rope_theta=1e6, rms_eps=1e-6,
                           tie_embeddings=True, context_length=512, attention_bias=True)
    return ModelConfig("qwen2", n_layers=24, n_heads=14, n_kv_heads=2, hidden=896,
                       intermediate=4864, vocab_size=151936, rope_theta=1e6, rms_eps=1e-6,
                       tie_embeddings=True, context_length=32768, attention_bias=True)


def _random_weights(config: Any, device: Any, dtype: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    c = config

    def w(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    d = c.head_dim
    weights = {"model.embed_tokens.weight": w(c.vocab_size, c.hidden),
               "model.norm.weight": 1 + w(c.hidden, scale=0.1)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + w(c.hidden, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(c.hidden, scale=0.1),
            p + "self_attn.q_proj.weight": w(c.n_heads * d, c.hidden),
            p + "self_attn.k_proj.weight": w(c.n_kv_heads * d, c.hidden),
            p + "self_attn.v_proj.weight": w(c.n_kv_heads * d, c.hidden),
            p + "self_attn.q_proj.bias": w(c.n_heads * d, scale=0.1),
            p + "self_attn.k_proj.bias": w(c.n_kv_heads * d, scale=0.1),
            p + "self_attn.v_proj.bias": w(c.n_kv_heads * d, scale=0.1),
            p + "self_attn.o_proj.weight": w(c.hidden, c.n_heads * d),
            p + "mlp.gate_proj.weight": w(c.intermediate, c.hidden),
            p + "mlp.up_proj.weight": w(c.intermediate, c.hidden),
            p + "mlp.down_proj.weight": w(c.hidden, c.intermediate),
        }
    return weights


class _Clock:
    """Median milliseconds of a function: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
        """Mean milliseconds of back-to-back calls (launch overhead included, one sync)."""
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3 / repeat


def _float64(args: tuple[Any, ...]) -> tuple[Any, ...]:
    import torch

    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def check_kernels(config: Any, device: Any, dtype: Any, clock: _Clock, repeat: int
                  ) -> list[tuple[str, str, str]]:
    from voicepipe.kernels import KERNELS

    rows = []
    for name, kernel in KERNELS.items():
        args = kernel.make_inputs(kernel.model_shape(config, 1), dtype, device, 0)
        got = kernel.run(kernel.fused, args)
        want = kernel.run(kernel.reference, args if kernel.ids else _float64(args))
        error = kernel.error(got, want)
        fused_ms = clock.ms(lambda: kernel.fused(*args), repeat)  # noqa: B023 (called here)
        ref_ms = clock.ms(lambda: kernel.reference(*args), repeat)  # noqa: B023
        verdict = "ok" if error <= kernel.tolerance(dtype) else "DISAGREES"
        rows.append((f"kernel {name}", f"err {error:.2e} ({verdict})",
                     f"{fused_ms * 1e3:.1f} us vs {ref_ms * 1e3:.1f} us torch = "
                     f"{ref_ms / fused_ms:.2f}x (target >= 1.5x)"))
    return rows


def copy_bandwidth(device: Any, clock: _Clock, tiny: bool) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    import torch

    n = (1 << 20) if tiny else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = clock.ms(lambda: dst.copy_(src), 3 if tiny else 20)
    return 2 * n / (ms / 1e3)


def check_model(config: Any, device: Any, dtype: Any, clock: _Clock, bandwidth: float,
                tiny: bool) -> list[tuple[str, str, str]]:
    import torch
    from voicepipe.kernels import sampling, use_fused, use_reference
    from voicepipe.kernels.graphs import DecodeGraphs, decode_step

    from voicepipe.llm.model import BatchSegment, Decoder, PagedKV

    decoder = Decoder(config, _random_weights(config, device, dtype), device, dtype)
    history, steps, width = (24, 4, 64) if tiny else (HISTORY, STEPS, TABLE_WIDTH)
    page = 16
    kv = decoder.new_paged_kv(width // page + 2, page)
    scratch = kv.num_pages * page - 1
    table = torch.arange(width, device=device)[None, :]  # one sequence on pages 0, 1, ...
    ones = torch.ones(1, device=device)
    greedy = (torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device),
              ones)
    with torch.inference_mode():
        prompt = torch.randint(0, config.vocab_size, (history,), device=device)
        decoder.forward_paged(prompt, [BatchSegment(history, table[0, :history].cpu())], kv)
    kv_bytes = PagedKV.bytes_per_token(config, dtype) * (history + steps // 2)
    weight_bytes = decoder.num_parameters() * torch.empty(0, dtype=dtype).element_size()
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3

    def decode(step: Callable[..., torch.Tensor]) -> float:
        token = torch.zeros(1, dtype=torch.long, device=device)
        times = []
        with torch.inference_mode():
            for i in range(steps):
                lengths = torch.full((1,), history + i + 1, device=device)
                t0 = time.perf_counter()
                token = step(token, lengths - 1, table, lengths)
                clock.sync()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times[2:] or times)

    rows = [("weights + KV read per token",
             f"{(weight_bytes + kv_bytes) / 1e6:.1f} MB",
             f"floor {floor_ms:.3f} ms/token")]

    def eager(sample: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda t, p, tb, n: decode_step(decoder, kv, t, p, tb, n, *greedy, sample=sample)

    use_reference(decoder)
    modes = [("decode, reference ops", decode(eager(sampling.reference)))]
    used = use_fused(decoder)
    modes.append(("decode, fused kernels", decode(eager(sampling.fused))))
    if device.type == "cuda":
        graphs = DecodeGraphs(decoder, kv, width, scratch, buckets=(1, 2))
        modes.append(("decode, fused + CUDA graph",
                      decode(lambda t, p, tb, n: graphs.step(t, p, tb, n, *greedy))))
    for label, ms in modes:
        rows.append((label, f"{ms:.3f} ms/token", f"{floor_ms / ms:.0%} of floor (target >= 60%)"))
    if device.type != "cuda":
        rows.append(("decode, fused + CUDA graph", "skipped", "CUDA graphs need a CUDA device"))
    if not all(used.values()):
        rows.append(("fused kernels in use", str(used), "fallbacks logged above"))

    turn = torch.randint(0, config.vocab_size, (15,), device=device)
    segment = [BatchSegment(15, table[0, : history + 15].cpu())]

    def first_token() -> int:
        with torch.inference_mode():
            logits = decoder.forward_paged(turn, segment, kv)
            return int(sampling.fused(logits, *greedy, torch.rand(1, device=device))[0])

    ttft = clock.ms(first_token, 3 if tiny else 20)
    rows.append((f"TTFT, 15-token turn on {history} cached", f"{ttft:.2f} ms", "target < 20 ms"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voicepipe.bench.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: tiny shapes in Triton's interpreter, a test of the script")
    args = parser.parse_args(argv)
    tiny = args.device == "cpu"
    if tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not tiny and not torch.cuda.is_available():
        print("no CUDA device; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.float32 if tiny else torch.bfloat16
    config = _config(tiny)
    clock = _Clock(device)
    t0 = time.perf_counter()
    rows: list[tuple[str, str, str]] = []
    rows += check_kernels(config, device, dtype, clock, 3 if tiny else 50)
    bandwidth = copy_bandwidth(device, clock, tiny)
    rows.append(("copy bandwidth", f"{bandwidth / 1e9:.1f} GB/s", "read + write"))
    rows += check_model(config, device, dtype, clock, bandwidth, tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"voicepipe GPU check on {name}, {str(dtype).removeprefix('torch.')}, "
          f"{'tiny model' if tiny else 'Qwen2.5-0.5B shape, random weights'}, "
          f"{time.perf_counter() - t0:.0f} s")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
