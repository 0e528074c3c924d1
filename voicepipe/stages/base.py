"""The four stage interfaces a session talks to: VAD, streaming ASR, LLM and TTS.

Every backend lives in its own module and implements one of these. All calls are synchronous
and may block for the duration of a model call; the server runs them in worker threads, so an
implementation must release the GIL in its heavy work (ONNX Runtime, CTranslate2 and torch do).
Audio crossing these interfaces is mono float32 in [-1, 1] at the rate the stage declares.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np


class StageError(Exception):
    """A stage failed for one request; the session reports it and goes on."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


class VADStream(Protocol):
    """Per-session streaming state of a voice activity detector."""

    def process(self, frame: np.ndarray) -> float:
        """Speech probability of one frame of exactly `VAD.frame_samples` samples."""

    def reset(self) -> None:
        """Forget all state (after a turn is cleared)."""


class VAD(Protocol):
    sample_rate: int  # 16000
    frame_samples: int  # 512 (32 ms at 16 kHz)

    def new_stream(self) -> VADStream: ...


@dataclass(frozen=True)
class Transcript:
    text: str
    audio_seconds: float  # how much audio it covers


class StreamingASR(Protocol):
    """Transcribes the audio of the current turn so far.

    Streaming is driven by the caller: it calls `transcribe` on the growing turn audio for
    partials and once more at the endpoint for the final text. Implementations keep no
    per-session state, so one model serves all sessions.
    """

    sample_rate: int  # 16000

    def transcribe(self, audio: np.ndarray, *, final: bool) -> Transcript:
        """`final=False` may trade accuracy for speed (greedy, shorter context)."""


@dataclass
class SamplingParams:
    max_tokens: int = 200
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the context
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings


@dataclass
class GenerationStats:
    prefill_tokens: int = 0  # tokens run through the model before the first new token
    cached_tokens: int = 0  # tokens whose KV was reused
    generated_tokens: int = 0


class Conversation(Protocol):
    """One session's dialogue with the LLM, with its KV cache kept between turns."""

    def add_message(self, role: str, text: str) -> None:
        """Append a 'user', 'assistant' or 'system' message (not yet run through the model)."""

    def prefill(self) -> int:
        """Run the pending messages through the model without generating (a speculative
        transcript while the endpoint is undecided) and return the number of tokens run. A
        following `generate` on unchanged messages starts at once; a changed or deleted message
        rolls the cache back to the common prefix."""

    def generate(
        self, params: SamplingParams, cancel: threading.Event
    ) -> Iterator[str]:
        """Run the pending messages and stream the assistant reply as text deltas.

        Stops at end-of-turn, `params.max_tokens`, or when `cancel` is set (checked every
        step). The reply, as far as it got, becomes the last assistant message.
        """

    def truncate_last_assistant(self, kept_text: str) -> None:
        """Cut the last assistant message to `kept_text` (a prefix of it), rolling the KV
        cache back to the same point, e.g. after a barge-in."""

    def set_instructions(self, text: str) -> None:
        """Replace the system prompt (invalidates the cache from its first changed token)."""

    def delete_message(self, index: int) -> None: ...

    @property
    def stats(self) -> GenerationStats:
        """Figures of the last `generate` call."""

    def close(self) -> None:
        """Free the KV cache."""


class LLM(Protocol):
    def new_conversation(self, instructions: str) -> Conversation: ...


class TTS(Protocol):
    sample_rate: int  # the voice's native rate, e.g. 22050

    def synthesize(self, text: str) -> np.ndarray:
        """Float32 mono audio of one phrase at `sample_rate`."""


@dataclass
class Stages:
    vad: VAD
    asr: StreamingASR
    llm: LLM
    tts: TTS
    info: dict[str, str] = field(default_factory=dict)
