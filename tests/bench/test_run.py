"""Whole runs of `voicepipe-bench`: against the in-process scripted server, and (with the
real models) `--self-test` against `voicepipe serve` on the defaults."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from voicepipe.bench import cli


async def test_run_writes_json_table_and_both_plots(scripted_url: str,
                                                    tmp_path: Path) -> None:
    argv = ["--url", scripted_url, "--sweep", "1,2", "--turns", "2", "--think", "0.1",
            "--out", str(tmp_path)]
    assert await asyncio.to_thread(cli.main, argv) == 0
    data = json.loads((tmp_path / "turns.json").read_text())
    assert len(data["turns"]) == 2 * 1 + 2 * 2
    for t in data["turns"]:
        assert t["error"] is None and t["status"] == "completed"
        assert 0 < t["client_voice_to_voice_ms"] < 5000
        assert t["reply_audio_ms"] == pytest.approx(200)  # two scripted phrases of 100 ms
        assert set(t["server_marks"]) >= {"speech_end", "first_byte_sent"}
    assert set(data["summary"]) == {"1", "2"}
    for png in ("v2v_cdf.png", "waterfall.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "client voice_to_voice" in (tmp_path / "table.md").read_text()
    j = str(tmp_path / "turns.json")
    assert await asyncio.to_thread(cli.main, ["--compare", j, j]) == 0


@pytest.mark.models
@pytest.mark.slow
def test_self_test_against_voicepipe_serve(tmp_path: Path) -> None:
    assert cli.main(["--self-test", "--turns", "2", "--think", "0.2",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "turns.json").read_text())
    assert len(data["turns"]) == 2
    assert all(t["server_ms"].get("voice_to_voice") for t in data["turns"])
    assert (tmp_path / "waterfall.png").exists() and (tmp_path / "v2v_cdf.png").exists()
