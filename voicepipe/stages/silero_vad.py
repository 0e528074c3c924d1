"""Silero VAD v6 (ONNX) as the `VAD` stage: one shared ONNX Runtime session, a stream per session.

The v5/v6 model is stateful: each call takes the new 512-sample frame prefixed with the last
64 samples of the previous frame (`input` [1, 576]), the recurrent `state` [2, 1, 128] and the
rate `sr`, and returns the speech probability and the next state. The streams keep context and
state; the session is shared, and ONNX Runtime's `run` is safe to call from several threads.

`process_batch` runs one frame of each of many streams in a single call (`input` [B, 576],
`state` [2, B, 128]): the per-call cost dominates at one frame, so a server batches the frames of
all its sessions (see `voicepipe.stages.batching`). A batch gives each stream exactly the
probability and next state it would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        return float(self._vad.process_batch([self], [frame])[0])

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

    def process_batch(self, streams: Sequence[SileroVADStream],
                      frames: Sequence[np.ndarray]) -> np.ndarray:
        """The next frame of each of several distinct streams in one model call: their speech
        probabilities [B], with each stream's context and state advanced."""
        n = self.frame_samples
        b = len(streams)
        if len(frames) != b or len({id(s) for s in streams}) != b:
            raise StageError("vad", "process_batch takes one frame for each of distinct streams")
        x = np.empty((b, _CONTEXT + n), dtype=np.float32)
        state = np.empty((2, b, 128), dtype=np.float32)
        for i, (stream, frame) in enumerate(zip(streams, frames, strict=True)):
            if frame.shape != (n,):
                raise StageError("vad", f"frame must have shape ({n},), got {frame.shape}")
            x[i, :_CONTEXT] = stream._input[0, n:]  # the last 64 samples of its previous frame
            x[i, _CONTEXT:] = frame
            state[:, i] = stream._state[:, 0]
        prob, state = self._session.run(None, {"input": x, "state": state, "sr": self._sr})
        for i, stream in enumerate(streams):
            stream._input[0] = x[i]
            stream._state = state[:, i : i + 1].copy()
        return prob[:, 0].astype(np.float32)
