"""What the benchmark says: built-in questions spoken by espeak-ng, or the user's WAV files.

Every utterance is float32 mono audio with its sample rate; the microphone resamples it to the
session's input format. Silence and noise make the "nothing was said" scenarios.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUESTIONS = (
    "What is the capital of France?",
    "And what is the capital of Germany?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is two plus three?",
    "Which animal says moo?",
    "What do bees make?",
    "What is the opposite of hot?",
    "How many legs does a spider have?",
)
INTERRUPTIONS = ("Wait, stop. Tell me something else.", "Sorry, hold on a second.")
RATE = 24000


@dataclass(frozen=True)
class Utterance:
    name: str
    audio: np.ndarray  # float32 mono in [-1, 1]
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.rate


def spoken(texts: tuple[str, ...] | list[str], rate: int = RATE) -> list[Utterance]:
    """Texts spoken by espeak-ng (must be installed)."""
    from voicepipe.testing.speech import espeak_pcm

    return [Utterance(t, espeak_pcm(t, rate).astype(np.float32), rate) for t in texts]


def wav_files(paths: list[str]) -> list[Utterance]:
    """WAV files, and every *.wav in the folders given, in name order."""
    from voicepipe_client import load_wav

    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.wav")) if p.is_dir() else [p])
    if not files:
        raise ValueError(f"no WAV files in {paths}")
    out = []
    for f in files:
        audio, rate = load_wav(f)
        out.append(Utterance(f.name, np.asarray(audio, np.float32), rate))
    return out


def silence(seconds: float, rate: int = RATE) -> Utterance:
    return Utterance(f"silence {seconds:g}s", np.zeros(int(seconds * rate), np.float32), rate)


def noise(seconds: float, rate: int = RATE, dbfs: float = -40.0, seed: int = 0) -> Utterance:
    """White noise at `dbfs` RMS: room noise, not speech."""
    rng = np.random.default_rng(seed)
    level = 10 ** (dbfs / 20)
    audio = np.clip(rng.normal(0.0, level, int(seconds * rate)), -1, 1).astype(np.float32)
    return Utterance(f"noise {dbfs:g} dBFS {seconds:g}s", audio, rate)
