"""`voicepipe-bench engine` end to end on a tiny random model: every row of its report comes
out (no timing is checked; the numbers of a tiny model mean nothing)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


def test_engine_bench_prints_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llm.tiny import reference_model, write_hf_folder
    from voicepipe.bench import engine as bench

    folder = write_hf_folder(reference_model("qwen2"), tmp_path / "tiny-qwen2")
    parser = bench.argparse.ArgumentParser()
    bench._arguments(parser)
    args = parser.parse_args(["--model", str(folder), "--dtype", "float32",
                              "--threads", str(torch.get_num_threads()),
                              "--histories", "0", "40", "--batches", "1", "3",
                              "--tokens", "4", "--repeat", "1", "--warm-repeat", "2",
                              "--kv-cache-gb", "0.01"])
    bench.run(args)
    out = capsys.readouterr().out
    assert "| history | warm TTFT ms | cold TTFT ms |" in out
    for history in (0, 40):
        assert re.search(rf"^\| {history} \| \d+ \| \d+ \|$", out, re.M), out
    assert re.search(r"^cached TTFT at 40 tokens / at 0: [\d.]+x$", out, re.M), out
    assert re.search(r"^bookkeeping per turn at 4000 tokens: \d+ us$", out, re.M), out
    assert re.search(r"^KV per 1000 tokens: [\d.]+ MiB \((float32|bfloat16)\)$", out, re.M), out
    assert re.search(r"^KV (float32|bfloat16), attention: .+$", out, re.M), out
    for batch in (1, 3):
        assert re.search(rf"^decode batch {batch}: [\d.]+ tok/s$", out, re.M), out
    assert "llama-cpp-python batch 1: needs a GGUF model" in out
