"""`voicepipe-bench soak`: many sessions streaming real-time audio for a while, then a leak check.

Against `voicepipe serve --stages scripted` (started here unless `--url` is given), so the
numbers are voicepipe's own: errors, the server's resident memory after warm-up and at the end,
asyncio tasks and sessions left once every client has gone, and the overhead from the VAD's
end-of-turn decision (the server's `endpoint` mark) to the first reply audio byte received by
the client. Server and client share this machine's wall clock, so the two can be subtracted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from voicepipe.testing.server import voicepipe_serve

from .stats import percentile


@dataclass
class SoakResult:
    sessions: int
    duration_s: float
    turns: int = 0
    errors: list[str] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)  # endpoint -> first_byte_sent
    rss_warm: int = 0
    rss_end: int = 0
    tasks_before: int = 0
    tasks_end: int = 0
    sessions_end: int = 0

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_warm) / self.rss_warm if self.rss_warm else 0.0

    def table(self) -> str:
        oh = self.overhead_ms
        rows = [
            ("sessions x duration", f"{self.sessions} x {self.duration_s:.0f} s"),
            ("turns answered", str(self.turns)),
            ("errors", str(len(self.errors))),
            ("RSS after warm-up", f"{self.rss_warm / 2**20:.1f} MiB"),
            ("RSS at the end", f"{self.rss_end / 2**20:.1f} MiB ({self.rss_growth:+.1%})"),
            ("tasks left (before -> after)", f"{self.tasks_before} -> {self.tasks_end}"),
            ("sessions left", str(self.sessions_end)),
        ]
        if oh:
            rows.append(("endpoint -> first byte at client",
                         f"p50 {percentile(oh, 50):.2f} ms, p90 {percentile(oh, 90):.2f} ms, "
                         f"max {max(oh):.2f} ms"))
        sv = self.server_ms
        if sv:
            rows.append(("  of which in the server",
                         f"p50 {percentile(sv, 50):.2f} ms, p90 {percentile(sv, 90):.2f} ms, "
                         f"max {max(sv):.2f} ms"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _health(http: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(http + "/healthz", timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as err:  # degraded/loading still carry the body
        return json.loads(err.read())  # type: ignore[no-any-return]


async def _user(url: str, speech: Any, deadline: float, result: SoakResult,
                rng: random.Random) -> None:
    import voicepipe_client as vc

    await asyncio.sleep(rng.uniform(0, 2.0))  # staggered arrivals
    try:
        async with vc.connect(url, session={"voicepipe": {"latency_events": True}}) as rt:
            while time.monotonic() < deadline:
                turn = await rt.talk(speech, sample_rate=24000, timeout=60)
                if turn.response_status != "completed":
                    result.errors.append(f"response {turn.response_status}")
                    continue
                result.turns += 1
                marks = turn.timings.get("marks", {})
                endpoint = marks.get("endpoint")
                if endpoint and marks.get("first_byte_sent"):
                    result.server_ms.append((marks["first_byte_sent"] - endpoint) * 1000.0)
                first = next((ev for ev in turn.events
                              if ev.type == "response.output_audio.delta"), None)
                if endpoint and first is not None:
                    received = time.time() - (time.perf_counter() - first.received_at)
                    result.overhead_ms.append((received - endpoint) * 1000.0)
                await asyncio.sleep(rng.uniform(0.2, 1.0))  # think time
    except Exception as exc:  # every failure counts; the soak goes on with the others
        result.errors.append(f"{type(exc).__name__}: {exc}")


async def soak(url: str, sessions: int, duration: float, seed: int = 0) -> SoakResult:
    from voicepipe.testing.speech import espeak_pcm

    http = url.replace("ws", "http", 1).split("/v1/")[0]
    speech = espeak_pcm("What is the capital of France?", 24000)
    result = SoakResult(sessions, duration)
    result.tasks_before = (await asyncio.to_thread(_health, http))["process"]["tasks"]
    start = time.monotonic()
    users = [asyncio.create_task(_user(url, speech, start + duration, result,
                                       random.Random(seed + i))) for i in range(sessions)]
    await asyncio.sleep(min(duration * 0.2, 30.0))  # warm-up: every session is talking
    result.rss_warm = (await asyncio.to_thread(_health, http))["process"]["rss_bytes"]
    await asyncio.gather(*users)
    await asyncio.sleep(1.0)  # let the server notice the last closes
    end = await asyncio.to_thread(_health, http)
    result.rss_end = end["process"]["rss_bytes"]
    result.tasks_end = end["process"]["tasks"]
    result.sessions_end = end["sessions"]
    return result


def cmd_soak(args: argparse.Namespace) -> int:
    def run(url: str) -> SoakResult:
        return asyncio.run(soak(url, args.sessions, args.duration, args.seed))

    if args.url:
        result = run(args.url)
    else:
        with voicepipe_serve(["--stages", "scripted", "--max-sessions",
                              str(max(32, args.sessions))]) as url:
            result = run(url)
    print(result.table())
    for err in result.errors[:10]:
        print("error:", err, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.__dict__ | {"rss_growth": result.rss_growth}, f, indent=2)
    return 0 if not result.errors else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("soak", help="N sessions of real-time audio against scripted stages; "
                       "errors, memory growth, leaks, orchestration overhead")
    s.add_argument("--url", default=None,
                   help="a running server (default: start voicepipe serve --stages scripted)")
    s.add_argument("--sessions", type=int, default=20)
    s.add_argument("--duration", type=float, default=60.0, help="seconds")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", metavar="FILE", help="write the result as JSON")
    s.set_defaults(fn=cmd_soak)
