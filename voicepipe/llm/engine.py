"""The embedded LLM engine: the `LLM` stage interface over one loaded decoder.

Each `ChatConversation` owns a `KVCache` and the exact token ids of its history. A new turn
renders the chat template for the whole message list, checks that the text of the held tokens
is a prefix of it and tokenizes only the rest, so earlier turns are never re-tokenized and
generated ids stay as they were generated. When the check fails (instructions changed, message
deleted, a template that rewrites history) the held ids are cut back to the longest prefix
whose text still matches, and the KV cache rolls back with them.

Concurrency: one conversation is driven by one thread at a time; several conversations may
generate from different threads, and the model forward is serialized by a lock, one prefill
chunk or decode step at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from voicepipe.llm.model import Checkpoint, Decoder, KVCache, default_dtype
from voicepipe.llm.tokenizer import ChatTokenizer, IncrementalDecoder
from voicepipe.models import ModelError, resolve
from voicepipe.stages.base import GenerationStats, SamplingParams

_ROLES = ("system", "user", "assistant")
PREFILL_CHUNK = 512  # tokens per forward call, so one long prefill does not hold the lock long


class Engine:
    """One decoder and its tokenizer, shared by any number of conversations."""

    def __init__(self, decoder: Decoder, tokenizer: ChatTokenizer, name: str = "") -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.name = name
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, model_name_or_path: str, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> Engine:
        """A GGUF file (llama/qwen2) or a Hugging Face folder, by path or model name."""
        path = resolve(str(model_name_or_path))
        return cls.from_checkpoint(_load_checkpoint(path), path.name, device, dtype)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        name: str = "",
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Engine:
        dev = torch.device(device)
        decoder = Decoder(
            checkpoint.config, dict(checkpoint.weights), dev, dtype or default_dtype(dev)
        )
        return cls(decoder, checkpoint.tokenizer, name)

    def new_conversation(self, instructions: str) -> ChatConversation:
        return ChatConversation(self, instructions)

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
            "dtype": str(self.decoder.dtype).removeprefix("torch."),
            "device": str(self.decoder.device),
        }

    def run(self, ids: Sequence[int], cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Append `ids` to `cache` (in chunks, under the model lock) and return their logits:
        of the last token, or with `all_logits` of every token ([len(ids), vocab])."""
        if not ids:
            raise ValueError("no tokens to run")
        device = self.decoder.device
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = torch.tensor(ids[start : start + PREFILL_CHUNK], device=device)
                with self._lock:
                    logits = self.decoder.forward(chunk, cache, all_logits=all_logits)
                outputs.append(logits)
        return torch.cat(outputs) if all_logits else outputs[-1]


class ChatConversation:
    """One session's dialogue: messages, the token ids it holds and their KV cache."""

    def __init__(self, engine: Engine, instructions: str) -> None:
        self._engine = engine
        self._tok = engine.tokenizer
        self._instructions = instructions
        self.messages: list[dict[str, str]] = []  # without the system prompt
        # Token history. Invariant: the KV of tokens[:cache.length] is in the cache; held
        # tokens past it (the last sampled token, say) are run at the start of the next turn.
        self._tokens: list[int] = []
        self._cache: KVCache | None = None
        # Where the last generated reply's ids lie in _tokens, for truncate_last_assistant.
        self._reply: tuple[int, int] | None = None  # (message index, first token index)
        self._stats = GenerationStats()

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
        return self._cache.length if self._cache is not None else 0

    @property
    def stats(self) -> GenerationStats:
        return self._stats

    def close(self) -> None:
        self._cache = None  # a later turn allocates a new cache and re-runs the history

    def chat(self, *, add_generation_prompt: bool = True) -> list[dict[str, str]]:
        """The message list given to the chat template (system prompt first, if any)."""
        system = [{"role": "system", "content": self._instructions}] if self._instructions else []
        return system + self.messages

    # --- turns --------------------------------------------------------------------------------

    def _sync(self) -> KVCache:
        """Extend the held tokens to the rendered prompt; roll the cache back where they differ.

        After this, tokens[:cache.length] have KV and tokens[cache.length:] (at least one)
        still have to be run.
        """
        rendered = self._tok.render(self.chat(), add_generation_prompt=True)
        held = self._tok.decode(self._tokens)
        keep = len(self._tokens)
        if not rendered.startswith(held):
            keep = self._matching_prefix(rendered)
            held = self._tok.decode(self._tokens[:keep])
            if self._reply is not None and self._reply[1] > keep:
                self._reply = None
        self._tokens[keep:] = self._tok.encode(rendered[len(held) :])
        if not self._tokens:
            raise ValueError("the chat template rendered an empty prompt")
        if self._cache is None:
            self._cache = self._engine.decoder.new_cache(max(256, 2 * len(self._tokens)))
        # Logits come from running at least one token, so re-run the last one if all are cached.
        self._cache.truncate(min(keep, len(self._tokens) - 1))
        return self._cache

    def _matching_prefix(self, rendered: str) -> int:
        """The largest k such that the text of tokens[:k] is a prefix of `rendered`."""
        lo, hi = 0, len(self._tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if rendered.startswith(self._tok.decode(self._tokens[:mid])):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def generate(self, params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        """Run the pending messages and stream the assistant reply as text deltas."""
        cache = self._sync()
        stats = self._stats = GenerationStats(
            prefill_tokens=len(self._tokens) - cache.length, cached_tokens=cache.length
        )
        reply_start = len(self._tokens)
        self.messages.append({"role": "assistant", "content": ""})
        self._reply = (len(self.messages) - 1, reply_start)
        generator = _generator(params.seed, self._engine.decoder.device)
        stop_ids = self._tok.stop_ids
        detok = IncrementalDecoder(self._tok)
        try:
            if cancel.is_set():
                return
            logits = self._engine.run(self._tokens[cache.length :], cache)
            for step in range(params.max_tokens):
                token = sample(logits, params, generator)
                self._tokens.append(token)
                stats.generated_tokens += 1
                if token in stop_ids:
                    break
                delta = detok.push(token)
                if delta:
                    yield delta
                if step + 1 == params.max_tokens or cancel.is_set():
                    break
                logits = self._engine.run([token], cache)
            tail = detok.flush()
            if tail:
                yield tail
        finally:
            ids = [t for t in self._tokens[reply_start:] if t not in stop_ids]
            self.messages[-1]["content"] = self._tok.decode(ids, skip_special=True)

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
        self.messages[index]["content"] = self._tok.decode(reply[:k], skip_special=True)
        if self._cache is not None:
            self._cache.truncate(len(self._tokens))


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from float32 logits [vocab]: greedy at temperature 0, else temperature,
    top-k and top-p (nucleus) sampling."""
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
