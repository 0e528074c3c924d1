"""Synthetic test speech from the espeak-ng command line program.

espeak-ng is a Debian package (`apt-get install espeak-ng`), not a Python dependency. Its
output (22,050 Hz PCM16 WAV) is converted with `voicepipe.audio`, so tests and the benchmark
need no audio files checked in.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from voicepipe.audio import float_to_pcm16, pcm16_to_float, resample


class EspeakMissingError(RuntimeError):
    """The espeak-ng program is not installed."""


def _espeak_bin() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissingError(
            "espeak-ng is not installed (needed to make test speech): apt-get install espeak-ng"
        )
    return exe


def espeak_pcm(
    text: str, rate: int = 16000, voice: str = "en-us", words_per_minute: int = 175
) -> np.ndarray:
    """Speak `text` with espeak-ng and return float32 mono audio at `rate`."""
    proc = subprocess.run(
        [_espeak_bin(), "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed: {proc.stderr.decode(errors='replace').strip()}")
    with wave.open(io.BytesIO(proc.stdout)) as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise RuntimeError("espeak-ng produced audio that is not mono PCM16")
        src = wav.getframerate()
        audio = pcm16_to_float(wav.readframes(wav.getnframes()))
    return resample(audio, src, rate)


def espeak_wav(
    text: str, path: str | Path, rate: int = 24000, voice: str = "en-us"
) -> Path:
    """Write `text` spoken by espeak-ng to a mono PCM16 WAV file at `rate`."""
    return write_wav(path, espeak_pcm(text, rate, voice), rate)


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> Path:
    """Write float32 mono audio to a PCM16 WAV file."""
    path = Path(path)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(float_to_pcm16(audio))
    return path
