"""Print the README's table of server options from `ServerConfig`, or with --write, replace it
in README.md between the options markers."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from voicepipe.config import ServerConfig

START, END = "<!-- options:start -->", "<!-- options:end -->"


def table() -> str:
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(ServerConfig):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(none)"
        if default == "":
            default = "(empty)"
        rows.append(f"| `--{f.name.replace('_', '-')}` | `VOICEPIPE_{f.name.upper()}` | "
                    f"`{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


def main() -> None:
    if "--write" not in sys.argv:
        print(table())
        return
    readme = Path(__file__).parents[1] / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
