"""WhisperASR (faster-whisper tiny.en) on real speech from espeak-ng."""

from __future__ import annotations

import numpy as np
import pytest

from voicepipe.stages.base import Transcript
from voicepipe.stages.whisper_asr import WhisperASR
from voicepipe.testing.speech import espeak_pcm

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def asr() -> WhisperASR:
    return WhisperASR()


@pytest.mark.parametrize("final", [True, False])
def test_transcribes_a_question(asr: WhisperASR, final: bool) -> None:
    audio = espeak_pcm("what is the capital of France", 16000)
    result = asr.transcribe(audio, final=final)
    assert isinstance(result, Transcript)
    assert "capital" in result.text.lower()
    assert "france" in result.text.lower()
    assert result.audio_seconds == pytest.approx(len(audio) / 16000)


def test_transcribes_a_longer_sentence(asr: WhisperASR) -> None:
    text = "I would like to book a table for two people tomorrow evening"
    result = asr.transcribe(espeak_pcm(text, 16000), final=True).text.lower()
    for word in ("book", "table", "two", "tomorrow", "evening"):
        assert word in result


def test_silence_noise_and_tiny_inputs_give_no_text(asr: WhisperASR) -> None:
    assert asr.transcribe(np.zeros(32000, np.float32), final=True).text == ""
    noise = (0.01 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    assert asr.transcribe(noise, final=False).text == ""
    assert asr.transcribe(np.zeros(100, np.float32), final=False) == Transcript("", 100 / 16000)


def test_turn_longer_than_one_window(asr: WhisperASR) -> None:
    phrase = espeak_pcm("the capital of France is Paris", 16000)
    gap = np.zeros(8000, np.float32)
    audio = np.concatenate([np.concatenate([phrase, gap])] * 14)
    assert len(audio) > 30 * 16000
    text = asr.transcribe(audio, final=True).text.lower()
    assert text.count("paris") >= 10
