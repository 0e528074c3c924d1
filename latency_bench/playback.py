"""The reply as a listener hears it: audio played at real time from its first byte.

Chunks of reply audio arrive at some times, each holding some seconds of audio. A player that
starts with the first chunk and never waits on purpose runs dry (an underrun) whenever a chunk
arrives after everything before it has been played; the silence until it arrives is a gap.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_GAP_S = 0.001  # shorter stalls are rounding, not something a listener hears


@dataclass(frozen=True)
class Playback:
    audio_s: float  # reply audio received
    underruns: int
    gap_s: float  # total silence inside the reply
    max_gap_s: float
    ends_at: float | None  # when the last sample has been played (None: no audio)


def play(chunks: list[tuple[float, float]]) -> Playback:
    """`chunks`: (arrival time, seconds of audio) in order of arrival."""
    end: float | None = None
    underruns, total, longest, audio = 0, 0.0, 0.0, 0.0
    for at, seconds in chunks:
        if end is None:
            end = at
        elif at - end > MIN_GAP_S:
            underruns += 1
            total += at - end
            longest = max(longest, at - end)
        end = max(end, at) + seconds
        audio += seconds
    return Playback(audio, underruns, total, longest, end)


def played_at(chunks: list[tuple[float, float]], now: float) -> float:
    """Seconds of the reply played by `now` (for `conversation.item.truncate`)."""
    end: float | None = None
    played = 0.0
    for at, seconds in chunks:
        if at > now:
            break
        start = at if end is None else max(end, at)
        played += max(0.0, min(seconds, now - start))
        end = start + seconds
    return played
