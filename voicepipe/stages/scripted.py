"""Instant, deterministic stand-ins for ASR, LLM and TTS.

They exist to test and load-test the server itself — protocol handling, turn-taking, barge-in,
the orchestration overhead — without model latency in the way. The transcript and the reply
are fixed; the "speech" is a tone. The LLM stand-in keeps its messages like the real engine,
so truncation and deletion are observable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np

from voicepipe.stages.base import GenerationStats, SamplingParams, Transcript

REPLY = "This is a scripted reply from voicepipe. It has two sentences."


class ScriptedASR:
    sample_rate = 16000

    def __init__(self, text: str = "Hello from the scripted transcriber.") -> None:
        self.text = text
        self.failures: list[BaseException] = []  # raised by the next final passes (fault tests)

    def transcribe(self, audio: np.ndarray, *, final: bool) -> Transcript:
        if self.failures and final:
            raise self.failures.pop(0)
        return Transcript(self.text, len(audio) / self.sample_rate)


class ScriptedConversation:
    def __init__(self, llm: ScriptedLLM, instructions: str) -> None:
        self.llm = llm
        self.messages: list[tuple[str, str]] = [("system", instructions)]
        self._words = [len(instructions.split())]  # per message: the "tokens" of the stats
        self._stats = GenerationStats()
        self._ran = 1  # messages already "prefilled"
        self.closed = False

    def add_message(self, role: str, text: str) -> None:
        self.messages.append((role, text))
        self._words.append(len(text.split()))

    def prefill(self) -> int:
        """Mark the pending messages as run; returns their word count."""
        new = sum(self._words[self._ran :])
        self._ran = len(self.messages)
        return new

    def generate(self, params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        if self.llm.failures:
            raise self.llm.failures.pop(0)
        new = sum(self._words[self._ran:])
        cached = sum(self._words[: self._ran])
        self._stats = GenerationStats(prefill_tokens=new, cached_tokens=cached)
        words = self.llm.reply.split(" ")
        out = ""
        try:
            for i, word in enumerate(words[: params.max_tokens]):
                if cancel.is_set():
                    break
                if self.llm.token_delay:
                    time.sleep(self.llm.token_delay)
                delta = word if i == 0 else " " + word
                out += delta
                self._stats.generated_tokens += 1
                yield delta
        finally:
            self.add_message("assistant", out)
            self._ran = len(self.messages)

    def truncate_last_assistant(self, kept_text: str) -> None:
        for i in range(len(self.messages) - 1, -1, -1):
            role, text = self.messages[i]
            if role == "assistant":
                if not text.startswith(kept_text):
                    raise ValueError(f"{kept_text!r} is not a prefix of {text!r}")
                self.messages[i] = (role, kept_text)
                self._words[i] = len(kept_text.split())
                return

    def set_instructions(self, text: str) -> None:
        self.messages[0] = ("system", text)
        self._words[0] = len(text.split())

    def delete_message(self, index: int) -> None:
        del self.messages[index + 1]
        del self._words[index + 1]

    @property
    def stats(self) -> GenerationStats:
        return self._stats

    def close(self) -> None:
        self.closed = True
        self.llm.open_conversations.discard(self)


class ScriptedLLM:
    def __init__(self, reply: str = REPLY, token_delay: float = 0.0) -> None:
        self.reply = reply
        self.token_delay = token_delay
        self.failures: list[BaseException] = []  # raised by the next generate() calls
        self.open_conversations: set[ScriptedConversation] = set()

    def new_conversation(self, instructions: str) -> ScriptedConversation:
        conv = ScriptedConversation(self, instructions)
        self.open_conversations.add(conv)
        return conv

    def warmup(self) -> None:
        pass


class ScriptedTTS:
    """100 ms of a 440 Hz tone per phrase."""

    sample_rate = 24000

    def __init__(self, seconds: float = 0.1) -> None:
        t = np.arange(int(seconds * self.sample_rate)) / self.sample_rate
        self._tone = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        self.failures: list[BaseException] = []  # raised by the next calls (fault tests)

    def synthesize(self, text: str) -> np.ndarray:
        if self.failures:
            raise self.failures.pop(0)
        return self._tone.copy()
