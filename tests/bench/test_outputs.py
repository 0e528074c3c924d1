"""Playback model, statistics, the table, `--compare` and the plots, on made-up turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from voicepipe.bench import plots, report, stats
from voicepipe.bench.playback import play, played_at


def test_playback_underruns_and_gaps() -> None:
    pb = play([(0.0, 0.1), (0.05, 0.1), (0.45, 0.1), (0.5, 0.1)])
    assert pb.audio_s == pytest.approx(0.4)
    assert (pb.underruns, pb.gap_s, pb.max_gap_s) == (1, pytest.approx(0.25),
                                                     pytest.approx(0.25))
    assert pb.ends_at == pytest.approx(0.65)
    assert play([]).ends_at is None


def test_played_at_follows_real_time_playback() -> None:
    chunks = [(0.0, 0.1), (0.3, 0.1)]
    assert played_at(chunks, 0.05) == pytest.approx(0.05)
    assert played_at(chunks, 0.2) == pytest.approx(0.1)  # ran dry
    assert played_at(chunks, 0.35) == pytest.approx(0.15)


def turn(v2v: float, level: int, marks: bool = True) -> dict:
    m = {"speech_end": 0.0, "endpoint": 0.5, "asr_final": 0.3, "llm_first_token": 0.8,
         "tts_first_audio": 1.0, "first_byte_sent": 1.01}
    return {"kind": "ask", "sessions": level, "client_voice_to_voice_ms": v2v,
            "status": "completed", "reply_audio_ms": 2000.0, "underruns": 0, "gap_ms": 0.0,
            "max_gap_ms": 0.0, "server_marks": m if marks else {},
            "server_ms": {"voice_to_voice": 1010.0} if marks else {},
            "llm": {"prefill_tokens": 10, "cached_tokens": 90}}


def test_summary_has_every_percentile() -> None:
    s = stats.summary([turn(float(v), 1) for v in range(1, 101)])
    row = s["client voice_to_voice"]
    assert row["n"] == 100 and row["p50"] == pytest.approx(50.5)
    assert row["p99"] == pytest.approx(99.01) and row["max"] == 100
    assert s["server voice_to_voice"]["p90"] == 1010.0
    assert s["turns"]["errors"] == 0


def test_table_and_compare(tmp_path: Path) -> None:
    a = [turn(1000.0, 1), turn(1100.0, 1), turn(1500.0, 2)]
    b = [turn(500.0, 1), turn(550.0, 1), turn(750.0, 2)]
    report.write_json(tmp_path / "a.json", a, {"url": "x"})
    report.write_json(tmp_path / "b.json", b, {"url": "y"})
    text = report.table(a)
    assert "client voice_to_voice" in text and "p99" in text
    md = report.table(a, markdown=True)
    assert md.startswith("| sessions | figure |")
    lines = report.compare(tmp_path / "a.json", tmp_path / "b.json").splitlines()
    row = next(x for x in lines if x.split()[:3] == ["1", "client", "voice_to_voice"])
    assert row.split()[3:6] == ["1050", "525", "0.50"]
    assert json.loads((tmp_path / "a.json").read_text())["summary"]["2"]["turns"]["n"] == 1


def test_waterfall_of_the_median_turn(tmp_path: Path) -> None:
    turns = [turn(1200.0, 1), turn(1100.0, 1), turn(1300.0, 1)]
    assert plots.median_turn(turns)["client_voice_to_voice_ms"] == 1200.0
    bars = {name: (round(a), round(n)) for name, a, n in plots.stage_bars(turns[0])}
    assert bars["LLM first token"] == (500, 300)
    assert bars["network + client"] == (1010, 190)
    for draw, name in ((plots.cdf, "cdf.png"), (plots.waterfall, "w.png")):
        path = draw(turns, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
