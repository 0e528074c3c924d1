"""PNG plots: the CDF of client voice-to-voice per concurrency level, and a waterfall of the
stages of the median turn (server marks, then the network and client share)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import stats

# (stage, start mark, end mark); "ready" is the later of asr_final and endpoint.
STAGES = (
    ("endpointing (VAD silence)", "speech_end", "endpoint"),
    ("ASR final", "speech_end", "asr_final"),
    ("LLM first token", "ready", "llm_first_token"),
    ("first phrase: decode + TTS", "llm_first_token", "tts_first_audio"),
    ("send", "tts_first_audio", "first_byte_sent"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def cdf(turns: list[dict[str, Any]], path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for level, recs in stats.by_level(turns).items():
        xs = sorted(v for t in recs
                    if (v := stats.value(t, ("client_voice_to_voice_ms",))) is not None)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{level} session{'s' * (level > 1)}")
    ax.set_xlabel("client voice-to-voice (ms): last speech sample sent → first reply audio")
    ax.set_ylabel("share of turns")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Voice-to-voice latency by concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def median_turn(turns: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The turn with the median client voice-to-voice (preferring turns with server marks)."""
    marked = [t for t in turns if t.get("server_marks") and
              t.get("client_voice_to_voice_ms") is not None]
    pool = marked or [t for t in turns if t.get("client_voice_to_voice_ms") is not None]
    if not pool:
        return None
    pool = sorted(pool, key=lambda t: t["client_voice_to_voice_ms"])
    return pool[(len(pool) - 1) // 2]


def stage_bars(turn: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(stage, start ms, length ms) after the end of speech, ending with the network/client
    share: client voice-to-voice minus the server's."""
    marks = dict(turn.get("server_marks") or {})
    v2v = turn["client_voice_to_voice_ms"]
    if "speech_end" not in marks:
        return [("client voice-to-voice", 0.0, v2v)]
    t0 = marks["speech_end"]
    ready = [marks[k] for k in ("asr_final", "endpoint") if k in marks]
    if ready:
        marks["ready"] = max(ready)
    bars = []
    for name, a, b in STAGES:
        if a in marks and b in marks:
            start = (marks[a] - t0) * 1000.0
            bars.append((name, start, max(0.0, (marks[b] - marks[a]) * 1000.0)))
    if "first_byte_sent" in marks:
        server = (marks["first_byte_sent"] - t0) * 1000.0
        bars.append(("network + client", server, max(0.0, v2v - server)))
    return bars


def waterfall(turns: list[dict[str, Any]], path: str | Path) -> Path:
    plt = _pyplot()
    turn = median_turn(turns)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if turn is None:
        ax.text(0.5, 0.5, "no turn with a reply", ha="center", va="center")
    else:
        bars = stage_bars(turn)
        colors = plt.get_cmap("tab10").colors
        for i, (_, start, length) in enumerate(bars):
            ax.barh(i, length, left=start, color=colors[i % len(colors)])
            ax.text(start + length, i, f" {length:.0f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(bars)), [b[0] for b in bars])
        ax.invert_yaxis()
        ax.set_xlabel("ms after the last speech sample")
        ax.set_title(f"Median turn: {turn['client_voice_to_voice_ms']:.0f} ms voice-to-voice "
                     f"({turn.get('sessions', 1)} session(s))")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
