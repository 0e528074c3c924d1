"""The run's outputs in words: the percentile table, the JSON file, and `--compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import stats

COUNTS = ("errors", "no_reply", "barge_in_cut", "barge_in_not_cut", "false_replies")


def _fmt(x: float, unit: str) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.0f}" if unit == "ms" or abs(x) >= 100 else f"{x:.1f}"


def table(turns: list[dict[str, Any]], markdown: bool = False) -> str:
    """p50/p90/p99/max of every figure, per concurrency level."""
    lines: list[str] = []
    head = ["sessions", "figure", "n", "p50", "p90", "p99", "max", "unit"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for level, recs in stats.by_level(turns).items():
        summ = stats.summary(recs)
        for label, row in summ.items():
            if label == "turns":
                continue
            u = stats.unit(label)
            rows.append([str(level), label, str(int(row["n"])),
                         *(_fmt(row[k], u) for k in ("p50", "p90", "p99", "max")), u])
        counts = summ["turns"]
        extra = ", ".join(f"{k} {int(counts[k])}" for k in COUNTS if counts[k])
        notes.append(f"{level} session(s): {int(counts['n'])} turns" + (f"; {extra}" if extra
                                                                         else ""))
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
        lines += [f"- {n}" for n in notes]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        lines.append("  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                               for i, (h, w) in enumerate(zip(head, widths, strict=True))))
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        lines += notes
    return "\n".join(lines)


def write_json(path: str | Path, turns: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    summary = {str(level): stats.summary(recs)
               for level, recs in stats.by_level(turns).items()}
    Path(path).write_text(json.dumps({"meta": meta, "summary": summary, "turns": turns},
                                     indent=1, default=_jsonable))


def _jsonable(x: Any) -> Any:
    return float(x) if hasattr(x, "__float__") else str(x)


def load_turns(path: str | Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    return list(data["turns"] if isinstance(data, dict) else data)


def compare(a_path: str | Path, b_path: str | Path) -> str:
    """p50 and p90 of every figure both runs have, per level, and the ratio B/A."""
    a_levels = stats.by_level(load_turns(a_path))
    b_levels = stats.by_level(load_turns(b_path))
    head = f"{'sessions':>8}  {'figure':<24} {'A p50':>8} {'B p50':>8} {'B/A':>6}  " \
           f"{'A p90':>8} {'B p90':>8} {'B/A':>6}"
    lines = [f"A = {a_path}", f"B = {b_path}", head]
    for level in sorted(set(a_levels) & set(b_levels)):
        sa, sb = stats.summary(a_levels[level]), stats.summary(b_levels[level])
        for label in sa:
            if label == "turns" or label not in sb:
                continue
            u = stats.unit(label)
            cells = []
            for q in ("p50", "p90"):
                x, y = sa[label][q], sb[label][q]
                ratio = f"{y / x:.2f}" if x else "-"
                cells.append(f"{_fmt(x, u):>8} {_fmt(y, u):>8} {ratio:>6}")
            lines.append(f"{level:>8}  {label:<24} " + "  ".join(cells))
    return "\n".join(lines)
