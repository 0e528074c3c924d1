"""The `voicepipe` command line: `voicepipe serve` and its options."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from voicepipe import config as cfg

GIL_SWITCH_S = 0.0005


def _serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    ap = sub.add_parser(
        "serve", help="run the voice-agent server",
        description="Run the voicepipe server: OpenAI Realtime over WebSocket at /v1/realtime, "
        "the browser demo at /, health at /healthz. Each option can also be set in the TOML "
        "file given by --config (key = option name with underscores, optionally under "
        "[server]) or in the environment as VOICEPIPE_<OPTION> (e.g. VOICEPIPE_PORT=9000). "
        "Precedence: flags > environment > file > defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", metavar="FILE", help="TOML file with options")
    for f in dataclasses.fields(cfg.ServerConfig):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                        metavar=f.name.upper(),
                        help=f"{f.metadata['help']} (default: {default!r})".replace("%", "%%"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicepipe", description="voicepipe voice-agent server")
    sub = ap.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = cfg.load(args.config, overrides)
    except cfg.ConfigError as exc:
        print(f"voicepipe: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[voicepipe {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    def ready(url: str) -> None:
        progress(f"ready in {time.perf_counter() - t0:.1f}s")
        print(f"voicepipe is ready: open {url} for the demo; Realtime WebSocket at "
              f"{url.replace('http', 'ws', 1)}v1/realtime", flush=True)

    from voicepipe.server.app import run
    from voicepipe.server.stages import load_stages

    # The event loop carries every session's audio; a stage thread holding the GIL should hand
    # it back within half a millisecond, not Python's default 5 ms.
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is Linux/macOS only
        import asyncio

        runner = asyncio.run
    try:
        runner(run(config, lambda: load_stages(config, progress), ready))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"voicepipe: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
