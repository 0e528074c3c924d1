"""Concurrent users: `sessions` conversations at once, each with think time between turns.

A level runs until every user has done `turns` turns, or `duration` seconds have passed (a turn
in progress then finishes). A sweep runs levels one after another. Each turn record gets the
level (`sessions`), the user, its index in the user's session and its start time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import scenarios as sc
from .speech import Utterance

SCENARIOS = ("conversation", "single", "barge-in", "silence", "noise")


@dataclass
class Plan:
    url: str
    questions: list[Utterance]
    scenario: str = "conversation"
    api_key: str | None = None
    turns: int | None = 10  # per session
    duration: float | None = None  # seconds per level
    think_s: float = 1.0  # mean pause after listening to a reply
    speed: float = 1.0  # 1.0: real time
    timeout: float = 120.0  # seconds for one reply
    seed: int = 0
    interruptions: list[Utterance] = field(default_factory=list)
    quiet: list[Utterance] = field(default_factory=list)


async def _turn(plan: Plan, call: sc.Call, k: int, rng: random.Random) -> dict[str, Any]:
    question = plan.questions[k % len(plan.questions)]
    if plan.scenario == "barge-in":
        stop = plan.interruptions[k % len(plan.interruptions)]
        return await sc.interrupt(call, question, stop, rng=rng, timeout=plan.timeout)
    if plan.scenario in ("silence", "noise"):
        return await sc.stay_quiet(call, plan.quiet[k % len(plan.quiet)])
    return await sc.ask(call, question, timeout=plan.timeout)


async def user(plan: Plan, level: int, index: int, t0: float,
               on_turn: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    rng = random.Random(plan.seed * 1000 + level * 100 + index)
    await asyncio.sleep(rng.uniform(0.0, 0.5) if level > 1 else 0.0)  # no lockstep
    out: list[dict[str, Any]] = []
    call: sc.Call | None = None
    k = 0
    try:
        while (plan.turns is None or k < plan.turns) and (
                plan.duration is None or time.perf_counter() - t0 < plan.duration):
            started = time.perf_counter()
            try:
                if call is None or plan.scenario == "single":
                    if call is not None:
                        await call.close()
                    call = await sc.open_call(plan.url, plan.api_key, plan.speed)
                rec = await _turn(plan, call, index + k * 7, rng)  # users ask in other orders
                rec["error"] = None
            except Exception as exc:  # one failed turn is a result, not the end of the run
                rec = {"kind": "error", "status": None,
                       "error": f"{type(exc).__name__}: {exc}"}
                if call is not None:
                    await call.close()
                call = None
            rec.update(sessions=level, user=index, turn=k,
                       started_s=round(started - t0, 3), scenario=plan.scenario)
            out.append(rec)
            on_turn(rec)
            k += 1
            await asyncio.sleep(rng.uniform(0.5, 1.5) * plan.think_s)
    finally:
        if call is not None:
            await call.close()
    return out


async def run_level(plan: Plan, sessions: int,
                    on_turn: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    per_user = await asyncio.gather(*(user(plan, sessions, i, t0, on_turn)
                                      for i in range(sessions)))
    return [rec for recs in per_user for rec in recs]


async def sweep(plan: Plan, levels: list[int],
                on_turn: Callable[[dict[str, Any]], None],
                on_level: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in levels:
        if on_level is not None:
            on_level(n)
        out.extend(await run_level(plan, n, on_turn))
    return out
