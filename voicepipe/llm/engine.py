"""The embedded LLM engine: the `LLM` stage interface over one loaded decoder.

KV lives in one `PagedKV` pool shared by all conversations; a `RadixCache` maps cached token
prefixes to their slots (a shared system prompt is stored once), and each `ChatConversation`
holds a `PinnedSequence` on its own history, so a new turn runs only its new tokens. A new turn
renders the chat template for the whole message list, checks that the text of the held tokens
is a prefix of it and tokenizes only the rest, so earlier turns are never re-tokenized and
generated ids stay as they were generated. When the check fails (instructions changed, message
deleted, a speculative transcript replaced) the held ids are cut back to the longest prefix whose
text still matches, and the KV rolls back with them.

Concurrency: one conversation is driven by one thread at a time. Its `generate` hands a
`Request` to the engine's single scheduler thread, which batches the decode steps of all active
requests into one forward per step and adds at most `PREFILL_CHUNK` prompt tokens per step, so a
long prompt never stalls other streams. The radix cache, the pool and every sequence are touched
only under `Engine.lock`; the forward itself runs outside it.
"""

from __future__ import annotations

import array
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voicepipe.llm.model import BatchSegment, Checkpoint, Decoder, KVCache, PagedKV, default_dtype
from voicepipe.llm.radix import OutOfPages, PagePool, PinnedSequence, RadixCache
from voicepipe.llm.tokenizer import ChatTokenizer, IncrementalDecoder
from voicepipe.models import ModelError, resolve
from voicepipe.stages.base import GenerationStats, SamplingParams, StageError

_ROLES = ("system", "user", "assistant")
PREFILL_CHUNK = 256  # prompt tokens per scheduler step, across all requests
PAGE_SIZE = 16
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, bool]:
    """(activation dtype, int8 weights) for a dtype option: None/"auto" is int8 weights on the
    CPU (about 5x the decode speed of float32, see `voicepipe-bench engine`) and bf16/fp16 on
    CUDA; "int8", "float32", "bfloat16", "float16" choose explicitly."""
    if isinstance(dtype, torch.dtype):
        return dtype, False
    if dtype in (None, "auto"):
        return default_dtype(device), device.type == "cpu"
    if dtype == "int8":
        if device.type != "cpu":
            raise ValueError("int8 weights are for the CPU")
        return torch.float32, True
    try:
        return _DTYPES[dtype], False
    except KeyError:
        raise ValueError(f"unknown LLM dtype {dtype!r}") from None


def parse_kv_dtype(
    kv_dtype: str | torch.dtype | None, decoder: Decoder, *, fused: bool = False
) -> torch.dtype:
    """The KV pool's dtype for a kv_dtype option. None/"auto": bfloat16 on a CPU where the fused
    bf16 attention kernel runs this model (half the KV memory, and its attention is the fastest
    there), else the activations' dtype (also with the Triton kernels, `fused`, written for it).
    "float32" or "bfloat16" choose explicitly; a KV dtype other than the activations' is for
    the CPU only."""
    if kv_dtype in (None, "auto"):
        if not fused and decoder.device.type == "cpu" and decoder.dtype == torch.float32:
            from voicepipe.kernels import cpu_attention

            c = decoder.config
            if cpu_attention.supports(c.n_heads, c.n_kv_heads, c.head_dim) and (
                    cpu_attention.available()):
                return torch.bfloat16
        return decoder.dtype
    if isinstance(kv_dtype, str):
        if _DTYPES.get(kv_dtype) not in (torch.float32, torch.bfloat16):
            raise ValueError(f"unknown KV dtype {kv_dtype!r}: auto, float32 or bfloat16")
        kv_dtype = _DTYPES[kv_dtype]
    if kv_dtype != decoder.dtype and decoder.device.type != "cpu":
        raise ValueError("a KV dtype other than the activations' is for the CPU only")
    return kv_dtype


