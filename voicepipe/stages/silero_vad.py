"""Silero VAD v6 (ONNX) as the `VAD` stage: one shared ONNX Runtime session, a stream per session.

The v5/v6 model is stateful: each call takes the new 512-sample frame prefixed with the last
64 samples of the previous frame (`input` [1, 576]), the recurrent `state` [2, 1, 128] and the
rate `sr`, and returns the speech probability and the next state. The streams keep context and
state; the session is shared, and ONNX Runtime's `run` is safe to call from several threads.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from voicepipe.models import DEFAULT_VAD, resolve
from voicepipe.stages.base import StageError

_CONTEXT = 64


class SileroVADStream:
    """One session's recurrent state and 64-sample context."""

    def __init__(self, vad: SileroVAD) -> None:
        self._vad = vad
        self._input = np.zeros((1, _CONTEXT + vad.frame_samples), dtype=np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)

    def process(self, frame: np.ndarray) -> float:
        n = self._vad.frame_samples
        if frame.shape != (n,):
            raise StageError("vad", f"frame must have shape ({n},), got {frame.shape}")
        buf = self._input
        buf[0, :_CONTEXT] = buf[0, n:]  # the last 64 samples of the previous frame
        buf[0, _CONTEXT:] = frame
        prob, self._state = self._vad._session.run(
            None, {"input": buf, "state": self._state, "sr": self._vad._sr}
        )
        return float(prob[0, 0])

    def reset(self) -> None:
        self._input[:] = 0.0
        self._state = np.zeros((2, 1, 128), dtype=np.float32)


class SileroVAD:
    """Silero VAD at 16 kHz, 32 ms frames."""

    sample_rate = 16000
    frame_samples = 512

    def __init__(self, model: str = DEFAULT_VAD, threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(resolve(model)), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(self.sample_rate, dtype=np.int64)

    def new_stream(self) -> SileroVADStream:
        return SileroVADStream(self)
