"""Percentiles of every figure in a set of turn records."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# (label, path in a turn record, unit); server figures come from the voicepipe.latency event.
SERVER_FIGURES = ("endpoint_delay", "asr_latency", "llm_ttft", "token_to_first_byte",
                  "voice_to_voice")
FIGURES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("client voice_to_voice", ("client_voice_to_voice_ms",), "ms"),
    *((f"server {f}", ("server_ms", f), "ms") for f in SERVER_FIGURES),
    ("reply audio", ("reply_audio_ms",), "ms"),
    ("reply underruns", ("underruns",), ""),
    ("reply gap total", ("gap_ms",), "ms"),
    ("reply gap max", ("max_gap_ms",), "ms"),
    ("barge-in stop", ("barge_in_stop_ms",), "ms"),
    ("llm prefill tokens", ("llm", "prefill_tokens"), ""),
    ("llm cached tokens", ("llm", "cached_tokens"), ""),
)
QUANTILES = (50, 90, 99)


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def value(rec: dict[str, Any], path: tuple[str, ...]) -> float | None:
    x: Any = rec
    for key in path:
        if not isinstance(x, dict):
            return None
        x = x.get(key)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def series(turns: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Every figure's values, in turn order, for the figures that occur."""
    out: dict[str, list[float]] = {}
    for label, path, _ in FIGURES:
        values = [v for t in turns if (v := value(t, path)) is not None]
        if values:
            out[label] = values
    return out


def summary(turns: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{figure: {n, p50, p90, p99, max}} plus counts of outcomes under "turns"."""
    out: dict[str, dict[str, float]] = {}
    for label, values in series(turns).items():
        row = {"n": float(len(values))}
        row.update({f"p{q}": percentile(values, q) for q in QUANTILES})
        row["max"] = max(values)
        out[label] = row
    out["turns"] = {
        "n": float(len(turns)),
        "errors": float(sum(1 for t in turns if t.get("error"))),
        "no_reply": float(sum(1 for t in turns if t.get("kind") != "quiet"
                              and not t.get("error") and t.get("status") is None)),
        "barge_in_cut": float(sum(1 for t in turns if t.get("barge_in_cut"))),
        "barge_in_not_cut": float(sum(1 for t in turns if t.get("barge_in_cut") is False)),
        "false_replies": float(sum(1 for t in turns if t.get("false_reply"))),
    }
    return out


def by_level(turns: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    levels: dict[int, list[dict[str, Any]]] = {}
    for t in turns:
        levels.setdefault(int(t.get("sessions", 1)), []).append(t)
    return dict(sorted(levels.items()))


def unit(label: str) -> str:
    return next((u for name, _, u in FIGURES if name == label), "")
