"""`GET /metrics` after scripted turns, and the per-turn traces."""

from __future__ import annotations

import asyncio
import functools
import urllib.error
import urllib.request
from typing import Any as Running

import numpy as np
import pytest
import voicepipe_client as vc
from prometheus_client.parser import text_string_to_metric_families
from voicepipe.server.metrics import ServerMetrics, stage_spans

from voicepipe.latency import TurnTimings
from voicepipe.testing.speech import espeak_pcm


@functools.cache
def utterance() -> np.ndarray:
    return espeak_pcm("What is the capital of France?", 24000)


async def scrape(http: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> tuple[str, str]:
        with urllib.request.urlopen(f"{http}/metrics", timeout=10) as resp:
            return resp.headers["Content-Type"], resp.read().decode()

    ctype, text = await asyncio.to_thread(get)
    assert ctype.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_metrics_after_a_scripted_turn(scripted: Running) -> None:
    before = await scrape(scripted.http)
    assert before[("voicepipe_active_sessions", ())] == 0
    async with vc.connect(scripted.url) as rt:
        for _ in range(2):
            turn = await rt.talk(utterance(), sample_rate=24000, realtime=4.0)
            await asyncio.sleep(len(turn.reply_audio) / turn.sample_rate + 0.1)  # listen
        await rt.send_event({"type": "no.such.event"})  # one error, counted by code
        await asyncio.sleep(0.2)
        m = await scrape(scripted.http)
        assert m[("voicepipe_active_sessions", ())] == 1
    assert m[("voicepipe_turns_total", (("status", "completed"),))] == 2
    for figure in ("endpoint_delay", "token_to_first_byte", "voice_to_voice"):
        assert m[("voicepipe_turn_latency_seconds_count", (("figure", figure),))] == 2, figure
    for figure in ("asr_latency", "llm_ttft"):  # negative when done during the endpoint wait
        assert m[("voicepipe_turn_signed_latency_seconds_count", (("figure", figure),))] == 2
    v2v_sum = m[("voicepipe_turn_latency_seconds_sum", (("figure", "voice_to_voice"),))]
    assert 0 < v2v_sum < 10
    for mark in ("endpoint", "asr_final", "llm_first_token", "tts_first_audio",
                 "first_byte_sent"):
        assert m[("voicepipe_turn_mark_seconds_count", (("mark", mark),))] == 2, mark
    errors = {k[1]: v for k, v in m.items() if k[0] == "voicepipe_errors_total"}
    assert sum(errors.values()) == 1
    prefill = m[("voicepipe_llm_prefill_tokens_total", ())]
    cached = m[("voicepipe_llm_cached_tokens_total", ())]
    assert prefill > 0 and cached > 0  # the second turn found the first in the cache
    ratio = m[("voicepipe_llm_prefix_cache_hit_ratio", ())]
    assert ratio == pytest.approx(cached / (cached + prefill))
    assert m[("voicepipe_llm_decode_tokens_total", ())] == 2 * 11  # 11 words per reply
    # both replies were started during the endpoint wait; the utterance's pauses started
    # others that its speech then dropped, and their tokens count in the token pacing too
    assert m[("voicepipe_speculative_replies_total", (("outcome", "adopted"),))] == 2
    dropped = m.get(("voicepipe_speculative_replies_total", (("outcome", "dropped"),)), 0)
    paced = m[("voicepipe_llm_inter_token_latency_seconds_count", ())]
    assert 2 * 10 <= paced <= (2 + dropped) * 10
    assert m[("voicepipe_barge_ins_total", ())] == 0


@pytest.mark.server_config(token_delay=0.3)
async def test_barge_in_is_counted_once(scripted: Running) -> None:
    async with vc.connect(scripted.url) as rt:
        await rt.send_audio(utterance(), sample_rate=24000, realtime=4.0,
                            trailing_silence_ms=800)
        async with asyncio.timeout(10):
            while (await rt.recv()).type != "response.output_audio.delta":
                pass
        await rt.send_audio(utterance(), sample_rate=24000, realtime=4.0,
                            trailing_silence_ms=100)
        async with asyncio.timeout(10):
            while (await rt.recv()).type != "response.done":
                pass
        await asyncio.sleep(0.2)
        m = await scrape(scripted.http)
    assert m[("voicepipe_barge_ins_total", ())] == 1
    assert m[("voicepipe_turns_total", (("status", "cancelled"),))] == 1


def test_servers_keep_separate_registries() -> None:
    a, b = ServerMetrics(tracer=None), ServerMetrics(tracer=None)
    a.error("invalid_value")
    assert b"invalid_value" in a.render(0)
    assert b"invalid_value" not in b.render(0)


def timings() -> TurnTimings:
    t = TurnTimings(prefill_tokens=12, cached_tokens=88, generated_tokens=5)
    for name, at in (("speech_end", 100.0), ("asr_final", 100.3), ("endpoint", 100.5),
                     ("llm_first_token", 100.8), ("tts_first_audio", 101.0),
                     ("first_byte_sent", 101.01)):
        t.mark(name, at)
    return t


def test_stage_spans_follow_the_marks() -> None:
    spans = {name: (round(a - 100, 3), round(b - 100, 3)) for name, a, b in
             stage_spans(timings())}
    assert spans == {"endpointing": (0, 0.5), "asr": (0, 0.3), "llm_first_token": (0.5, 0.8),
                     "tts_first_audio": (0.8, 1.0), "send": (1.0, 1.01)}


def test_one_span_per_turn_with_a_child_per_stage() -> None:
    import opentelemetry.sdk.trace as sdk  # the dev extra installs it
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = ServerMetrics(tracer=provider.get_tracer("test"))
    metrics.turn_finished(timings(), "completed", "resp_1")
    spans = exporter.get_finished_spans()
    turn = next(s for s in spans if s.name == "voicepipe.turn")
    children = [s for s in spans if s.parent is not None]
    assert {s.name for s in children} == {"voicepipe.endpointing", "voicepipe.asr",
                                          "voicepipe.llm_first_token",
                                          "voicepipe.tts_first_audio", "voicepipe.send"}
    assert all(s.parent.span_id == turn.context.span_id for s in children)
    assert turn.start_time == 100 * 10**9 and turn.end_time == int(101.01 * 1e9)
    assert turn.attributes["voicepipe.mark.llm_first_token"] == 100.8
    assert turn.attributes["voicepipe.voice_to_voice_ms"] == pytest.approx(1010)
    assert turn.attributes["voicepipe.llm.cached_tokens"] == 88


@pytest.mark.server_config(metrics_key="scrape-me")
async def test_metrics_key_guards_the_page(scripted: Running) -> None:
    def get(headers: dict[str, str]) -> int:
        req = urllib.request.Request(f"{scripted.http}/metrics", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    assert await asyncio.to_thread(get, {}) == 401
    assert await asyncio.to_thread(get, {"Authorization": "Bearer wrong"}) == 401
    assert await asyncio.to_thread(get, {"Authorization": "Bearer scrape-me"}) == 200
