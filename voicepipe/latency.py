"""The latency vocabulary of DESIGN.md: the marks every turn records and the figures derived.

Marks are wall-clock seconds (`time.time()`), so a client can join them to its own clock; the
derived figures are milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MARKS = ("speech_end", "endpoint", "asr_final", "llm_first_token", "tts_first_audio",
         "first_byte_sent")


@dataclass
class TurnTimings:
    marks: dict[str, float] = field(default_factory=dict)
    prefill_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    speculative_tokens: int = 0  # of prefill_tokens, run before the endpoint

    def mark(self, name: str, when: float) -> None:
        """Record a mark once; the first occurrence wins."""
        assert name in MARKS, name
        self.marks.setdefault(name, when)

    def derived_ms(self) -> dict[str, float]:
        m = self.marks
        out: dict[str, float] = {}

        def diff(a: str | float | None, b: str | float | None) -> float | None:
            va = m.get(a) if isinstance(a, str) else a
            vb = m.get(b) if isinstance(b, str) else b
            return None if va is None or vb is None else round((va - vb) * 1000.0, 3)

        ready = max((m[k] for k in ("asr_final", "endpoint") if k in m), default=None)
        for name, value in (
            ("endpoint_delay", diff("endpoint", "speech_end")),
            ("asr_latency", diff("asr_final", "endpoint")),
            ("llm_ttft", diff("llm_first_token", ready)),
            ("token_to_first_byte", diff("first_byte_sent", "llm_first_token")),
            ("voice_to_voice", diff("first_byte_sent", "speech_end")),
        ):
            if value is not None:
                out[name] = value
        return out

    def log_line(self) -> str:
        d = self.derived_ms()
        parts = [f"{k}={v:.1f}ms" for k, v in d.items()]
        parts.append(f"prefill={self.prefill_tokens} (speculative {self.speculative_tokens}) "
                     f"cached={self.cached_tokens} "
                     f"generated={self.generated_tokens}")
        return " ".join(parts)
