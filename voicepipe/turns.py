"""Server-side turn detection: speech probabilities per frame in, speech start/stop out.

Pure and clock-free: positions are in samples of the 16 kHz analysis stream since the session
started. Speech starts when `min_speech_frames` consecutive frames reach the threshold, and
stops when the probability stayed below `threshold - hysteresis` for the silence duration. The
first silent frame after speech is reported too (`SilenceBegan`), so the final transcription
can start during the endpoint wait instead of after it.
"""

from __future__ import annotations

from dataclasses import dataclass

RATE = 16000


@dataclass(frozen=True)
class SpeechStarted:
    start: int  # first sample of speech


@dataclass(frozen=True)
class SilenceBegan:
    speech_end: int  # one past the last speech sample, if the silence lasts


@dataclass(frozen=True)
class SpeechResumed:
    pass


@dataclass(frozen=True)
class SpeechStopped:
    speech_end: int


TurnEvent = SpeechStarted | SilenceBegan | SpeechResumed | SpeechStopped


class TurnDetector:
    def __init__(
        self,
        threshold: float = 0.5,
        silence_duration_ms: int = 500,
        min_speech_frames: int = 2,
        hysteresis: float = 0.15,
        frame_samples: int = 512,
    ) -> None:
        self.threshold = threshold
        self.off_threshold = max(0.01, threshold - hysteresis)
        self.frame_samples = frame_samples
        self.silence_samples = silence_duration_ms * RATE // 1000
        self.min_speech_frames = max(1, min_speech_frames)
        self.in_speech = False
        self._run = 0  # consecutive speech frames while not in speech
        self._speech_end = 0  # end of the last speech frame while in speech
        self._silent = False

    def reset(self) -> None:
        self.in_speech = False
        self._run = 0
        self._silent = False

    def frame(self, prob: float, end: int) -> list[TurnEvent]:
        """Feed the probability of the frame ending at sample `end`."""
        events: list[TurnEvent] = []
        if not self.in_speech:
            self._run = self._run + 1 if prob >= self.threshold else 0
            if self._run >= self.min_speech_frames:
                self.in_speech = True
                self._silent = False
                self._speech_end = end
                events.append(SpeechStarted(end - self._run * self.frame_samples))
                self._run = 0
            return events
        if prob >= self.off_threshold:
            self._speech_end = end
            if self._silent:
                self._silent = False
                events.append(SpeechResumed())
            return events
        if not self._silent:
            self._silent = True
            events.append(SilenceBegan(self._speech_end))
        if end - self._speech_end >= self.silence_samples:
            self.in_speech = False
            self._silent = False
            events.append(SpeechStopped(self._speech_end))
        return events
