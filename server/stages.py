"""Loading and warming the default stages, with progress reported as it goes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from voicepipe.config import ServerConfig
from voicepipe.stages.base import Stages

if TYPE_CHECKING:
    from voicepipe.stages.openai_llm import OpenAILLM

log = logging.getLogger("voicepipe.stages")


def load_stages(config: ServerConfig, progress: Callable[[str], None] | None = None) -> Stages:
    """Load VAD, ASR, LLM and TTS as the config names them, then warm each one up."""
    say = progress or log.info
    device = config.resolved_device()
    threads = config.threads or None
    import torch

    if threads:
        torch.set_num_threads(threads)
    info: dict[str, str] = {"device": device}

    def step(name: str, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        say(f"loading {name} ...")
        obj = fn()
        say(f"loaded {name} in {time.perf_counter() - t0:.1f}s")
        return obj

    from voicepipe.llm.engine import Engine
    from voicepipe.stages.piper_tts import PiperTTS
    from voicepipe.stages.silero_vad import SileroVAD

    if config.stages == "scripted":
        from voicepipe.stages.scripted import ScriptedASR, ScriptedLLM, ScriptedTTS

        vad = step(f"VAD ({config.vad_model})", lambda: SileroVAD(config.vad_model))
        say("scripted ASR, LLM and TTS: instant stand-ins for load tests, not a voice agent")
        return Stages(vad=vad, asr=ScriptedASR(), llm=ScriptedLLM(),  # type: ignore[arg-type]
                      tts=ScriptedTTS(), info={"device": "cpu", "stages": "scripted",
                                               "vad": config.vad_model})
    from voicepipe.stages.whisper_asr import WhisperASR

    vad = step(f"VAD ({config.vad_model})", lambda: SileroVAD(config.vad_model))
    compute = config.asr_compute_type
    if compute == "auto":
        compute = "float16" if device.startswith("cuda") else "int8"
    cuda = device.startswith("cuda")
    asr = step(f"ASR ({config.asr_model}, {compute})", lambda: WhisperASR(
        config.asr_model, device="cuda" if cuda else "cpu", compute_type=compute,
        cpu_threads=threads or os.cpu_count() or 1))
    dtype = None if config.llm_dtype == "auto" else config.llm_dtype
    external = _external_llm(config, say) if config.llm_url else None
    llm = external or step(f"LLM ({config.llm_model})", lambda: Engine.load(
        config.llm_model, device=device, dtype=dtype, kv_cache_gb=config.kv_cache_gb or None,
        page_size=config.kv_page_tokens, kv_dtype=config.kv_dtype))
    tts = step(f"TTS ({config.tts_model})", lambda: PiperTTS(config.tts_model, use_cuda=cuda,
                                                                    threads=threads or 0))
    t0 = time.perf_counter()
    say("warming up ...")
    import numpy as np

    asr.transcribe(np.zeros(16000, np.float32), final=True)  # type: ignore[attr-defined]
    llm.warmup()  # type: ignore[attr-defined]
    tts.synthesize("Hello.")  # type: ignore[attr-defined]
    say(f"warm in {time.perf_counter() - t0:.1f}s")
    info.update(vad=config.vad_model, asr=config.asr_model, llm=config.llm_model,
                tts=config.tts_model)
    if external is not None:
        info["llm"] = f"{external.model or '(unknown model)'} at {config.llm_url}"
    return Stages(vad=vad, asr=asr, llm=llm, tts=tts, info=info)  # type: ignore[arg-type]


def _external_llm(config: ServerConfig, say: Callable[[str], None]) -> OpenAILLM:
    from voicepipe import models
    from voicepipe.stages.openai_llm import OpenAILLM

    say(f"LLM: the OpenAI-compatible server at {config.llm_url}")
    return OpenAILLM(
        config.llm_url, "" if config.llm_model == models.DEFAULT_LLM else config.llm_model,
        config.llm_api_key, connect_timeout_s=config.llm_connect_timeout_s,
        timeout_s=config.llm_timeout_s, retries=config.llm_retries, slots=config.llm_slots)
