"""The benchmark's arithmetic."""

import pytest
from voicepipe.bench.cli import percentile, summarize


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([10, 20], 90) == pytest.approx(19)
    assert percentile([7], 90) == 7


def test_summary_rows() -> None:
    turns = [{"client_voice_to_voice_ms": float(v), "server": {"llm_ttft": v / 2},
              "llm": {"prefill_tokens": 10, "cached_tokens": 100}} for v in range(1, 11)]
    rows = {name: (n, p50, p90) for name, n, p50, p90, _ in summarize(turns)}
    assert rows["client voice_to_voice"] == (10, 5.5, pytest.approx(9.1))
    assert rows["server llm_ttft"][0] == 10
    assert rows["llm prefill tokens"][1] == 10
