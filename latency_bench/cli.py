"""`voicepipe-bench`: voice-to-voice latency of any OpenAI Realtime server, as users hear it.

Without a subcommand it runs simulated users against `--url`: each speaks questions (espeak-ng,
or your WAV files) at real-time pace in 20 ms frames like a microphone, listens to the reply,
thinks, and speaks again. It prints a live progress bar, then p50/p90/p99/max of every figure
per concurrency level, and writes every turn as JSON plus two PNG plots. `--compare A B` puts
two runs side by side; `--self-test` starts `voicepipe serve` on loopback and runs a short
scenario. `voicepipe-bench startup` times `voicepipe serve` to ready; `voicepipe-bench engine`
measures the LLM engine alone.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from voicepipe.testing.server import voicepipe_serve

from . import load, plots, report, soak
from . import speech as sp
from .progress import Progress
from .speech import QUESTIONS

try:  # the engine benchmark is optional: the command line works without it
    from . import engine as _engine  # type: ignore[attr-defined, unused-ignore]
except ImportError:
    _engine = None  # type: ignore[assignment, unused-ignore]

def time_startup(extra: list[str], cache: str) -> float:
    """Seconds from launching `voicepipe serve` to its ready line, with `cache` as model cache."""
    t0 = time.perf_counter()
    with voicepipe_serve(extra, env={"VOICEPIPE_CACHE": cache}):
        return time.perf_counter() - t0


def cmd_startup(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as cache:
        first = time_startup(args.serve_args, cache)
        second = time_startup(args.serve_args, cache)
    print(f"{'start':<28} {'seconds':>9}")
    print(f"{'first (empty model cache)':<28} {first:>9.1f}")
    print(f"{'second (warm model cache)':<28} {second:>9.1f}")
    return 0


def _levels(args: argparse.Namespace) -> list[int]:
    if args.sweep:
        return [int(x) for x in args.sweep.split(",") if x.strip()]
    return [args.sessions]


def _plan(args: argparse.Namespace, url: str) -> load.Plan:
    questions = sp.wav_files(args.speech) if args.speech else sp.spoken(QUESTIONS)
    plan = load.Plan(url=url, questions=questions, scenario=args.scenario,
                     api_key=args.api_key, duration=args.duration, think_s=args.think,
                     speed=args.speed, timeout=args.timeout, seed=args.seed,
                     turns=args.turns if args.turns or not args.duration else None)
    if args.scenario == "barge-in":
        plan.interruptions = sp.spoken(sp.INTERRUPTIONS)
    elif args.scenario == "silence":
        plan.quiet = [sp.silence(3.0)]
    elif args.scenario == "noise":
        plan.quiet = [sp.noise(3.0, seed=i) for i in range(4)]
    return plan


def run_bench(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    """Run the plan at every level; print the table; write JSON, PNGs and table.md."""
    plan, levels = _plan(args, url), _levels(args)
    total = plan.turns * sum(levels) if plan.turns and not plan.duration else None
    progress = Progress(total, plan.duration)
    try:
        turns = asyncio.run(load.sweep(plan, levels, progress.turn, progress.start_level))
    finally:
        progress.close()
    print(report.table(turns))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"url": url, "scenario": plan.scenario, "levels": levels, "turns": plan.turns,
            "duration_s": plan.duration, "think_s": plan.think_s, "speed": plan.speed,
            "speech": args.speech or "built-in questions (espeak-ng)",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    report.write_json(out / "turns.json", turns, meta)
    (out / "table.md").write_text(report.table(turns, markdown=True) + "\n")
    written = [out / "turns.json", out / "table.md"]
    if not args.no_plots:
        written += [plots.cdf(turns, out / "v2v_cdf.png"),
                    plots.waterfall(turns, out / "waterfall.png")]
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return turns


def self_test(args: argparse.Namespace) -> int:

    with voicepipe_serve(shlex.split(args.serve_args)) as url:
        print(f"voicepipe-bench: self-test against {url}", file=sys.stderr)
        turns = run_bench(args, url)
    bad = [t for t in turns if t.get("error") or (
        t.get("kind") != "quiet" and t.get("client_voice_to_voice_ms") is None)]
    print(f"self-test: {len(turns) - len(bad)}/{len(turns)} turns answered", file=sys.stderr)
    return 1 if bad or not turns else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="voicepipe-bench", description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime",
                    help="Realtime WebSocket URL of the server under test")
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    ap.add_argument("--scenario", choices=load.SCENARIOS, default="conversation",
                    help="conversation: turns in one session; single: a new session per "
                    "turn; barge-in: talk over each reply; silence/noise: no reply allowed")
    ap.add_argument("--speech", nargs="+", metavar="WAV",
                    help="WAV files or folders to speak instead of the built-in questions")
    ap.add_argument("--sessions", type=int, default=1, help="concurrent users")
    ap.add_argument("--sweep", metavar="N,N,..", help="run each number of sessions in turn")
    ap.add_argument("--turns", type=int, default=None,
                    help="turns per session (default 10 unless --duration is given)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level")
    ap.add_argument("--think", type=float, default=1.0,
                    help="mean pause (s) after listening to a reply, before the next turn")
    ap.add_argument("--speed", type=float, default=1.0, help="audio pace; 1.0 is real time")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    ap.add_argument("--seed", type=int, default=0, help="seed of think times and barge-ins")
    ap.add_argument("--out", default="voicepipe-bench-results",
                    help="folder for turns.json, table.md, v2v_cdf.png, waterfall.png")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                    help="print two runs' percentiles side by side with ratios B/A")
    ap.add_argument("--self-test", action="store_true",
                    help="start voicepipe serve on loopback and run a short scenario")
    ap.add_argument("--serve-args", default="",
                    help="extra arguments for voicepipe serve in --self-test")
    sub = ap.add_subparsers(dest="command")
    s = sub.add_parser("startup", help="time `voicepipe serve` to ready, first and second start")
    s.add_argument("serve_args", nargs="*", help="extra arguments for voicepipe serve")
    s.set_defaults(fn=cmd_startup)
    soak.register(sub)
    if _engine is not None:
        _engine.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "fn", None) is not None:
        return int(args.fn(args))
    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if args.self_test:
        if args.turns is None and args.duration is None:
            args.turns = 2
        return self_test(args)
    if args.turns is None and args.duration is None:
        args.turns = 10
    run_bench(args, args.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
