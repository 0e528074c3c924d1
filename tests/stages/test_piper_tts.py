"""PiperTTS (joe-medium voice) checked by listening with our own ASR."""

from __future__ import annotations

import numpy as np
import pytest

from voicepipe.audio import resample
from voicepipe.stages.piper_tts import PiperTTS, phoneme_ids, phonemize
from voicepipe.stages.whisper_asr import WhisperASR

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    voice = PiperTTS()
    voice.warmup()
    return voice


def test_phoneme_ids_follow_pipers_layout() -> None:
    id_map = {"^": [1], "$": [2], "_": [0], "a": [14], "b": [15]}
    assert phoneme_ids(["a", "b", "?"], id_map) == [1, 0, 14, 0, 15, 0, 2]


def test_phonemize_speaks_ipa() -> None:
    phonemes = phonemize("The capital of France is Paris.", "en-us")
    assert "".join(phonemes).startswith("ðə kˈæpɪɾəl")
    assert phonemes[-1] == "."


def test_voice_is_22050_hz_float32(tts: PiperTTS) -> None:
    assert tts.sample_rate == 22050
    audio = tts.synthesize("Hello there.")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.4 < len(audio) / tts.sample_rate < 2.0
    assert 0.0 < np.abs(audio).max() <= 1.0
    assert tts.synthesize("   ").size == 0


def test_speech_is_understood_by_our_asr(tts: PiperTTS) -> None:
    audio = tts.synthesize("The capital of France is Paris.")
    asr = WhisperASR()
    text = asr.transcribe(resample(audio, tts.sample_rate, 16000), final=True).text.lower()
    assert "paris" in text
    assert "capital" in text
