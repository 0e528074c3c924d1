"""`voicepipe serve` in a subprocess on loopback, for tests and the benchmark: start it, wait for
its ready line, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

READY = re.compile(r"voicepipe is ready: .* Realtime WebSocket at (\S+)")


def http_url(realtime_url: str) -> str:
    """`ws://host:port/v1/realtime` -> `http://host:port/`."""
    return realtime_url.replace("ws", "http", 1).split("v1/realtime")[0]


@contextlib.contextmanager
def voicepipe_serve(extra: list[str], timeout: float = 600.0,
                    env: dict[str, str] | None = None) -> Iterator[str]:
    """Yields the Realtime URL of a fresh `voicepipe serve --host 127.0.0.1 --port 0`, with
    `extra` arguments and `env` added to this process's environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "voicepipe.server.cli", "serve", "--host", "127.0.0.1",
         "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    tail: list[str] = []
    url: str | None = None
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            if m := READY.search(line):
                url = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if url is None:
            raise RuntimeError("voicepipe serve did not become ready:\n" + "\n".join(tail))
        # keep reading its output so the pipe never fills and blocks the server
        threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def recv_type(ws: Any, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next server event of type `kind` on a websocket, skipping others and binary frames."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                continue
            ev: dict[str, Any] = json.loads(msg)
            if ev["type"] == kind:
                return ev
