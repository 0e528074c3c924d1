"""The GPU check script's every code path (but the CUDA graph), on the CPU in the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys


def test_gpu_check_runs_on_the_cpu_and_prints_its_table() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "voicepipe.bench.gpu_check", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("add_rms_norm", "rope_kv_write", "silu_mul", "decode_attention", "sampling",
                "copy bandwidth", "decode, reference ops", "decode, fused kernels", "TTFT"):
        assert row in out.stdout, row
    assert "(ok)" in out.stdout and "DISAGREES" not in out.stdout
