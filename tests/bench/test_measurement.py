"""The bench's figures against a fake server with known, injected delays.

The fake server runs in the test's process and records when it really received the last loud
frame and sent each audio chunk, on the same clock as the bench; the bench must agree with
that ground truth within a few milliseconds, and with the injected delays within scheduling
noise (the machine may be busy, so those bounds are wider).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from voicepipe.bench import scenarios as sc
from voicepipe.bench.playback import play
from voicepipe.bench.speech import Utterance, noise, silence

from .fake_server import RATE, FakeRealtime, Script

TRUTH_MS = 10.0  # bench vs. what the server actually did (same process, same clock)
# Against the injected delays only lower bounds hold: a busy machine makes every sleep longer,
# never shorter (1 ms of slack for the event loop's clock).
EARLY_MS = 1.0


def tone(seconds: float = 0.4, level: float = 0.3) -> Utterance:
    t = np.arange(int(seconds * RATE)) / RATE
    return Utterance("tone", (level * np.sin(2 * np.pi * 300 * t)).astype(np.float32), RATE)


async def test_voice_to_voice_gaps_and_server_marks() -> None:
    # three 100 ms chunks; the third arrives 250 ms after the first two have played
    script = Script(v2v_s=0.3, chunks=[(0.0, 0.1), (0.05, 0.1), (0.45, 0.1)])
    async with FakeRealtime(script) as fake:
        call = await sc.open_call(fake.url, None)
        try:
            rec = await sc.ask(call, tone(), timeout=10, linger=1.0)
        finally:
            await call.close()
    truth = fake.truths[0]
    true_v2v = (truth.sent[0][0] - truth.last_loud_at) * 1000
    assert rec["client_voice_to_voice_ms"] == pytest.approx(true_v2v, abs=TRUTH_MS)
    assert rec["client_voice_to_voice_ms"] >= 300 - EARLY_MS
    assert rec["reply_audio_ms"] == pytest.approx(300)
    true_gaps = play(truth.sent)
    assert rec["underruns"] == true_gaps.underruns == 1
    assert rec["gap_ms"] == pytest.approx(true_gaps.gap_s * 1000, abs=TRUTH_MS)
    assert rec["gap_ms"] >= 250 - EARLY_MS
    assert rec["status"] == "completed"
    assert rec["server_ms"] == {"endpoint_delay": pytest.approx(200)}
    assert rec["llm"] == {"prefill_tokens": 7, "cached_tokens": 70}


async def test_barge_in_stop_time_and_cut() -> None:
    # a 2 s reply streamed in real time; audio stops 200 ms after the user talks over it
    script = Script(v2v_s=0.2, chunks=[(0.1 * i, 0.1) for i in range(20)], stop_s=0.2)
    async with FakeRealtime(script) as fake:
        call = await sc.open_call(fake.url, None)
        try:
            rec = await sc.interrupt(call, tone(), tone(0.3), rng=random.Random(1),
                                     delay_s=(0.4, 0.6), timeout=10)
        finally:
            await call.close()
    truth = fake.truths[0]
    assert truth.cancelled and truth.interrupted_at is not None
    true_stop = (truth.sent[-1][0] - truth.interrupted_at) * 1000
    assert rec["barge_in_stop_ms"] == pytest.approx(true_stop, abs=TRUTH_MS)
    assert rec["barge_in_stop_ms"] >= 0
    assert rec["barge_in_cut"] is True
    assert rec["status"] == "cancelled"
    assert rec["kept_audio_ms"] is not None and rec["kept_audio_ms"] < rec["reply_audio_ms"]
    assert 400 <= rec["interrupted_after_ms"] <= 600
    assert len(fake.truths) == 2  # the interruption itself got its answer


@pytest.mark.parametrize("quiet, threshold, replied", [
    (silence(0.5), 0.02, False), (noise(0.5, dbfs=-40), 0.02, False),
    (noise(0.5, dbfs=-40), 0.001, True),  # a server that takes room noise for speech
])
async def test_silence_and_noise_must_not_be_answered(quiet: Utterance, threshold: float,
                                                      replied: bool) -> None:
    async with FakeRealtime(Script(v2v_s=0.1, threshold=threshold)) as fake:
        call = await sc.open_call(fake.url, None)
        try:
            rec = await sc.stay_quiet(call, quiet, wait_s=0.5)
        finally:
            await call.close()
    assert rec["false_reply"] is replied
