"""The turn detector: speech start, the first silent frame, resumption and the endpoint."""

from voicepipe.turns import SilenceBegan, SpeechResumed, SpeechStarted, SpeechStopped, TurnDetector

F = 512


def feed(det: TurnDetector, probs: list[float], start: int = 0) -> list[tuple[int, object]]:
    out = []
    for i, prob in enumerate(probs):
        end = start + (i + 1) * F
        out += [(end, ev) for ev in det.frame(prob, end)]
    return out


def test_speech_needs_consecutive_frames_and_reports_its_start() -> None:
    det = TurnDetector(threshold=0.5, silence_duration_ms=200, min_speech_frames=2)
    events = feed(det, [0.1, 0.9, 0.2, 0.9, 0.9, 0.9])
    assert [ev for _, ev in events] == [SpeechStarted(start=3 * F)]
    assert det.in_speech


def test_endpoint_after_silence_duration_with_speech_end_at_last_speech_frame() -> None:
    det = TurnDetector(threshold=0.5, silence_duration_ms=96, min_speech_frames=1)
    events = feed(det, [0.9, 0.9, 0.1, 0.1, 0.1, 0.1])
    kinds = [ev for _, ev in events]
    assert kinds[0] == SpeechStarted(0)
    assert kinds[1] == SilenceBegan(speech_end=2 * F)
    # 96 ms = 1536 samples = 3 frames of silence after the last speech frame
    assert (5 * F, SpeechStopped(speech_end=2 * F)) in events
    assert not det.in_speech


def test_resumed_speech_cancels_the_pending_endpoint() -> None:
    det = TurnDetector(threshold=0.5, silence_duration_ms=96, min_speech_frames=1)
    events = [ev for _, ev in feed(det, [0.9, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1])]
    assert events == [SpeechStarted(0), SilenceBegan(F), SpeechResumed(), SilenceBegan(4 * F),
                      SpeechStopped(4 * F)]


def test_hysteresis_keeps_speech_through_mid_probabilities() -> None:
    det = TurnDetector(threshold=0.5, silence_duration_ms=64, min_speech_frames=1,
                       hysteresis=0.15)
    events = [ev for _, ev in feed(det, [0.9, 0.4, 0.4, 0.4, 0.4])]
    assert events == [SpeechStarted(0)]
