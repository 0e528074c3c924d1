"""Piper voices (VITS, ONNX) as the `TTS` stage, on voicepipe's own ONNX Runtime session.

Text becomes IPA phonemes through espeak-ng, using the bridge bundled with the piper-tts
package (GPL-3.0-or-later, like espeak-ng); only its phonemizer is used, not its model runtime.
Phonemes map to ids with the voice config's `phoneme_id_map` in Piper's layout: BOS, then each
phoneme followed by PAD, then EOS. All sentences of one phrase go through the model in a single
call (espeak also ends a "sentence" at abbreviations such as "Dr."), which is one run instead of
several and keeps the prosody of the phrase together.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from voicepipe.models import DEFAULT_TTS, resolve
from voicepipe.stages.base import StageError

_BOS, _EOS, _PAD = "^", "$", "_"

# espeak-ng keeps global state (current voice, buffers): one phonemization at a time.
_ESPEAK_LOCK = threading.Lock()
_espeak: Any = None


def phonemize(text: str, voice: str) -> list[str]:
    """IPA phonemes (Unicode code points, punctuation kept) of `text` for an espeak voice."""
    global _espeak
    with _ESPEAK_LOCK:
        if _espeak is None:
            try:
                from piper.phonemize_espeak import EspeakPhonemizer
            except ImportError as exc:
                raise StageError(
                    "tts", "the espeak-ng phonemizer needs piper-tts: pip install piper-tts==1.8.0"
                ) from exc
            _espeak = EspeakPhonemizer()
        sentences: list[list[str]] = _espeak.phonemize(voice, text)
    phonemes: list[str] = []
    for sentence in sentences:
        if phonemes and sentence:
            phonemes.append(" ")
        phonemes.extend(sentence)
    return phonemes


def phoneme_ids(phonemes: list[str], id_map: dict[str, list[int]]) -> list[int]:
    """Piper's id layout: BOS PAD (phoneme PAD)* EOS; phonemes missing from the map are skipped."""
    pad = id_map[_PAD]
    ids = [*id_map[_BOS], *pad]
    for p in phonemes:
        if p in id_map:
            ids.extend(id_map[p])
            ids.extend(pad)
    ids.extend(id_map[_EOS])
    return ids


def _providers(use_cuda: bool | None) -> list[Any]:
    available = ort.get_available_providers()
    if use_cuda is None:
        use_cuda = "CUDAExecutionProvider" in available
    if use_cuda:
        if "CUDAExecutionProvider" not in available:
            raise StageError("tts", "CUDA requested but onnxruntime has no CUDAExecutionProvider")
        return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class PiperTTS:
    """A Piper voice; `synthesize` is thread-safe and returns float32 at `sample_rate`."""

    def __init__(
        self,
        model: str = DEFAULT_TTS,
        *,
        use_cuda: bool | None = None,  # None: CUDA when onnxruntime has it
        threads: int = 0,  # intra-op threads on the CPU; 0 = ONNX Runtime's default
        length_scale: float | None = None,  # None: the voice config's value
    ) -> None:
        path = resolve(model)
        config_path = Path(str(path) + ".json")
        if not config_path.exists():
            raise StageError("tts", f"voice config {config_path.name} not found beside the model")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        self.sample_rate: int = int(config["audio"]["sample_rate"])
        self.espeak_voice: str = config["espeak"]["voice"]
        if config.get("phoneme_type", "espeak") != "espeak":
            raise StageError("tts", f"unsupported phoneme_type {config['phoneme_type']!r}")
        if config.get("num_speakers", 1) > 1:
            raise StageError("tts", "multi-speaker Piper voices are not supported yet")
        self._id_map: dict[str, list[int]] = config["phoneme_id_map"]
        inference = config.get("inference", {})
        self._scales = np.array(
            [
                inference.get("noise_scale", 0.667),
                length_scale if length_scale is not None else inference.get("length_scale", 1.0),
                inference.get("noise_w", 0.8),
            ],
            dtype=np.float32,
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(path), sess_options=opts, providers=_providers(use_cuda)
        )
        self.providers: list[str] = self._session.get_providers()

    def synthesize(self, text: str) -> np.ndarray:
        phonemes = phonemize(text, self.espeak_voice)
        if not any(p.strip() for p in phonemes):
            return np.zeros(0, dtype=np.float32)
        ids = np.array([phoneme_ids(phonemes, self._id_map)], dtype=np.int64)
        try:
            (audio,) = self._session.run(
                None,
                {
                    "input": ids,
                    "input_lengths": np.array([ids.shape[1]], dtype=np.int64),
                    "scales": self._scales,
                },
            )
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise StageError("tts", f"synthesis failed: {exc}") from exc
        return np.clip(audio.reshape(-1), -1.0, 1.0).astype(np.float32, copy=False)

    def warmup(self) -> None:
        """Synthesize once so that the first reply does not pay for lazy initialisation."""
        self.synthesize("Hello there.")
