"""`voicepipe-bench engine`: time to first token warm vs cold by history length, the engine's
own bookkeeping per turn, decode tokens/s at several batch sizes, KV bytes per 1000 tokens,
and llama-cpp-python on the same GGUF when it is installed."""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

TURN = "Could you tell me briefly what the weather will be like tomorrow morning?"


def _ttft(engine: Any, history: int, warm: bool) -> float:
    from voicepipe.stages.base import SamplingParams

    c = engine.new_conversation("You are a helpful assistant.")
    filler = "The quick brown fox jumps over the lazy dog. " * (history // 10 + 1)
    if history:
        c.add_message("user", engine.tokenizer.decode(engine.tokenizer.encode(filler)[:history]))
        c.add_message("assistant", "Understood.")
    if warm:
        c.prefill()
    else:
        c.close()
    c.add_message("user", TURN)
    if not warm:
        engine.radix.evict(engine.pool.num_pages)
    t0 = time.perf_counter()
    for _ in c.generate(SamplingParams(max_tokens=1), threading.Event()):
        break
    dt = time.perf_counter() - t0
    c.close()
    return dt


def _decode_rate(engine: Any, batch: int, tokens: int) -> float:
    from voicepipe.stages.base import SamplingParams

    convs = []
    for i in range(batch):
        c = engine.new_conversation("You are a helpful assistant.")
        c.add_message("user", f"Write a long story about a dragon number {i}.")
        c.prefill()
        convs.append(c)
    counts = [0] * batch

    def run(i: int) -> None:
        for _ in convs[i].generate(SamplingParams(max_tokens=tokens), threading.Event()):
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(batch)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for c in convs:
        c.close()
    return sum(c.stats.generated_tokens for c in convs) / dt


def _bookkeeping_us(engine: Any) -> float:
    from voicepipe.llm.radix import PagePool, PinnedSequence, RadixCache

    pool = PagePool(4096, engine.pool.page_size)
    cache = RadixCache(pool)
    seq = PinnedSequence(cache)
    seq.extend(list(range(4000)))
    seq.commit()
    times = []
    for turn in range(50):
        t0 = time.perf_counter()
        seq.extend([5000 + turn] * 15)  # the new turn's tokens: page allocation
        _ = seq.slots
        seq.commit()  # insert
        times.append(time.perf_counter() - t0)
        seq.rollback(4000)
    node, n = cache.match_prefix(list(range(4000)))  # a new session's match
    return statistics.median(times) * 1e6


def _llama_cpp_rate(path: str, threads: int, tokens: int) -> float | str:
    """llama-cpp-python's tokens/s at batch 1 on the same file, or why there is none."""
    if not path.endswith(".gguf"):
        return "needs a GGUF model"
    try:
        from llama_cpp import Llama
    except ImportError:
        return "not installed"
    llm = Llama(model_path=path, n_threads=threads, n_ctx=2048, verbose=False)
    prompt = "<|im_start|>user\nWrite a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
    llm(prompt, max_tokens=4)
    t0 = time.perf_counter()
    out = llm(prompt, max_tokens=tokens, temperature=0.0)
    dt = time.perf_counter() - t0
    return out["usage"]["completion_tokens"] / dt  # includes the short prompt's prefill


def run(args: argparse.Namespace) -> int:
    import torch

    from voicepipe.llm.engine import Engine
    from voicepipe.llm.model import PagedKV
    from voicepipe.models import resolve

    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    engine = Engine.load(str(path), dtype=args.dtype, kv_cache_gb=args.kv_cache_gb,
                         kv_dtype=args.kv_dtype)
    info = engine.info()
    print(f"model {path.name}, {info['dtype']}, {args.threads} threads")
    print(f"KV {info['kv_dtype']}, attention: {info['attention']}")
    engine.warmup()
    # Warm turns go round the histories, so load from other processes falls on every column;
    # they are cheap (the history is cached), so there are more of them than cold ones.
    warm: dict[int, list[float]] = {h: [] for h in args.histories}
    for _ in range(args.warm_repeat):
        for history in args.histories:
            warm[history].append(_ttft(engine, history, True))
    print("| history | warm TTFT ms | cold TTFT ms |")
    for history in args.histories:
        cold = statistics.median(_ttft(engine, history, False) for _ in range(args.repeat))
        print(f"| {history} | {statistics.median(warm[history]) * 1e3:.0f} | {cold * 1e3:.0f} |",
              flush=True)
    first, last = args.histories[0], args.histories[-1]
    if last != first:
        growth = statistics.median(warm[last]) / statistics.median(warm[first])
        print(f"cached TTFT at {last} tokens / at {first}: {growth:.3f}x")
    print(f"bookkeeping per turn at 4000 tokens: {_bookkeeping_us(engine):.0f} us")
    kv = PagedKV.bytes_per_token(engine.decoder.config, engine.kv.k.dtype) * 1000
    print(f"KV per 1000 tokens: {kv / 2**20:.1f} MiB ({info['kv_dtype']})")
    for batch in args.batches:
        print(f"decode batch {batch}: {_decode_rate(engine, batch, args.tokens):.1f} tok/s",
              flush=True)
    rate = _llama_cpp_rate(str(path), args.threads, args.tokens)
    print("llama-cpp-python batch 1: " + (rate if isinstance(rate, str) else f"{rate:.1f} tok/s"))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("engine", help="the LLM engine's prefix cache, decode rate and "
                              "llama.cpp side by side")
    _arguments(p)
    p.set_defaults(fn=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-0.5b-instruct-q4_k_m")
    p.add_argument("--dtype", default=None, help="auto (int8 on the CPU), int8, float32, ...")
    p.add_argument("--kv-dtype", default=None,
                   help="KV pool: auto (bfloat16 where the CPU attention kernel runs), float32, "
                   "bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--histories", type=int, nargs="+", default=[0, 500, 1000, 2000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3,
                   help="cold turns per history (each re-runs the whole history)")
    p.add_argument("--warm-repeat", type=int, default=15,
                   help="cached turns per history; the table shows the medians")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV pool size (default: the engine's own sizing)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="voicepipe-bench engine")
    _arguments(parser)
    run(parser.parse_args())