def kv_pool_pages(
    decoder: Decoder, page_size: int, kv_cache_gb: float | None, fraction: float = 0.1,
    kv_dtype: torch.dtype | None = None,
) -> int:
    """Pages of a pool of `kv_cache_gb` GB, or by default `fraction` of the memory (free GPU
    memory on CUDA, total RAM capped at 1 GB on the CPU)."""
    if kv_cache_gb is None:
        if decoder.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(decoder.device)
            budget = free * fraction * 5  # half of what is free after the weights
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            budget = min(total * fraction, 1 << 30)
    else:
        budget = kv_cache_gb * (1 << 30)
    per_page = PagedKV.bytes_per_token(decoder.config, kv_dtype or decoder.dtype) * page_size
    return max(2, int(budget // per_page))


class Engine:
    """One decoder, its tokenizer and its KV pool, shared by any number of conversations.

    `kv_dtype` is the pool's dtype (see `parse_kv_dtype`); with a bf16 pool on the CPU the
    attention runs in the fused C kernel when it loads, PyTorch's otherwise (`attention`)."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer: ChatTokenizer,
        name: str = "",
        *,
        kv_cache_gb: float | None = None,
        page_size: int = PAGE_SIZE,
        num_pages: int | None = None,
        fused_kernels: bool | None = None,
        kv_dtype: str | torch.dtype | None = None,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.name = name
        # Fused Triton kernels (voicepipe.kernels): by default on CUDA only; on the CPU they run
        # in Triton's interpreter, which is for tests, not speed.
        fused = decoder.device.type == "cuda" if fused_kernels is None else fused_kernels
        if fused:
            from voicepipe.kernels import use_fused

            use_fused(decoder)
        kv = parse_kv_dtype(kv_dtype, decoder, fused=fused)
        self.attention = "triton" if fused else "torch"
        if kv == torch.bfloat16 and decoder.device.type == "cpu":
            from voicepipe.kernels import use_cpu_attention

            if use_cpu_attention(decoder):
                self.attention = "bf16 C kernel (AVX512-BF16)"
        pages = num_pages or kv_pool_pages(decoder, page_size, kv_cache_gb, kv_dtype=kv)
        self.kv = decoder.new_paged_kv(pages, page_size, kv)
        self.pool = PagePool(pages, page_size)
        self.radix = RadixCache(self.pool)
        self.lock = threading.RLock()  # radix cache, pool and sequences
        self._forward_lock = threading.Lock()  # the model (the reference `run` path)
        self._scheduler = Scheduler(self)
        self._conversations: weakref.WeakSet[ChatConversation] = weakref.WeakSet()

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        kv_cache_gb: float | None = None,
        page_size: int = PAGE_SIZE,
        fused_kernels: bool | None = None,
        kv_dtype: str | torch.dtype | None = None,
    ) -> Engine:
        """A GGUF file (llama/qwen2) or a Hugging Face folder, by path or model name."""
        path = resolve(str(model_name_or_path))
        return cls.from_checkpoint(_load_checkpoint(path), path.name, device, dtype,
                                   kv_cache_gb=kv_cache_gb, page_size=page_size,
                                   fused_kernels=fused_kernels, kv_dtype=kv_dtype)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        name: str = "",
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        kv_cache_gb: float | None = None,
        page_size: int = PAGE_SIZE,
        num_pages: int | None = None,
        fused_kernels: bool | None = None,
        kv_dtype: str | torch.dtype | None = None,
    ) -> Engine:
        dev = torch.device(device)
        act, int8 = parse_dtype(dtype, dev)
        decoder = Decoder(checkpoint.config, dict(checkpoint.weights), dev, act, int8=int8)
        return cls(decoder, checkpoint.tokenizer, name, kv_cache_gb=kv_cache_gb,
                   page_size=page_size, num_pages=num_pages, fused_kernels=fused_kernels,
                   kv_dtype=kv_dtype)

    def new_conversation(self, instructions: str) -> ChatConversation:
        conversation = ChatConversation(self, instructions)
        self._conversations.add(conversation)
        return conversation

    def warmup(self) -> None:
        """Run a short generation so the first real turn does not pay one-time costs."""
        conversation = self.new_conversation("You are a helpful assistant.")
        conversation.add_message("user", "Hello!")
        for _ in conversation.generate(SamplingParams(max_tokens=4), threading.Event()):
            pass
        conversation.close()

    def info(self) -> dict[str, Any]:
        c = self.decoder.config
        return {
            "name": self.name,
            "arch": c.arch,
            "params": self.decoder.num_parameters(),
            "layers": c.n_layers,
            "context_length": c.context_length,
            "dtype": "int8" if self.decoder.int8 else str(self.decoder.dtype).removeprefix("torch."),
            "device": str(self.decoder.device),
            "kv_pages": self.pool.num_pages,
            "page_size": self.pool.page_size,
            "kv_dtype": str(self.kv.k.dtype).removeprefix("torch."),
            "attention": self.attention,
        }

    def run(self, ids: Sequence[int], cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Reference path without the pool: append `ids` to a contiguous `cache` and return their
        logits (of the last token, or with `all_logits` of every token)."""
        if not ids:
            raise ValueError("no tokens to run")
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = torch.tensor(ids[start : start + PREFILL_CHUNK], device=self.decoder.device)
                with self._forward_lock:
                    outputs.append(self.decoder.forward(chunk, cache, all_logits=all_logits))
        return torch.cat(outputs) if all_logits else outputs[-1]

    def release_idle(self, keep: ChatConversation | None = None) -> bool:
        """Unpin the least recently used idle conversation's history (it stays cached until
        evicted, and its next turn re-matches what is left). False when none is idle."""
        with self.lock:
            idle = [c for c in self._conversations
                    if c is not keep and not c._busy and c._seq is not None and c._seq.length]
            if not idle:
                return False
            victim = min(idle, key=lambda c: c._last_used)
            victim._seq.release()  # type: ignore[union-attr]
            return True

    def close(self) -> None:
        self._scheduler.stop()


@dataclass(eq=False)
class Request:
    """One `generate` (or speculative `prefill`) of one conversation, owned by the scheduler.

    `tokens` is the conversation's full id list as the scheduler sees it; positions
    [0, seq.length) have KV, `pending` are the next tokens to run.
    """

    seq: PinnedSequence
    tokens: list[int]
    pending: list[int]
    params: SamplingParams
    cancel: threading.Event
    generate: bool = True
    logits: torch.Tensor | None = None  # ready logits of tokens[-1] (after a prefill)
    out: queue.SimpleQueue[int | None | BaseException] = field(default_factory=queue.SimpleQueue)
    stop: threading.Event = field(default_factory=threading.Event)  # the consumer is done
    done: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    generator: torch.Generator | None = None
    last_logits: torch.Tensor | None = None


class Scheduler:
    """The engine loop: schedule, run one batched forward, sample, repeat."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._active: list[Request] = []
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False

    def submit(self, request: Request) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="llm-scheduler",
                                                daemon=True)
                self._thread.start()
        self._incoming.put(request)
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
            while True:
                try:
                    self._active.append(self._incoming.get_nowait())
                except queue.Empty:
                    break
            if not self._active:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                progressed = self.step()
            except BaseException as exc:  # never let the loop die with requests waiting
                for r in self._active:
                    self._finish(r, exc)
                self._active.clear()
                continue
            if not progressed:
                # Every request waits for pages that a settling conversation still holds;
                # `wake` comes when one settles.
                self._wake.wait(0.01)
                self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def step(self) -> bool:
        """One scheduling round; False when no request could run or sample (all wait)."""
        engine = self.engine
        batch: dict[Request, list[int]] = {}  # insertion order is the forward's order
        with engine.lock:
            context = engine.decoder.config.context_length
            for r in list(self._active):
                if r.stop.is_set() or r.cancel.is_set():
                    self._finish(r)
                elif len(r.tokens) > context:
                    self._finish(r, StageError(
                        "llm", f"the conversation exceeds the model's context of {context} tokens"))
            budget = PREFILL_CHUNK
            # Decode steps first (they are what listeners wait for), then prefill chunks.
            order = sorted(self._active, key=lambda r: len(r.pending) > 1)
            for r in order:
                if r not in self._active or r.logits is not None:
                    continue  # failed, or samples without a forward below
                if (r.seq.length + len(r.pending) != len(r.tokens)
                        or (r.seq.length == 0 and len(r.tokens) > 1)):
                    # New, preempted, or its conversation's history was released as idle
                    # before the request arrived: reuse what is still cached.
                    r.seq.rematch(r.tokens)
                    r.seq.rollback(len(r.tokens) - 1)
                    r.pending = r.tokens[r.seq.length :]
                n = len(r.pending) if len(r.pending) == 1 else min(len(r.pending), budget)
                if n == 0:
                    continue
                chunk = r.pending[:n]
                if not self._allocate(r, chunk, batch):
                    continue
                budget -= n if n > 1 else 0
                batch[r] = chunk
            segments = [BatchSegment(len(chunk), _long_tensor(r.seq.slots))
                        for r, chunk in batch.items()]
            ready = any(r.logits is not None for r in self._active)
        if batch:
            tokens = torch.tensor([t for chunk in batch.values() for t in chunk],
                                  device=engine.decoder.device)
            with torch.inference_mode():
                logits = engine.decoder.forward_paged(tokens, segments, engine.kv)
            for (r, chunk), row in zip(batch.items(), logits, strict=True):
                del r.pending[: len(chunk)]
                if not r.pending:
                    r.logits = row
        with engine.lock:
            for r in list(self._active):
                if r.logits is not None:
                    self._sample(r)
        return bool(batch) or ready

    def _allocate(self, r: Request, chunk: list[int], batch: dict[Request, list[int]]) -> bool:
        """Slots for `chunk`, evicting unreferenced cache, then idle conversations' histories,
        then preempting younger requests (taking them out of this step's `batch`); False when
        the request must wait a step.

        Pages may also be held where the scheduler cannot take them: by a conversation that is
        settling a finished request or by a request not yet picked up from the queue. Those
        come free by themselves, so the request waits; it fails only when it cannot fit even
        in an empty pool."""
        engine = self.engine
        pool = engine.pool
        while True:
            try:
                r.seq.extend(chunk)
                return True
            except OutOfPages:
                pass
            if engine.release_idle():
                continue
            younger = [o for o in self._active[self._active.index(r) + 1:] if o.seq.length]
            if not younger:
                break
            victim = younger[-1]
            self._preempt(victim)
            batch.pop(victim, None)
        if -(-len(r.tokens) // pool.page_size) > pool.num_pages:
            self._finish(r, StageError("llm", "the conversation does not fit the KV pool"))
        elif pool.free_pages + len(pool.pages(r.seq.slots)) == pool.num_pages:
            # Only this request holds pages, yet its chunk does not fit: its history is spread
            # over partly used pages. Start it over in an emptied pool, where it is contiguous.
            self._preempt(r)
            engine.radix.evict(pool.num_pages)
            r.pending = list(r.tokens)
        return False

    def _preempt(self, r: Request) -> None:
        """Free a request's KV; it re-runs its tokens (what is still cached is matched)."""
        r.seq.release()
        r.logits = None
        r.pending = list(r.tokens)

    def _sample(self, r: Request) -> None:
        logits, r.logits = r.logits, None
        assert logits is not None
        if not r.generate:
            r.last_logits = logits
            self._finish(r)
            return
        if r.generator is None:
            r.generator = _generator(r.params.seed, logits.device)
        token = sample(logits, r.params, r.generator, r.tokens)
        r.tokens.append(token)
        r.generated += 1
        r.out.put(token)
        if token in self.engine.tokenizer.stop_ids or r.generated >= r.params.max_tokens:
            self._finish(r)
        else:
            r.pending = [token]

    def _finish(self, r: Request, error: BaseException | None = None) -> None:
        if r in self._active:
            self._active.remove(r)
        if error is not None:
            r.out.put(error)
        r.out.put(None)
        r.done.set()


class ChatConversation:
    """One session's dialogue: messages, the token ids it holds and its pinned KV sequence."""

    def __init__(self, engine: Engine, instructions: str) -> None:
        self._engine = engine
        self._tok = engine.tokenizer
        self._instructions = instructions
        self.messages: list[dict[str, str]] = []  # without the system prompt
        # Token history. Invariant: _seq holds the KV of tokens[:_seq.length]; held tokens past
        # it (the last sampled token, say) are run at the start of the next turn.
        self._tokens: list[int] = []
        self._text = ""  # decode(_tokens), kept so a turn does not re-decode the history
        self._text_len = 0  # len(_tokens) when _text was computed
        self._seq: PinnedSequence | None = None
        self._logits: torch.Tensor | None = None  # of _tokens[-1], after a speculative prefill
        # Where the last generated reply's ids lie in _tokens, for truncate_last_assistant.
        self._reply: tuple[int, int] | None = None  # (message index, first token index)
        self._stats = GenerationStats()
        self._busy = False
        self._last_used = 0.0

    # --- messages -----------------------------------------------------------------------------

    def add_message(self, role: str, text: str) -> None:
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {_ROLES}")
        self.messages.append({"role": role, "content": text})

    def set_instructions(self, text: str) -> None:
        self._instructions = text

    def delete_message(self, index: int) -> None:
        index = range(len(self.messages))[index]  # IndexError when out of range
        del self.messages[index]
        if self._reply is not None and self._reply[0] >= index:
            self._reply = None

    @property
    def instructions(self) -> str:
        return self._instructions

    @property
    def token_ids(self) -> list[int]:
        """The token history this conversation holds (a copy)."""
        return list(self._tokens)

    @property
    def cached_tokens(self) -> int:
        return self._seq.length if self._seq is not None else 0

    @property
    def stats(self) -> GenerationStats:
        return self._stats

    def close(self) -> None:
        """Unpin the KV (it stays in the shared cache until evicted); a later turn re-matches."""
        with self._engine.lock:
            if self._seq is not None:
                self._seq.release()
                self._engine.radix.unpin(self._seq.node)
                self._seq = None
        self._logits = None

    def chat(self, *, add_generation_prompt: bool = True) -> list[dict[str, str]]:
        """The message list given to the chat template (system prompt first, if any)."""
        system = [{"role": "system", "content": self._instructions}] if self._instructions else []
        return system + self.messages

    # --- turns --------------------------------------------------------------------------------

    def _held_text(self) -> str:
        if self._text_len != len(self._tokens):
            self._text = self._tok.decode(self._tokens)
            self._text_len = len(self._tokens)
        return self._text

    def _sync(self) -> list[int]:
        """Extend the held tokens to the rendered prompt; roll the KV back where they differ.
        Returns the tokens still to run (at least one unless ready logits are kept)."""
        rendered = self._tok.render(self.chat(), add_generation_prompt=True)
        held = self._held_text()
        keep = len(self._tokens)
        if not rendered.startswith(held):
            keep, held = self._matching_prefix(rendered, held)
            if self._reply is not None and self._reply[1] > keep:
                self._reply = None
        tail = self._tok.encode(rendered[len(held) :])
        if keep < len(self._tokens) or tail:
            self._logits = None
        self._tokens[keep:] = tail
        self._text, self._text_len = rendered, len(self._tokens)
        if not self._tokens:
            raise ValueError("the chat template rendered an empty prompt")
        engine = self._engine
        with engine.lock:
            if self._seq is None:
                self._seq = PinnedSequence(engine.radix)
            seq = self._seq
            seq.rollback(keep)
            if seq.length < keep or seq.length == 0:
                # New, or released under memory pressure: take what the shared cache holds.
                seq.rematch(self._tokens)
            if self._logits is not None and seq.length == len(self._tokens):
                return []
            # Logits come from running at least one token: re-run the last one if all are cached.
            seq.rollback(min(seq.length, len(self._tokens) - 1))
            return self._tokens[seq.length :]

    def _matching_prefix(self, rendered: str, held: str) -> tuple[int, str]:
        """The largest k such that the text of tokens[:k] is a prefix of `rendered`, and that
        text. `held` is the text of all tokens.

        The usual divergence is a few tokens from the end (the generation prompt of a
        speculative prefill, a replaced transcript), so the last tokens are tried first by
        decoding only the dropped tail: a cost that does not grow with the history."""
        tokens = self._tokens
        for k in range(len(tokens) - 1, max(-1, len(tokens) - 64), -1):
            tail = self._tok.decode(tokens[k:])
            if not held.endswith(tail):
                continue  # the cut splits a character, or decoding is not concatenative here
            text = held[: len(held) - len(tail)]
            if rendered.startswith(text):
                # Byte-level decoding splits cleanly there (see `byte_level`); otherwise check
                # by decoding the prefix, which costs as much as the history is long.
                if ((self._tok.byte_level and "\ufffd" not in tail)
                        or self._tok.decode(tokens[:k]) == text):
                    return k, text
                break
        lo, hi = 0, len(tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if rendered.startswith(self._tok.decode(tokens[:mid])):
                lo = mid
            else:
                hi = mid - 1
        return lo, self._tok.decode(tokens[:lo])

    def _request(self, pending: list[int], params: SamplingParams,
                 cancel: threading.Event, generate: bool) -> Request:
        assert self._seq is not None
        request = Request(self._seq, list(self._tokens), list(pending), params, cancel,
                          generate=generate, logits=self._logits)
        self._logits = None
        self._busy = True
        self._engine._scheduler.submit(request)
        return request

    def _settle(self, request: Request) -> None:
        """After a request: keep the KV of the tokens this conversation holds, commit it."""
        request.stop.set()
        request.done.wait()
        with self._engine.lock:
            seq = self._seq
            assert seq is not None
            # The scheduler may have run past what the consumer took (or been preempted).
            seq.rollback(min(seq.length, len(self._tokens)))
            seq.commit()
        self._busy = False
        self._last_used = _now()
        self._engine._scheduler.wake()  # its history may now be released for a waiting request

    def prefill(self) -> int:
        """Run the pending messages (with the assistant's generation prompt) through the model
        without generating, e.g. a speculative user transcript while the endpoint is still
        undecided. Returns the number of tokens run. A following `generate` with the same
        messages starts sampling at once; changed messages roll back to the common prefix."""
        pending = self._sync()
        if not pending:
            return 0
        request = self._request(pending, SamplingParams(max_tokens=0), threading.Event(), False)
        try:
            while (item := request.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
        finally:
            self._settle(request)
        if request.last_logits is not None and self.cached_tokens == len(self._tokens):
            self._logits = request.last_logits
        return len(pending)

    def generate(self, params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        """Run the pending messages and stream the assistant reply as text deltas."""
        pending = self._sync()
        stats = self._stats = GenerationStats(
            prefill_tokens=len(pending), cached_tokens=self.cached_tokens
        )
        reply_start = len(self._tokens)
        self.messages.append({"role": "assistant", "content": ""})
        self._reply = (len(self.messages) - 1, reply_start)
        stop_ids = self._tok.stop_ids
        detok = IncrementalDecoder(self._tok)
        stops = [s for s in params.stop if s]
        text = ""  # the reply so far, cut at a stop string
        sent = 0  # characters of `text` yielded
        request: Request | None = None
        try:
            if cancel.is_set() or params.max_tokens <= 0:
                return
            request = self._request(pending, params, cancel, True)
            finished = False
            while not finished:
                item = request.out.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if cancel.is_set():
                    break
                self._tokens.append(item)
                stats.generated_tokens += 1
                if item in stop_ids:
                    break
                text += detok.push(item)
                end, finished = _stop_cut(text, stops, sent)
                if end > sent:
                    yield text[sent:end]
                    sent = end
                if cancel.is_set():
                    break
            if not finished and not cancel.is_set():
                text += detok.flush()
                end, _ = _stop_cut(text, stops, sent, final=True)
                if end > sent:
                    yield text[sent:end]
                    sent = end
        finally:
            if request is not None:
                self._settle(request)
            ids = [t for t in self._tokens[reply_start:] if t not in stop_ids]
            self.messages[-1]["content"] = (
                text[:sent] if stops else self._tok.decode(ids, skip_special=True))

    def truncate_last_assistant(self, kept_text: str) -> None:
        """Cut the last assistant message to the last token boundary within `kept_text`."""
        index = next(
            (i for i in range(len(self.messages) - 1, -1, -1)
             if self.messages[i]["role"] == "assistant"),
            None,
        )
        if index is None:
            raise ValueError("there is no assistant message to truncate")
        content = self.messages[index]["content"]
        n = 0
        while n < min(len(content), len(kept_text)) and content[n] == kept_text[n]:
            n += 1
        kept_text = content[:n]
        if self._reply is None or self._reply[0] != index:
            self.messages[index]["content"] = kept_text  # the next turn's prefix check rolls back
            return
        start = self._reply[1]
        reply = self._tokens[start:]
        # Largest k whose text is a prefix of kept_text (texts grow with k, except that a
        # token ending mid-character decodes to U+FFFD and is never a prefix).
        k = 0
        for i in range(1, len(reply) + 1):
            text = self._tok.decode(reply[:i], skip_special=True)
            if len(text) > len(kept_text):
                break
            if kept_text.startswith(text):
                k = i
        del self._tokens[start + k :]
        self._logits = None
        self.messages[index]["content"] = self._tok.decode(reply[:k], skip_special=True)
        with self._engine.lock:
            if self._seq is not None:
                self._seq.rollback(len(self._tokens))


def _now() -> float:
    import time

    return time.monotonic()


def _stop_cut(text: str, stops: list[str], sent: int, *, final: bool = False) -> tuple[int, bool]:
    """How much of `text` may be yielded and whether a stop string was hit: text up to a stop
    string, holding back a tail that could still become one."""
    if not stops:
        return len(text), False
    hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    if final:
        return len(text), False
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold, False


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _long_tensor(values: list[int]) -> torch.Tensor:
    """A 1-D int64 tensor of `values` (non-empty) through a packed array: a few times faster
    than `torch.tensor` on a long list, which matters for a history's slots on every step."""
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    history: Sequence[int] = (),
) -> int:
    """The next token from float32 logits [vocab]: repetition penalty over `history` (the
    CTRL/Hugging Face rule: positive logits divided, negative multiplied), then greedy at
    temperature 0, else temperature, top-k and top-p (nucleus) sampling."""
    if params.repetition_penalty != 1.0 and history:
        ids = torch.tensor(sorted(set(history)), device=logits.device)
        seen = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(seen > 0, seen / params.repetition_penalty,
                                  seen * params.repetition_penalty)
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits / params.temperature
    if params.top_k > 0:
        values, indices = torch.topk(scaled, min(params.top_k, scaled.numel()))
    else:
        values, indices = torch.sort(scaled, descending=True)
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest head of the sorted distribution whose mass reaches top_p.
        before = probs.cumsum(0) - probs
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])


def _load_checkpoint(path: Path) -> Checkpoint:
    from voicepipe.llm.gguf import load_gguf
    from voicepipe.llm.hf import load_hf

    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0])
        raise ModelError(f"{path.name}: neither a Hugging Face folder nor a folder of one .gguf")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path.name}: not a GGUF file")
    return load_gguf(path)
