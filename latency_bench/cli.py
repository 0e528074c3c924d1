"""`voicepipe-bench`: measure voice-to-voice latency against any OpenAI Realtime server.

`voicepipe-bench turns` speaks a set of questions (made locally with espeak-ng) into one
conversation at real-time pace, like a microphone, and prints p50/p90 of the client-side
voice-to-voice time (last speech sample sent -> first reply audio byte received) and of the
server's per-stage figures when the server sends voicepipe's latency events.
`voicepipe-bench startup` times `voicepipe serve` from launch to ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "And what is the capital of Germany?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is two plus three?",
    "Which animal says moo?",
    "What do bees make?",
    "What is the opposite of hot?",
    "How many legs does a spider have?",
]

FIGURES = ("endpoint_delay", "asr_latency", "llm_ttft", "token_to_first_byte",
           "voice_to_voice")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(turns: list[dict[str, Any]]) -> list[tuple[str, int, float, float, float]]:
    """Rows of (figure, n, p50, p90, max) in milliseconds."""
    rows = []
    series: dict[str, list[float]] = {"client voice_to_voice": [
        t["client_voice_to_voice_ms"] for t in turns if t.get("client_voice_to_voice_ms")]}
    for name in FIGURES:
        series[f"server {name}"] = [t["server"][name] for t in turns
                                    if name in t.get("server", {})]
    series["llm prefill tokens"] = [t["llm"]["prefill_tokens"] for t in turns if t.get("llm")]
    series["llm cached tokens"] = [t["llm"]["cached_tokens"] for t in turns if t.get("llm")]
    for name, values in series.items():
        if values:
            rows.append((name, len(values), percentile(values, 50), percentile(values, 90),
                         max(values)))
    return rows


def print_table(rows: list[tuple[str, int, float, float, float]]) -> None:
    print(f"{'figure':<28} {'n':>3} {'p50':>9} {'p90':>9} {'max':>9}")
    for name, n, p50, p90, mx in rows:
        unit = "" if "tokens" in name else " ms"
        print(f"{name:<28} {n:>3} {p50:>9.1f} {p90:>9.1f} {mx:>9.1f}{unit}")


async def run_turns(url: str, api_key: str | None, turns: int, speed: float,
                    timeout: float) -> list[dict[str, Any]]:
    import voicepipe_client as vc

    from voicepipe.testing.speech import espeak_pcm

    out: list[dict[str, Any]] = []
    async with vc.connect(url, api_key, session={"voicepipe": {"latency_events": True}}) as rt:
        for i in range(turns):
            question = QUESTIONS[i % len(QUESTIONS)]
            result = await rt.talk(espeak_pcm(question, 24000), sample_rate=24000,
                                   realtime=speed, timeout=timeout)
            row = {
                "turn": i + 1, "question": question, "transcript": result.user_transcript,
                "reply": result.reply_text, "status": result.response_status,
                "client_voice_to_voice_ms": None if result.client_voice_to_voice is None
                else result.client_voice_to_voice * 1000.0,
                "server": result.timings.get("derived_ms", {}),
                "llm": result.timings.get("llm", {}),
            }
            out.append(row)
            # listen to the reply before the next question: talking over it is a barge-in
            await asyncio.sleep(len(result.reply_audio) / result.sample_rate)
            v2v = row["client_voice_to_voice_ms"]
            print(f"turn {i + 1:>2}: v2v {v2v if v2v is None else round(v2v):>6} ms  "
                  f"{question!r} -> {result.reply_text[:60]!r}", file=sys.stderr)
    return out


def cmd_turns(args: argparse.Namespace) -> int:
    turns = asyncio.run(run_turns(args.url, args.api_key, args.turns, args.speed, args.timeout))
    print_table(summarize(turns))
    if args.json:
        Path(args.json).write_text(json.dumps(turns, indent=2))
    return 0


def time_startup(extra: list[str], cache: str | None) -> float:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cache:
        env["VOICEPIPE_CACHE"] = cache
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "voicepipe.server.cli", "serve", "--port",
                             "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if re.search(r"voicepipe is ready", line):
                return time.perf_counter() - t0
        raise RuntimeError("voicepipe serve exited before it was ready")
    finally:
        proc.terminate()
        proc.wait(30)


def cmd_startup(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as cache:
        first = time_startup(args.serve_args, cache)
        second = time_startup(args.serve_args, cache)
    print(f"{'start':<28} {'seconds':>9}")
    print(f"{'first (empty model cache)':<28} {first:>9.1f}")
    print(f"{'second (warm model cache)':<28} {second:>9.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicepipe-bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("turns", help="spoken turns in one conversation; latency table")
    t.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime")
    t.add_argument("--api-key", default=None)
    t.add_argument("--turns", type=int, default=10)
    t.add_argument("--speed", type=float, default=1.0,
                   help="audio pacing: 1.0 = real time, 2.0 = twice as fast")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds per turn")
    t.add_argument("--json", metavar="FILE", help="write every turn as JSON")
    t.set_defaults(fn=cmd_turns)
    s = sub.add_parser("startup", help="time `voicepipe serve` to ready, first and second start")
    s.add_argument("serve_args", nargs="*", help="extra arguments for voicepipe serve")
    s.set_defaults(fn=cmd_startup)
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
