"""The VAD of many sessions batched on one thread: the same probabilities as each stream alone,
in order, with failures and closed sessions confined to themselves."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voicepipe.stages import batching
from voicepipe.stages.base import StageError
from voicepipe.stages.batching import VADBatcher
from voicepipe.stages.silero_vad import SileroVAD
from voicepipe.testing.speech import espeak_pcm

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD()


@pytest.fixture(scope="module")
def voices() -> list[np.ndarray]:
    """Eight different 16 kHz signals cut into 512-sample frames: speech, silence, noise."""
    rng = np.random.default_rng(1)
    texts = ["what is the capital of France", "hello there", "tell me a story",
             "no thanks", "good morning", "turn left at the lights"]
    signals = [espeak_pcm(t, 16000) for t in texts]
    signals += [np.zeros(16000, np.float32), (0.05 * rng.standard_normal(16000)).astype(np.float32)]
    return [x[: len(x) // 512 * 512].reshape(-1, 512) for x in signals]


def alone(vad: SileroVAD, frames: np.ndarray) -> np.ndarray:
    stream = vad.new_stream()
    return np.array([stream.process(f) for f in frames], np.float32)


def test_process_batch_equals_each_stream_alone(vad: SileroVAD, voices: list[np.ndarray]) -> None:
    n = min(len(v) for v in voices)
    streams = [vad.new_stream() for _ in voices]
    got = np.stack([vad.process_batch(streams, [v[i] for v in voices]) for i in range(n)], 1)
    for row, v in zip(got, voices, strict=True):
        np.testing.assert_allclose(row, alone(vad, v[:n]), atol=1e-5)
    with pytest.raises(StageError):
        vad.process_batch([streams[0], streams[0]], [voices[0][0], voices[0][1]])
    with pytest.raises(StageError):
        vad.process_batch([streams[0]], [np.zeros(480, np.float32)])


async def test_many_sessions_get_their_own_probabilities_in_order(
        vad: SileroVAD, voices: list[np.ndarray]) -> None:
    batcher = VADBatcher(vad, max_batch=5)  # fewer than the sessions: calls are split too

    async def session(frames: np.ndarray, chunk: int) -> np.ndarray:
        stream = vad.new_stream()
        out = []
        for i in range(0, len(frames), chunk):
            out.append(await batcher.submit(stream, frames[i : i + chunk]))
        return np.concatenate(out)

    # several frames per message, different message sizes, all sessions at once
    results = await asyncio.gather(*(session(v, 1 + k % 3) for k, v in enumerate(voices)))
    for got, v in zip(results, voices, strict=True):
        np.testing.assert_allclose(got, alone(vad, v), atol=1e-5)
    assert batcher.frames == sum(len(v) for v in voices)
    assert batcher.calls < batcher.frames  # it did batch
    batcher.close()
    with pytest.raises(RuntimeError):
        batcher.submit(vad.new_stream(), voices[0][:1])


class FlakyVAD:
    """A VAD without process_batch whose frames equal to 1.0 raise."""

    frame_samples = 4
    sample_rate = 16000

    class Stream:
        def __init__(self) -> None:
            self.seen = 0

        def process(self, frame: np.ndarray) -> float:
            if frame[0] == 1.0:
                raise ValueError("bad frame")
            self.seen += 1
            return float(frame[0])

        def reset(self) -> None:
            self.seen = 0

    def new_stream(self) -> FlakyVAD.Stream:
        return FlakyVAD.Stream()


async def test_a_failure_or_a_vanished_session_touches_no_one_else() -> None:
    vad = FlakyVAD()
    batcher = VADBatcher(vad)  # type: ignore[arg-type]
    good, bad, gone = vad.new_stream(), vad.new_stream(), vad.new_stream()
    frames = np.full((3, 4), 0.5, np.float32)
    broken = frames.copy()
    broken[1] = 1.0
    abandoned = batcher.submit(gone, frames)
    abandoned.cancel()  # its session closed while the frames were queued
    results = await asyncio.gather(batcher.submit(good, frames), batcher.submit(bad, broken),
                                   return_exceptions=True)
    np.testing.assert_array_equal(results[0], [0.5, 0.5, 0.5])
    assert isinstance(results[1], ValueError)
    assert (await batcher.submit(bad, frames)).tolist() == [0.5] * 3  # the stream goes on
    assert len(await batcher.submit(good, np.zeros((0, 4), np.float32))) == 0
    with pytest.raises(ValueError, match="shape"):
        batcher.submit(good, np.zeros((2, 5), np.float32))
    batcher.close()


async def test_the_thread_ends_when_idle_and_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "IDLE_EXIT_S", 0.05)
    vad = FlakyVAD()
    batcher = VADBatcher(vad)  # type: ignore[arg-type]
    stream = vad.new_stream()
    await batcher.submit(stream, np.zeros((1, 4), np.float32))
    thread = batcher._thread
    assert thread is not None and thread.is_alive()
    for _ in range(100):
        if not thread.is_alive():
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the idle VAD thread did not end")
    assert (await batcher.submit(stream, np.zeros((2, 4), np.float32))).tolist() == [0.0, 0.0]
    assert stream.seen == 3
    batcher.close()
