"""SileroVAD on real speech from espeak-ng."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from voicepipe.stages.base import StageError
from voicepipe.stages.silero_vad import SileroVAD
from voicepipe.testing.speech import espeak_pcm

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return espeak_pcm("what is the capital of France", 16000)


def probabilities(stream, audio: np.ndarray, n: int = 512) -> np.ndarray:
    return np.array([stream.process(audio[i : i + n]) for i in range(0, len(audio) - n + 1, n)])


def test_contract(vad: SileroVAD) -> None:
    assert vad.sample_rate == 16000
    assert vad.frame_samples == 512


def test_speech_is_detected_and_silence_is_not(vad: SileroVAD, speech: np.ndarray) -> None:
    silence = np.zeros(16000, np.float32)
    p = probabilities(vad.new_stream(), np.concatenate([silence, speech, silence]))
    lead, body, tail = p[:31], p[31 : 31 + len(speech) // 512], p[-20:]
    assert lead.max() < 0.1
    assert np.mean(body > 0.5) > 0.8
    assert body.max() > 0.95
    assert tail.max() < 0.1


def test_low_noise_is_not_speech(vad: SileroVAD) -> None:
    noise = (0.005 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    assert probabilities(vad.new_stream(), noise).max() < 0.2


def test_streams_are_independent_and_reset_restores_a_fresh_stream(
    vad: SileroVAD, speech: np.ndarray
) -> None:
    fresh = vad.new_stream()
    reference = probabilities(fresh, speech)
    used = vad.new_stream()
    probabilities(used, speech[::-1].copy())
    used.reset()
    np.testing.assert_allclose(probabilities(used, speech), reference, atol=1e-6)
    # A stream interleaved with another gives the same result as one used alone.
    a, b = vad.new_stream(), vad.new_stream()
    pa = []
    for i in range(0, len(speech) - 511, 512):
        pa.append(a.process(speech[i : i + 512]))
        b.process(np.zeros(512, np.float32))
    np.testing.assert_allclose(pa, reference, atol=1e-6)


def test_streams_run_concurrently_in_threads(vad: SileroVAD, speech: np.ndarray) -> None:
    reference = probabilities(vad.new_stream(), speech)
    results: list[np.ndarray] = [np.zeros(0)] * 4

    def work(k: int) -> None:
        results[k] = probabilities(vad.new_stream(), speech)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, reference, atol=1e-6)


def test_wrong_frame_size_is_rejected(vad: SileroVAD) -> None:
    with pytest.raises(StageError, match="512"):
        vad.new_stream().process(np.zeros(480, np.float32))
